"""The benchmark command runs end to end on CPU (tiny presets), so the GPU run only measures."""

import json

from experiments.bench.__main__ import main


def test_bench_cpu_smoke(tmp_path):
    rc = main(
        [
            "--suite",
            "cpu",
            "--only",
            "train,decode",
            "--match",
            "tiny/",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--no-profile",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert rows and all("error" not in r for r in rows), rows
    assert {r["bench"] for r in rows} == {"train", "decode"}
    for r in rows:
        if "sampler" not in r["variant"]:  # a difference of two timings: noisy on CPU
            assert r["tokens_per_s"] > 0
    decode_rows = [r for r in rows if r["bench"] == "decode"]
    assert all(r["greedy_agree"] == 1.0 for r in decode_rows)  # float32 tiny model: exact
