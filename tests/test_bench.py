"""The benchmark command runs end to end on CPU (tiny presets), so the GPU run only measures."""

import json

import jax
import numpy as np
import pytest

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


def test_packed_rows_have_the_pipelines_document_structure():
    """The packed benchmark rows: documents of the stdlib corpus' lengths, packed by
    data.pipeline (segment ids 1, 2, ... along the row, positions restarting at each)."""
    from experiments.bench.packed_rows import describe, packed_batch, stdlib_document_lengths

    assert len(stdlib_document_lengths()) > 100
    # the benchmark's own shape: 65k tokens span documents enough that some row holds two
    # on any Python's standard library (16 rows of 512 were one document each on 3.12's)
    rows = packed_batch(vocab=256, batch=64, seq_len=1024)
    seg, pos = rows["segment_ids"], rows["positions"]
    assert seg.shape == pos.shape == rows["inputs"].shape == (64, 1024)
    assert (seg[:, 0] == 1).all() and (pos[:, 0] == 0).all()
    step = np.diff(seg, axis=1)
    assert set(np.unique(step)) <= {0, 1}  # no padding in full rows
    np.testing.assert_array_equal(np.diff(pos, axis=1)[step == 0], 1)
    np.testing.assert_array_equal(pos[:, 1:][step == 1], 0)
    assert describe(seg)["docs_per_row"] > 1  # stdlib files: a few hundred tokens and up


def test_every_suite_variant_is_well_formed():
    """Every variant of every suite names a real mesh and row kind (a misplaced positional
    argument once gave every gpt2 GPU variant the mesh "synthetic", and the GPU run
    silently measured none of them)."""
    from experiments.bench import suites
    from experiments.bench.train_step import TrainVariant

    for train, _, _ in suites.SUITES.values():
        for v in train:
            assert v.rows in ("synthetic", "packed") and "/datas." not in v.name, v.name
    with pytest.raises(ValueError, match="mesh must be"):
        TrainVariant("tiny", 64, 8, 1, (), "synthetic")


def test_a_match_that_names_nothing_is_an_error(tmp_path, capsys):
    """A typo in --match must not pass for a run that measured nothing."""
    args = ["--suite", "cpu", "--only", "train,decode", "--no-profile", "--out", str(tmp_path)]
    assert main([*args, "--match", "=tiny/no-such-variant"]) == 2
    assert "names no variant" in capsys.readouterr().err
    assert not (tmp_path / "bench.jsonl").exists()


def test_match_picks_variants_by_substring_or_exact_name():
    """--match: substrings, whole bracketed names as one term, "=" for exactly one name
    (a base variant's name is a substring of all its [overridden] siblings')."""
    from experiments.bench.__main__ import match_terms, matches

    base = "gpt-1.3b/sampler/b1/p128+256"
    sibling = base + "[decode_matmul=xla,norm_impl=pallas]"
    terms = match_terms(f"={base},{sibling}")
    assert terms == [f"={base}", sibling]
    assert matches(base, terms) and matches(sibling, terms)
    assert matches(sibling, [base]) and not matches(sibling, [f"={base}"])
    assert not matches(base + "[norm_impl=pallas]", terms)
    assert matches("anything", [])


