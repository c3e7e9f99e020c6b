"""The sweep command runs a grid and tabulates it; the sample command reads a checkpoint."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

from data.prepare import prepare
from tests.run_helpers import CONFIG, REPO, make_corpus, overrides, run_pretrain


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}


def test_sweep_runs_the_grid_and_writes_table_and_plot(tmp_path):
    corpus = make_corpus(tmp_path / "text")
    args = [a for a in overrides(corpus, tmp_path / "unused", **{"train.num_steps": 3})
            if not a.startswith("--config.data.dir")]
    command = [sys.executable, "-m", "experiments.sweep", f"--config={CONFIG}",
               f"--root={tmp_path / 'sweep'}", "--sweep.optim.lr=0.001,0.01",
               "--sweep.model.n_layers=1,2", *args]
    printed = subprocess.run([*command, "--print_only"], env=_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    lines = printed.stdout.strip().splitlines()
    assert len(lines) == 4 and all("experiments.pretrain" in line for line in lines)
    assert "--config.optim.lr=0.01" in lines[2] and "--config.model.n_layers=1" in lines[2]

    result = subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "sweep" / "sweep_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["optim.lr"], r["model.n_layers"]) for r in rows] == [
        ("0.001", "1"), ("0.001", "2"), ("0.01", "1"), ("0.01", "2")]
    assert all(float(r["eval/loss"]) > 0 for r in rows)
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000
    # The points share one prepared data directory.
    assert (tmp_path / "sweep" / "data" / "meta.json").exists()


def test_sample_command_reads_the_latest_checkpoint(tmp_path):
    corpus = make_corpus(tmp_path / "text")
    prepare(f"text:{corpus}", tmp_path / "prepared", tokenizer="char", vocab_size=128,
            num_workers=1, progress=False)
    workdir = tmp_path / "run"
    trained = run_pretrain(workdir, overrides(corpus, tmp_path / "prepared",
                                              **{"train.num_steps": 4}))
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = subprocess.run(
        [sys.executable, "-m", "experiments.sample", f"--workdir={workdir}", "--prompt=def ",
         "--num_samples=3", "--max_new_tokens=12", "--temperature=0"],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint step 4" in result.stdout
    samples = result.stdout.split("--- sample ")[1:]
    assert len(samples) == 3
    assert len(set(samples[i].split("\n", 1)[1] for i in range(3))) == 1  # greedy: all equal

    missing = subprocess.run([sys.executable, "-m", "experiments.sample",
                              f"--workdir={tmp_path / 'nothing'}"], env=_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "config.json does not exist" in missing.stderr
