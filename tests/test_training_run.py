"""The training loop end to end: exact resume, SIGTERM, bad input, corrupt checkpoints."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.run_helpers import (
    TRAINED_RUN_SETTINGS,
    overrides,
    prepare_char_corpus,
    pretrain_command,
    run_pretrain,
)
from train.metrics_writer import read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    return prepare_char_corpus(tmp_path_factory.mktemp("corpus"))


def _losses(workdir: Path) -> dict[int, float]:
    records = read_metrics(workdir / "metrics.jsonl")
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _wait_for_checkpoint(workdir: Path, step: int, process, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (workdir / "checkpoints" / str(step)).is_dir():
        if process.poll() is not None or time.time() > deadline:
            raise AssertionError(f"no checkpoint {step}: {process.communicate()[1][-2000:]}")
        time.sleep(0.05)


def test_resume_after_sigkill_is_bit_exact(corpus, tmp_path):
    args = overrides(*corpus, **{"train.num_steps": 24})
    full = run_pretrain(tmp_path / "full", args)
    assert full.returncode == 0, full.stderr[-3000:]

    command, env = pretrain_command(tmp_path / "killed", args)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_checkpoint(tmp_path / "killed", 8, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(_losses(tmp_path / "killed"))
    assert killed_at < 24, "the run finished before it could be killed"
    resumed = run_pretrain(tmp_path / "killed", args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr

    expected, got = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 25))
    assert got == expected  # every logged loss, bit for bit


def test_sigterm_saves_a_checkpoint_and_exits_4(corpus, tmp_path):
    """A stopped run is not a finished run: it saves, says so in one line and exits 4."""
    args = overrides(*corpus, **{"train.num_steps": 400, "train.checkpoint_every": 5})
    command, env = pretrain_command(tmp_path / "run", args)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_checkpoint(tmp_path / "run", 5, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 4, stderr[-3000:]
    assert "error: pretrain stopped by SIGTERM after step" in stderr
    assert "Traceback" not in stderr
    last_logged = max(_losses(tmp_path / "run"))
    steps = sorted(
        int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()
    )
    assert steps[-1] == last_logged < 400


def test_corrupt_latest_checkpoint_falls_back_to_previous(trained_run, tmp_path):
    workdir = shutil.copytree(trained_run.workdir, tmp_path / "run")
    # Truncate every file of the newest checkpoint's state, as a crash mid-write could.
    for path in (workdir / "checkpoints" / "8").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
    longer = overrides(
        trained_run.corpus, trained_run.prepared, **{**TRAINED_RUN_SETTINGS, "train.num_steps": 12}
    )
    result = run_pretrain(workdir, longer)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the checkpoint of step 8" in result.stderr and "unreadable" in result.stderr
    assert "resumed from step 4" in result.stderr
    assert max(_losses(workdir)) == 12


def test_workdir_of_another_experiment_is_refused_and_untouched(trained_run, tmp_path):
    workdir = shutil.copytree(trained_run.workdir, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    other = overrides(
        trained_run.corpus, trained_run.prepared, **TRAINED_RUN_SETTINGS, **{"model.d_model": 64}
    )
    result = run_pretrain(workdir, other)
    assert result.returncode == 2
    assert (
        "holds another experiment" in result.stderr and "model.d_model: 32 -> 64" in result.stderr
    )
    assert before == {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}


def test_bad_command_lines_are_explained(corpus, tmp_path):
    missing_parent = run_pretrain(tmp_path / "no" / "such" / "dir", overrides(*corpus))
    assert missing_parent.returncode == 2
    assert "parent directory" in missing_parent.stderr and "does not exist" in missing_parent.stderr

    unknown = run_pretrain(tmp_path / "a", [*overrides(*corpus), "--config.train.nonsense=1"])
    assert unknown.returncode != 0 and "nonsense" in unknown.stderr

    wrong_type = run_pretrain(tmp_path / "b", [*overrides(*corpus), "--config.train.num_steps=ten"])
    assert wrong_type.returncode != 0 and "num_steps" in wrong_type.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_outputs_of_a_run(trained_run):
    workdir, steps = trained_run.workdir, TRAINED_RUN_SETTINGS["train.num_steps"]
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, steps + 1))
    final_eval = [r for r in records if "eval/loss" in r][-1]
    assert final_eval["step"] == steps
    assert final_eval["eval/perplexity"] == pytest.approx(2.718281828 ** final_eval["eval/loss"])
    assert 0 < final_eval["eval/bits_per_byte"] < 8
    assert (workdir / "loss_curve.png").stat().st_size > 1000
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["train"]["num_steps"] == steps