def test_profile_names_each_kernel_by_the_jax_op_it_came_from():
    """fusion_origins: a kernel (an HLO instruction, '.' and '-' made '_') gets its own
    op_name, else the one of the ROOT of the computation it calls."""
    import jax.numpy as jnp

    from experiments.bench.profile import fusion_origins

    hlo = "\n".join(
        [
            "%fused_computation.7 (param_0: f32[8]) -> f32[8] {",
            '  ROOT %select_n.2 = f32[8] select(...), metadata={op_name="jit(step)/jit(_where)"}',
            "}",
            "ENTRY %main.3 (x.1: f32[8]) -> f32[8] {",
            "  %loop_select_fusion.4 = f32[8] fusion(%x.1), kind=kLoop, calls=%fused_computation.7",
            '  ROOT %wrapped_reduce-window = f32[8] fusion(), metadata={op_name="jit(step)/sum"}',
            "}",
        ]
    )
    origins = fusion_origins(hlo)
    assert origins["loop_select_fusion_4"] == "jit(step)/jit(_where)"
    assert origins["wrapped_reduce_window"] == "jit(step)/sum"
    # and on a real compiled program: the select's fusion is named after jnp.where
    f = jax.jit(lambda x: jnp.where(x > 0, jnp.exp(x), 0.0).sum())
    real = fusion_origins(f.lower(jnp.ones((8, 128))).compile().as_text())
    assert any("jit(_where)" in op for op in real.values()) and not any("." in k for k in real)


def test_idle_gaps_count_the_time_no_kernel_runs():
    """Overlapping kernels (two streams) leave no gap; the gaps between a kernel's end and
    the next start are summed and listed widest first, named by the kernels around them."""
    from experiments.bench.profile import idle_gaps

    kernels = [  # (start us, end us, name), unsorted, two steps
        (30.0, 40.0, "c"),
        (0.0, 10.0, "a"),
        (5.0, 20.0, "b"),  # overlaps a: no gap between them
        (100.0, 110.0, "d"),
    ]
    got = idle_gaps(kernels, steps=2, top=1)
    assert got["kernels_per_step"] == 2
    assert got["span_ms_per_step"] == pytest.approx(110.0 / 1e3 / 2)
    assert got["idle_ms_per_step"] == pytest.approx((10.0 + 60.0) / 1e3 / 2)  # b->c, c->d
    assert got["widest_gaps_us"] == [(60.0, "c", "d")]


def test_optimizer_bench_counts_the_presets_parameters_and_its_floor():
    from experiments.bench import optimizer_step
    from model.config import get_preset
    from model.transformer import LanguageModel
    from train.state import count_params, init_fn

    n = count_params(jax.eval_shape(init_fn(LanguageModel(get_preset("tiny"))), jax.random.key(0)))
    for checks in (True, False):
        row = optimizer_step.measure("tiny", iters=2, copy_GBps=10.0, checks=checks)
        assert row["params"] == n and row["update_ms"] > 0
        assert row["floor_ms_at_copy_rate"] == pytest.approx(28 * n / 10e9 * 1e3)
        assert row["variant"] == ("tiny" if checks else "tiny/no_checks")


def test_host_spans_time_a_compile_by_its_named_spans(tmp_path):
    """profile.host_spans returns the call's result and XLA's own spans of it, each with its
    summed and wall seconds (their union) and threads; `_union` merges overlapping spans."""
    import jax.numpy as jnp

    from experiments.bench.profile import _union, host_spans

    assert _union([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4.0
    lowered = jax.jit(lambda x: jnp.tanh(x @ x).sum()).lower(jnp.ones((64, 64)))
    compiled, spans = host_spans(lowered.compile, str(tmp_path))
    assert float(compiled(jnp.ones((64, 64)))) == pytest.approx(64 * 64 * np.tanh(64.0))
    names = {name for name, *_ in spans["top_spans"]}
    assert any("Compile" in n for n in names) and not any(n.startswith("$") for n in names)
    assert all(
        wall <= total + 1e-6 and threads >= 1 for _, total, wall, threads in spans["top_spans"]
    )


def test_report_reprints_saved_rows_and_refuses_missing_files(tmp_path, capsys):
    from experiments.bench import report

    rows = tmp_path / "bench.jsonl"
    rows.write_text(json.dumps({"bench": "train", "variant": "tiny/T32", "step_ms": 1.5}) + "\n")
    assert report.main([str(rows)]) == 0
    assert "tiny/T32 | 1.5" in capsys.readouterr().out
    assert report.main([str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert report.main([]) == 2
