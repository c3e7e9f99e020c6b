"""Small builders shared by the tests."""

import jax
import numpy as np

from model.transformer import LanguageModel
from train import sharding
from train.optim import OptimConfig, make_optimizer
from train.pretrain_step import StepConfig, make_pretrain_step
from train.state import create_train_state, init_fn


def random_lm_batch(seed: int, batch: int, length: int, vocab: int, packed: bool = True) -> dict:
    """Random tokens; with `packed`, each row holds two documents and some padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length + 1))
    out = {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "weights": np.ones((batch, length), np.float32),
    }
    if packed:
        cut = rng.integers(2, length - 3, batch)
        pad = rng.integers(0, 3, batch)
        idx = np.arange(length)
        segments = np.where(idx < cut[:, None], 1, 2)
        segments = np.where(idx >= length - pad[:, None], 0, segments).astype(np.int32)
        positions = np.where(idx < cut[:, None], idx, idx - cut[:, None]).astype(np.int32)
        out.update(segment_ids=segments, positions=positions)
        out["weights"] = (segments > 0).astype(np.float32)
    return out


def build_training(
    cfg,
    mesh,
    optim=OptimConfig(total_steps=100, warmup_steps=5),
    step_cfg=StepConfig(),
    tx=None,
):
    """(jitted step, state, state shardings) for a LanguageModel on `mesh`."""
    model = LanguageModel(cfg)
    tx = tx or make_optimizer(optim)
    state, shardings = create_train_state(init_fn(model), tx, mesh, jax.random.key(0))
    step = sharding.jit_step(make_pretrain_step(model, tx, step_cfg), shardings, mesh)
    return step, state, shardings


def single_device_mesh():
    return sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])
