"""Sharded pretraining steps equal the single-device step; parameters sit where the rules say."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig, get_preset
from tests.helpers import build_training, mesh_of, random_lm_batch, single_device_mesh
from train.pretrain_step import StepConfig

# 8 heads and 8 kv heads so that tensor=8 divides them.
WIDE = ModelConfig(n_heads=8, d_model=64, d_ff=128)
MESHES = [
    (dict(data=8), WIDE),
    (dict(data=2, fsdp=4), WIDE),
    (dict(data=2, fsdp=2, tensor=2), get_preset("tiny-llama", scan_layers=True)),
    (dict(tensor=8, data=1), WIDE),
]


_REFERENCE = {}


def _single_device_reference(cfg):
    """The single-device run of `cfg`, computed once per config."""
    if cfg not in _REFERENCE:
        state, _, losses = _run_steps(cfg, single_device_mesh())
        _REFERENCE[cfg] = (jax.tree.map(np.asarray, state.params), losses)
    return _REFERENCE[cfg]


def _run_steps(cfg, mesh, steps=2, step_cfg=StepConfig()):
    step, state, shardings = build_training(cfg, mesh, step_cfg=step_cfg)
    losses = []
    for i in range(steps):
        batch = random_lm_batch(i, batch=8, length=16, vocab=cfg.vocab_size)
        state, metrics = step(state, batch, jax.random.key(7))
        losses.append(float(metrics["loss"]))
    return state, shardings, losses


@pytest.mark.parametrize("mesh_shape, cfg", MESHES, ids=[str(m) for m, _ in MESHES])
def test_sharded_step_matches_single_device(mesh_shape, cfg):
    mesh = mesh_of(mesh_shape)
    ref_params, ref_losses = _single_device_reference(cfg)
    state, _, losses = _run_steps(cfg, mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # Equal up to float32 reduction order: Adam divides by sqrt(v), so a last-bit difference
    # in a small gradient moves a parameter by a few 1e-6 (seen: 4.8e-6 with tensor=8).
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(ref_params)
    ):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=str(path)
        )


def test_parameter_shardings_follow_the_rules():
    cfg = get_preset("tiny-llama", scan_layers=True)
    mesh = mesh_of(dict(data=2, fsdp=2, tensor=2))
    step, state, _ = build_training(cfg, mesh)
    state, _ = step(state, random_lm_batch(0, 8, 16, cfg.vocab_size), jax.random.key(0))
    params = state.params
    blocks = params["decoder"]["blocks"]
    # Scanned layers carry a leading, unsharded "layers" axis.
    expected = {
        "query": (blocks["attn"]["query"], P(None, "fsdp", "tensor", None)),
        "key": (blocks["attn"]["key"], P(None, "fsdp", "tensor", None)),
        "out": (blocks["attn"]["out"], P(None, "tensor", None, "fsdp")),
        "gate": (blocks["mlp"]["gate"], P(None, "fsdp", "tensor")),
        "down": (blocks["mlp"]["down"], P(None, "tensor", "fsdp")),
        "embedding": (params["embed"]["embedding"], P("tensor", "fsdp")),
        "lm_head": (params["lm_head"], P("fsdp", "tensor")),
        "norm": (params["decoder"]["final_norm"]["scale"], P(None)),
    }
    for name, (array, spec) in expected.items():
        assert array.sharding.spec == spec, name
    # The placement is real: each device holds 1/4 of the query kernel (fsdp x tensor).
    query = blocks["attn"]["query"]
    n_layers, d, g, hd = query.shape
    assert query.addressable_shards[0].data.shape == (n_layers, d // 2, g // 2, hd)
    # Adam moments live exactly where their parameters live.
    mu = state.opt_state[1][0].mu
    assert mu["decoder"]["blocks"]["attn"]["query"].sharding == query.sharding
    assert state.step.sharding.spec == P()


def test_gradient_accumulation_equals_full_batch():
    cfg = get_preset("tiny")
    mesh = mesh_of(dict(data=2, fsdp=2, tensor=2))
    full, _, full_losses = _run_steps(cfg, mesh, steps=2)
    accum, _, accum_losses = _run_steps(cfg, mesh, steps=2, step_cfg=StepConfig(num_microbatches=2))
    np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(accum.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_microbatches_must_divide_batch():
    cfg = get_preset("tiny")
    step, state, _ = build_training(
        cfg, single_device_mesh(), step_cfg=StepConfig(num_microbatches=3)
    )
    with pytest.raises(ValueError, match="not divisible by num_microbatches=3"):
        step(state, random_lm_batch(0, 8, 16, cfg.vocab_size), jax.random.key(0))
