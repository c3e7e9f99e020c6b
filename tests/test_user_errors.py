"""The faults and bad inputs a real user hits: one line naming the problem and what to do,
a documented exit status (experiments/cli.py), and nothing written before is lost."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from experiments import cli
from experiments.configs.stdlib_tiny import get_config
from model.config import get_preset
from tests.helpers import build_training, random_lm_batch, single_device_mesh
from tests.run_helpers import CONFIG, REPO, char_config, cpu_env
from train import loop
from train.checkpoint import Checkpointer, CheckpointError
from train.optim import OptimConfig
from train.pretrain import train
from train.workdir import Workdir, WorkdirBusy, WorkdirError


def _run(*args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        env=cpu_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_error(result, status: int, *fragments: str) -> None:
    assert result.returncode == status, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-2000:])


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--config.train.no_such_field=1"], ["unknown config field 'train.no_such_field'"]),
        # with --config given, ml_collections applies overrides while parsing, not at import
        ([f"--config={CONFIG}", "--config.no_such_field=1"], ["'no_such_field'", "optim, "]),
        ([f"--config={CONFIG}", "--config.train.num_steps=many"], ["num_steps", "'many'"]),
        (["--config=/nonexistent/config.py"], ["/nonexistent/config.py"]),
        (["--config=experiments/configs"], ["'experiments/configs' is a directory"]),
        (["--config=experiments/configs/common.py"], ["common.py' defines no get_config()"]),
        (["--config.train.eval_every=0"], ["train.eval_every must be >= 1"]),
        (["--config.train.global_batch_size=0"], ["train.global_batch_size must be >= 1"]),
        (["--config.optim.lr=nan"], ["optim.lr must be a finite number > 0"]),
    ],
)
def test_config_mistakes_are_one_line_and_write_nothing(tmp_path, args, fragments):
    workdir = tmp_path / "run"
    result = _run("experiments.pretrain", f"--workdir={workdir}", *args)
    _one_line_error(result, cli.EXIT_BAD_INPUT, *fragments)
    assert not workdir.exists()  # validated before config.json (or anything) is written


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["experiments.sweep", "--sweep.optim.lr=0.1", "--grid=3"], ["flag 'grid'"]),
        (["experiments.sweep", "--sweep.optim.lr"], ["--sweep.FIELD=v1,v2"]),
        (["experiments.sweep", "--sweep.optim.no_such=1,2"], ["'optim.no_such'", "lr, "]),
        (["experiments.sweep", "--sweep.optim.lr=0.1,fast"], ["optim.lr", "a number", "'fast'"]),
        (["experiments.sweep", "--sweep.optim.lr=0.1", "--config.train.nope=1"], ["train.nope"]),
        (["experiments.convert", "import", "--no_such_flag=1"], ["flag 'no_such_flag'"]),
        (["experiments.convert", "import", "extra"], ["unexpected arguments ['extra']"]),
    ],
)
def test_sweep_and_convert_mistakes_are_one_line_and_write_nothing(tmp_path, args, fragments):
    """The sweep checks every point's fields and values before the first point runs."""
    root = tmp_path / "sweep"
    result = _run(*args, f"--root={root}" if args[0] == "experiments.sweep" else "--dtype=float32")
    _one_line_error(result, cli.EXIT_BAD_INPUT, *fragments)
    assert not root.exists()


def test_post_training_without_its_predecessor_is_one_line(tmp_path):
    for stage, missing in (("sft", "pretrain"), ("reward", "sft"), ("ppo", "sft")):
        result = _run(f"experiments.{stage}", f"--workdir={tmp_path}")
        _one_line_error(result, cli.EXIT_BAD_INPUT, f"{tmp_path / missing} holds no checkpoints")
    assert not (tmp_path / "posttrain_data").exists()  # nothing curated or mined first
    result = _run("experiments.dpo", f"--workdir={tmp_path / 'typo'}")
    _one_line_error(result, cli.EXIT_BAD_INPUT, "typo is not a pipeline directory", "sft")
    assert not (tmp_path / "typo").exists()


