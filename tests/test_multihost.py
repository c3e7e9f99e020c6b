"""Two processes with 4 CPU devices each train like one process with 8 devices."""

from __future__ import annotations

import socket
import subprocess

import numpy as np

from data.prepare import prepare
from tests.run_helpers import make_corpus, overrides, pretrain_command, run_pretrain
from train.metrics_writer import read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    return [r["train/loss"] for r in read_metrics(workdir / "metrics.jsonl") if "train/loss" in r]


def test_two_processes_match_one(tmp_path):
    corpus = make_corpus(tmp_path / "text")
    prepare(
        f"text:{corpus}",
        tmp_path / "prepared",
        tokenizer="char",
        vocab_size=128,
        num_workers=1,
        progress=False,
    )
    args = overrides(
        corpus,
        tmp_path / "prepared",
        **{
            "train.num_steps": 4,
            "train.checkpoint_every": 2,
            "mesh.data": 2,
            "mesh.fsdp": 4,
        },
    )
    single = run_pretrain(tmp_path / "single", args, devices=8)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    processes = []
    for process_id in range(2):
        command, env = pretrain_command(
            tmp_path / "multi",
            [
                *args,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={process_id}",
            ],
            devices=4,
        )
        processes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
    # Equal up to float32 reduction order (gloo's all-reduce sums in another order).
    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"), rtol=1e-5)
    assert sorted(int(p.name) for p in (tmp_path / "multi" / "checkpoints").iterdir()) == [2, 4]
