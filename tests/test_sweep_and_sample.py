"""The sweep command runs a grid and tabulates it; the sample command reads a checkpoint."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import jax
import pytest

from tests.run_helpers import (
    CONFIG,
    REPO,
    TRAINED_RUN_SETTINGS,
    cpu_env,
    make_corpus,
    overrides,
)


def test_sweep_runs_the_grid_and_writes_table_and_plot(tmp_path):
    corpus = make_corpus(tmp_path / "text")
    args = [
        a
        for a in overrides(corpus, tmp_path / "unused", **{"train.num_steps": 3})
        if not a.startswith("--config.data.dir")
    ]
    command = [
        sys.executable,
        "-m",
        "experiments.sweep",
        f"--config={CONFIG}",
        f"--root={tmp_path / 'sweep'}",
        "--sweep.optim.lr=0.001,0.01",
        "--sweep.model.n_layers=1",
        *args,
    ]
    printed = subprocess.run(
        [*command, "--print_only"],
        env=cpu_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr[-2000:]
    lines = printed.stdout.strip().splitlines()
    assert len(lines) == 2 and all("experiments.pretrain" in line for line in lines)
    assert "--config.optim.lr=0.01" in lines[1] and "--config.model.n_layers=1" in lines[1]

    result = subprocess.run(
        command, env=cpu_env(), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "sweep" / "sweep_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["optim.lr"], r["model.n_layers"]) for r in rows] == [("0.001", "1"), ("0.01", "1")]
    assert [r["status"] for r in rows] == ["done", "done"]
    assert all(float(r["eval/loss"]) > 0 for r in rows)
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000
    # The points share one prepared data directory.
    assert (tmp_path / "sweep" / "data" / "meta.json").exists()


def test_sample_command_reads_the_latest_checkpoint(trained_run, tmp_path):
    workdir = trained_run.workdir
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.sample",
            f"--workdir={workdir}",
            "--prompt=def ",
            "--num_samples=3",  # no --max_new_tokens: as many as the 32 positions leave
            "--temperature=0",
        ],
        env=cpu_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint step {TRAINED_RUN_SETTINGS['train.num_steps']}" in result.stdout
    samples = result.stdout.split("--- sample ")[1:]
    assert len(samples) == 3
    assert len(set(samples[i].split("\n", 1)[1] for i in range(3))) == 1  # greedy: all equal

    for args, message in (
        ([f"--workdir={tmp_path / 'nothing'}"], "holds no checkpoints"),
        ([f"--workdir={workdir}", "--num_samples=0"], "--num_samples must be >= 1"),
        ([f"--workdir={workdir}", "--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
        ([f"--workdir={workdir}", "--prompt=" + "x" * 40], "shorten the prompt"),
        ([f"--workdir={workdir}", "--chat", "--prompt=hi"], "never taught the chat template"),
    ):
        refused = subprocess.run(
            [sys.executable, "-m", "experiments.sample", *args],
            env=cpu_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-2000:]
        assert "Traceback" not in refused.stderr


def test_best_eval_step_picks_the_lowest_eval_loss_among_kept_checkpoints(tmp_path):
    from train.metrics_writer import best_eval_step

    path = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 4, "eval/loss": 2.0},
        {"step": 5, "train/loss": 0.1},
        {"step": 8, "eval/loss": 1.5},  # lowest, but its checkpoint was not kept
        {"step": 12, "eval/loss": 2.5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert best_eval_step(path, [4, 12]) == 4
    assert best_eval_step(path, [4, 8, 12]) == 8
    assert best_eval_step(path, [5]) is None
    assert best_eval_step(tmp_path / "missing.jsonl", [4]) is None


def test_load_model_takes_the_best_checkpoint_when_asked(trained_run, tmp_path):
    from train.saved_model import load_model

    assert TRAINED_RUN_SETTINGS == {"train.num_steps": 8, "train.eval_every": 4}
    workdir = shutil.copytree(trained_run.workdir, tmp_path / "run")
    # As if the run had overfitted: step 8's eval loss is the worst.
    metrics = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for row in rows:
        if row["step"] == 8 and "eval/loss" in row:
            row["eval/loss"] = 99.0
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))

    before = sorted(p.name for p in workdir.rglob("*"))
    latest = load_model(workdir, which="latest")
    best = load_model(workdir, which="best")
    assert (latest.step, best.step) == (8, 4)
    differs = jax.tree.map(lambda a, b: bool((a != b).any()), latest.params, best.params)
    assert any(jax.tree.leaves(differs))
    assert best.tokenizer.vocab_size == latest.tokenizer.vocab_size
    with pytest.raises(ValueError, match="'latest' or 'best'"):
        load_model(workdir, which="newest")
    # Reading a model writes nothing into the training workdir.
    assert sorted(p.name for p in workdir.rglob("*")) == before