def test_pipeline_checks_every_stage_before_pretraining(tmp_path):
    result = _run(
        "experiments.pipeline", f"--workdir={tmp_path / 'p'}", "--config.dpo.train.num_steps=0"
    )
    _one_line_error(result, cli.EXIT_BAD_INPUT, "dpo: train.num_steps must be >= 1")
    assert not (tmp_path / "p" / "pretrain").exists()


def test_pipeline_checks_algorithms_and_evaluation_before_pretraining(tmp_path):
    from experiments import pipeline
    from experiments.configs import posttrain_tiny

    for field, value, fragment in (
        ("dpo.algorithm.beta", -1.0, "dpo: DPOConfig"),
        ("grpo.algorithm.loss_normalization", "tokens", "grpo: GRPOConfig"),
        ("ppo.algorithm.epochs", 0, "ppo: PPOConfig"),
        ("eval.batch_size", 0, "eval.batch_size must be >= 1"),
        ("pretrain_checkpoint", "bogus", "pretrain_checkpoint must be 'latest' or 'best'"),
        ("init_from", str(tmp_path), "is not a stage directory"),
    ):
        config = section = posttrain_tiny.get_config()
        *path, name = field.split(".")
        for part in path:
            section = section[part]
        section[name] = value
        with pytest.raises(ValueError, match=fragment):
            pipeline.validate(config)
    # a config of the other kind is named as such, with where it belongs
    with pytest.raises(ValueError, match="goes to experiments.pretrain"):
        pipeline.validate(get_config())
    with pytest.raises(ValueError, match="goes to experiments.pipeline"):
        train(posttrain_tiny.get_config(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_stage_directory_with_no_results_takes_the_corrected_config(tmp_path, caplog):
    """A first run that stopped on a mistake (a missing corpus, say) has written only its
    config: the corrected rerun replaces it. Once a run has results, the directory is
    that experiment's."""
    wrong, right = get_config(), get_config()
    wrong.data.corpus = "text:/no/such/file.txt"
    with Workdir(tmp_path / "run", wrong):
        pass
    with caplog.at_level("WARNING"), Workdir(tmp_path / "run", right):
        (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    assert "replacing it (data.corpus" in caplog.text
    with pytest.raises(WorkdirError, match="holds another experiment"):
        Workdir(tmp_path / "run", wrong).__enter__()


def test_a_batch_of_no_rows_is_named_as_such():
    from train import sharding

    with pytest.raises(ValueError, match="global batch size must be >= 1, got 0"):
        sharding.check_batch_size(0, single_device_mesh())


def test_a_reward_model_is_not_loaded_as_a_language_model(tmp_path, monkeypatch):
    from train import saved_model

    monkeypatch.setattr(saved_model, "read_latest_meta", lambda d: {"model_kind": "reward"})
    with pytest.raises(ValueError, match="holds a reward model, not a language model"):
        saved_model.load_model(tmp_path / "reward")


def test_a_busy_workdir_is_refused_naming_the_holder(tmp_path):
    config = get_config()
    with Workdir(tmp_path / "run", config):
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
            Workdir(tmp_path / "run", config).__enter__()
    assert cli.exit_status(WorkdirBusy("x")) == cli.EXIT_BUSY
    with Workdir(tmp_path / "run", config):  # released on exit (and by the kernel on death)
        pass


def test_a_workdir_that_is_a_file_is_refused_and_kept(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(WorkdirError, match="is a file, not a directory"):
        Workdir(a_file, get_config()).__enter__()
    assert a_file.read_text() == "mine"
    assert cli.exit_status(WorkdirError("x")) == cli.EXIT_BAD_INPUT


def test_a_workdir_that_cannot_be_created_is_refused_in_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(WorkdirError, match="cannot write to .*Read-only file system"):
        Workdir(tmp_path / "run", get_config()).__enter__()


def test_a_failed_background_save_stops_with_one_line(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path / "checkpoints")

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "check_for_errors", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*free disk space"):
        ckpt.check()
    assert cli.exit_status(CheckpointError("x")) == cli.EXIT_BAD_INPUT
    monkeypatch.undo()
    ckpt.close()


def test_a_nan_learning_rate_update_is_never_applied():
    cfg = get_preset("tiny")
    step, state, _ = build_training(cfg, single_device_mesh(), tx=optax.sgd(float("nan")))
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, random_lm_batch(0, 4, 16, cfg.vocab_size), jax.random.key(0))
    assert float(metrics["nonfinite_update"]) == 1.0 and float(metrics["nonfinite_grad"]) == 0.0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="optim.lr must be a finite number"):
        OptimConfig(lr=float("nan"), total_steps=10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("trained")
    config = char_config(root, **{"train.num_steps": 4, "train.checkpoint_every": 2})
    train(config, root / "run")
    return config, root / "run"


def test_all_checkpoints_unreadable_starts_from_scratch_keeping_history(trained, tmp_path, caplog):
    config, source = trained
    workdir = shutil.copytree(source, tmp_path / "run")
    rows_before = (workdir / "metrics.jsonl").read_text()
    for step_dir in (workdir / "checkpoints").iterdir():
        for f in step_dir.rglob("*"):
            if f.is_file():
                f.write_bytes(b"garbage")
    with caplog.at_level("WARNING"):
        train(config, workdir)
    assert "starting from scratch" in caplog.text
    kept = list(workdir.glob("metrics.before-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == rows_before
    assert len(list((workdir / "checkpoints.unreadable").iterdir())) == 2


def test_a_checkpoint_is_never_decoded_with_another_tokenizer(trained, tmp_path):
    """The prepared data folder is deleted and the corpus file changed in place: resuming
    would retrain the tokenizer; it is refused, naming both tokenizers."""
    config, source = trained
    config = config.copy_and_resolve_references()
    config.train.num_steps = 8  # continue the run
    workdir = shutil.copytree(source, tmp_path / "run")
    corpus, data_dir = Path(config.data.corpus.removeprefix("text:")), Path(config.data.dir)
    saved = {p: p.read_bytes() for p in corpus.iterdir()}
    shutil.copytree(data_dir, tmp_path / "data_backup")
    try:
        shutil.rmtree(data_dir)
        for i, path in enumerate(saved):
            path.write_text(f"abc cab {i} bca\n" * (100 + 40 * i))
        with pytest.raises(ValueError, match="another tokenizer"):
            train(config, workdir)
    finally:
        for path, data in saved.items():
            path.write_bytes(data)
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(tmp_path / "data_backup", data_dir)
    # Reading the model for sampling uses the tokenizer stored with the checkpoint.
    from train.saved_model import load_model

    assert load_model(workdir).tokenizer.vocab_size > 20


def test_sigterm_and_nonfinite_have_their_own_exit_statuses():
    assert cli.exit_status(loop.Interrupted("x")) == cli.EXIT_INTERRUPTED
    assert cli.exit_status(loop.NonFiniteError("x")) == cli.EXIT_NONFINITE
    assert cli.exit_status(RuntimeError("a bug")) is None


def test_an_override_is_checked_against_the_field_it_sets():
    from experiments import configs

    config = configs.load(str(REPO / "experiments" / "configs" / "stdlib_tiny.py"))
    fits = ("train.num_steps", "7"), ("optim.lr", "3e-4"), ("train.skip_nonfinite", "false")
    for field, value in fits:
        assert configs.override_problem(config, field, value) is None, field
    assert "takes an integer" in configs.override_problem(config, "train.num_steps", "2.5")
    assert "true or false" in configs.override_problem(config, "train.skip_nonfinite", "maybe")
    assert "unknown config field 'model.depth'" in configs.override_problem(config, "model.depth")
