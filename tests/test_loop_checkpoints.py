"""The loop's checkpoints across interruptions: a signal in the last step, a resume from a
checkpoint at or past the last step, keep-best after a restart, counts that span resumes.

A toy stage (one SGD parameter, batches numbered 1, 2, ...) keeps each case to a second.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import single_device_mesh
from train import loop
from train.state import TrainState
from train.workdir import config_differences, differences_message

TX = optax.sgd(0.1)


class Numbered:
    """Batch i holds the number i; its position is the count read so far."""

    def __init__(self):
        self.read = 0

    def __next__(self) -> dict:
        self.read += 1
        return {"x": np.full((8,), float(self.read), np.float32)}

    def get_state(self) -> dict:
        return {"read": self.read}

    def set_state(self, state: dict) -> None:
        self.read = state["read"]


@jax.jit
def _sgd_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    grads = {"w": jnp.ones((4,)) * jnp.mean(batch["x"])}
    updates, opt_state = TX.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new, {"loss": jnp.mean(batch["x"])}


def toy_stage(directory: Path, sigterm_at=None, evals=(), nonfinite_at=None) -> loop.Stage:
    """A stage whose step sends this process SIGTERM after step `sigterm_at`, reports a
    skipped non-finite step at `nonfinite_at`, and whose evaluations return `evals` in turn."""
    params = {"w": jnp.zeros((4,))}
    state = TrainState(jnp.zeros((), jnp.int32), params, TX.init(params))
    losses = iter(evals)

    def step(state, batch, rng):
        state, metrics = _sgd_step(state, batch)
        done = int(state.step)
        metrics["nonfinite_loss"] = float(done == nonfinite_at)
        if done == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return state, metrics

    return loop.Stage(
        name="toy",
        directory=directory,
        state=jax.device_put(state),
        step=step,
        batches=Numbered(),
        mesh=single_device_mesh(),
        meta={"config": {}, "tokenizer": {}},
        evaluate=(lambda state: {"eval/loss": next(losses)}) if evals else None,
    )


def _kept(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in (directory / "checkpoints").iterdir() if p.name.isdigit())


def _config(num_steps: int, **fields) -> loop.LoopConfig:
    return loop.LoopConfig(
        **{"checkpoint_every": 2, "eval_every": 100, **fields}, num_steps=num_steps
    )


def test_a_signal_during_the_last_step_finishes_the_stage(tmp_path):
    """Saving it as an unfinished checkpoint would leave a stage whose final save can never
    be written (that step exists already)."""
    results = loop.run(toy_stage(tmp_path, sigterm_at=5), _config(5))
    assert results["train/loss"] == 5.0
    again = loop.run(toy_stage(tmp_path), _config(5))
    assert again == results and _kept(tmp_path) == [4, 5]


def test_an_unfinished_checkpoint_at_the_last_step_becomes_the_final_one(tmp_path):
    with pytest.raises(loop.Interrupted):
        loop.run(toy_stage(tmp_path, sigterm_at=4), _config(8))
    results = loop.run(toy_stage(tmp_path), _config(4))  # the run, shortened to step 4
    assert results["train/skipped_steps"] == 0 and _kept(tmp_path) == [2, 4]
    assert loop.run(toy_stage(tmp_path), _config(4)) == results  # finished now


def test_a_checkpoint_past_num_steps_is_refused_in_one_line(tmp_path):
    with pytest.raises(loop.Interrupted):
        loop.run(toy_stage(tmp_path, sigterm_at=4), _config(8))
    with pytest.raises(ValueError, match=r"of step 4, past train.num_steps=3: set"):
        loop.run(toy_stage(tmp_path), _config(3))
    assert _kept(tmp_path) == [2, 4]  # nothing lost


def test_keep_best_still_knows_the_best_checkpoint_after_a_restart(tmp_path):
    """Evaluations of 3.0, 1.0, 2.5 at steps 2, 4, 6, a restart, then 2.0, 2.0: step 4
    stays, beside the newest."""
    cfg = _config(10, eval_every=2, keep_checkpoints=1, keep_best=1)
    with pytest.raises(loop.Interrupted):
        loop.run(toy_stage(tmp_path, sigterm_at=6, evals=[3.0, 1.0, 2.5]), cfg)
    assert _kept(tmp_path) == [4, 6]
    loop.run(toy_stage(tmp_path, evals=[2.0, 2.0]), cfg)
    assert _kept(tmp_path) == [4, 10]


def test_the_final_checkpoint_is_ranked_by_its_evaluation(tmp_path):
    cfg = _config(4, eval_every=2, keep_checkpoints=1, keep_best=1)
    loop.run(toy_stage(tmp_path, evals=[3.0, 1.0]), cfg)
    assert _kept(tmp_path) == [4]  # the last is the best: step 2 need not stay


def test_skipped_steps_are_counted_across_a_resume(tmp_path):
    cfg = _config(6, skip_nonfinite=True)
    with pytest.raises(loop.Interrupted):
        loop.run(toy_stage(tmp_path, sigterm_at=4, nonfinite_at=2), cfg)
    assert loop.run(toy_stage(tmp_path), cfg)["train/skipped_steps"] == 1


def test_a_longer_run_may_not_stretch_the_schedule_of_one_half_done():
    """optim.total_steps=0 spans train.num_steps: more steps would change the learning rate
    of every step still to come. With the old length written out, it resumes."""
    old = {"sft": {"train": {"num_steps": 10}, "optim": {"total_steps": 0}}}
    longer = {"sft": {"train": {"num_steps": 20}, "optim": {"total_steps": 0}}}
    same_schedule = {"sft": {"train": {"num_steps": 20}, "optim": {"total_steps": 10}}}
    ignore = ("train.num_steps",)
    diffs = config_differences(old, longer, ignore)
    assert diffs == ["sft.optim.total_steps: 10 -> 20"]
    assert "set optim.total_steps to its old value" in differences_message("d", diffs)
    assert config_differences(old, same_schedule, ignore) == []
