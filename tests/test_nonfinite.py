"""A non-finite loss stops the run (or is skipped and counted) and never reaches a checkpoint."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from model.config import get_preset
from tests.helpers import build_training, random_lm_batch, single_device_mesh
from tests.run_helpers import char_config
from train import data_source, loop
from train.gradients import keep_if, select_branch, select_leaves
from train.metrics_writer import read_metrics
from train.pretrain import train


def test_step_skips_a_nonfinite_update():
    cfg = get_preset("tiny")
    step, state, _ = build_training(cfg, single_device_mesh())
    batch = random_lm_batch(0, 4, 16, cfg.vocab_size)
    batch["weights"][0, 3] = np.nan
    before = jax.tree.map(np.asarray, state.params)
    state, metrics = step(state, batch, jax.random.key(0))
    assert float(metrics["nonfinite_loss"]) == 1.0 and float(metrics["nonfinite_grad"]) == 1.0
    assert int(state.step) == 1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("select", [select_leaves, select_branch, keep_if])
def test_each_selection_keeps_the_old_tree_unless_ok(select):
    """Both forms of the skip (and the one this platform uses) pick whole trees alike."""
    new = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "b": (np.float32(7.0),)}
    old = jax.tree.map(lambda x: np.full_like(x, -1.0), new)
    for ok, want in ((True, new), (False, old)):
        got = jax.jit(select)(np.bool_(ok), new, old)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)


@pytest.fixture
def poison_step_6(monkeypatch):
    """Makes the training batch of step 6 carry a NaN loss weight (the sixth batch
    position: the stage also reads the first one ahead, to compile its step)."""
    original = data_source.DataSource.next_train_batch
    positions = []

    def next_train_batch(self):
        state = self.train_iter.get_state()
        position = (state["epoch"], state["batch"])
        if position not in positions:
            positions.append(position)
        batch = original(self)
        if len(positions) >= 6 and position == positions[5]:
            weights = np.asarray(batch["weights"]).copy()
            weights[0, 0] = np.nan
            batch["weights"] = jax.device_put(weights, batch["weights"].sharding)
        return batch

    monkeypatch.setattr(data_source.DataSource, "next_train_batch", next_train_batch)


def test_nonfinite_loss_stops_the_run_before_any_later_checkpoint(tmp_path, poison_step_6):
    config = char_config(tmp_path, **{"train.num_steps": 12})
    with pytest.raises(loop.NonFiniteError, match="non-finite loss and grad at step 6"):
        train(config, tmp_path / "run")
    checkpoints = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == [4]


def test_skip_nonfinite_counts_and_carries_on(tmp_path, poison_step_6):
    config = char_config(tmp_path, **{"train.num_steps": 8, "train.skip_nonfinite": True})
    final = train(config, tmp_path / "run")
    assert final["train/skipped_steps"] == 1
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in records if "train/loss" in r] == [0] * 5 + [1] * 3


def test_an_implicit_copy_to_the_devices_inside_a_step_is_an_error(tmp_path, monkeypatch):
    """The loop runs each step under a transfer guard: a numpy operand handed to a compiled
    step (a blocking copy every step) fails loudly instead of slowing the run."""
    real_run = loop.run

    def run_with_a_leaky_step(stage, cfg):
        step = stage.step
        scale = jax.jit(lambda x, s: x * s)

        def leaky(state, batch, rng):
            state, metrics = step(state, batch, rng)
            return state, {**metrics, "loss": scale(metrics["loss"], np.float32(1.0))}

        stage.step = leaky
        return real_run(stage, cfg)

    monkeypatch.setattr(loop, "run", run_with_a_leaky_step)
    with pytest.raises(jax.errors.JaxRuntimeError, match="Disallowed host-to-device transfer"):
        train(char_config(tmp_path, **{"train.num_steps": 2}), tmp_path / "run")
