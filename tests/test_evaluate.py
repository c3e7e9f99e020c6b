"""Evaluating a checkpoint on prepared text (train/evaluate.py, experiments/evaluate.py)
gives what the training loop's own evaluation logged, and refuses data it cannot score."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from data.prepare import prepare
from tests.run_helpers import REPO, TRAINED_RUN_SETTINGS, cpu_env
from train.evaluate import evaluate_checkpoint
from train.metrics_writer import read_metrics


def test_equals_the_evaluation_logged_in_training(trained_run):
    """The run evaluated 2 batches of 8 rows of 32 tokens at its last step."""
    logged = [r for r in read_metrics(trained_run.workdir / "metrics.jsonl") if "eval/loss" in r]
    got = evaluate_checkpoint(
        trained_run.workdir, trained_run.prepared, seq_len=32, batch_size=8, max_batches=2
    )
    assert got["step"] == logged[-1]["step"] == TRAINED_RUN_SETTINGS["train.num_steps"]
    for key in ("eval/loss", "eval/perplexity", "eval/bits_per_byte"):
        assert got[key] == pytest.approx(logged[-1][key], rel=1e-5), key
    whole = evaluate_checkpoint(trained_run.workdir, trained_run.prepared, seq_len=32)
    assert whole["eval/loss"] != got["eval/loss"]  # every batch of the split, not 2
    # the partial pass says it is one (an estimate); the whole one says so too
    assert got["scored"].startswith("first 2 of ") and got["scored"].endswith(" batches")
    assert whole["scored"] == "whole split"


def test_refuses_data_of_another_tokenizer_and_impossible_rows(trained_run, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("only a few letters here\n" * 200 + "and some more text\n" * 200)
    other = tmp_path / "other"
    prepare(f"text:{text}:val_tail=0.2", other, tokenizer="char", num_workers=1, progress=False)
    with pytest.raises(ValueError, match="tokenized with another tokenizer"):
        evaluate_checkpoint(trained_run.workdir, other)
    with pytest.raises(ValueError, match="has no split 'test'"):
        evaluate_checkpoint(trained_run.workdir, trained_run.prepared, split="test")
    with pytest.raises(ValueError, match="exceeds the model's learned positions"):
        evaluate_checkpoint(trained_run.workdir, trained_run.prepared, seq_len=33)


def test_the_command_prints_json_and_explains_mistakes(trained_run, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "experiments.evaluate", f"--workdir={trained_run.workdir}"]
        return subprocess.run(
            [*command, *args], env=cpu_env(), cwd=REPO, capture_output=True, text=True, timeout=300
        )

    done = run(f"--data={trained_run.prepared}", "--seq_len=32", "--max_batches=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["seq_len"] == 32
    missing = run(f"--data={tmp_path / 'nothing'}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert str(tmp_path / "nothing") in missing.stderr.splitlines()[-1]
