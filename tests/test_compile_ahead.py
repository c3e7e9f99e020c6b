"""The step compiled in the background while the state is created (train/launch.py,
CompiledAhead) is the step the loop runs, with the jitted step's results."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import single_device_mesh
from tests.run_helpers import char_config
from train import launch, loop, pretrain, sharding
from train.workdir import Workdir


def _doubler(mesh):
    rep = sharding.replicated(mesh)
    return sharding.jit_sharded(lambda x: x * 2, mesh, in_shardings=rep, out_shardings=rep)


def test_pretraining_runs_its_step_compiled_ahead_on_the_mesh(tmp_path):
    """On the 8 fake devices: the first batch peeked, the state abstracted and the key
    replicated exactly as the loop passes them, so the ahead-compiled executable runs."""
    config = char_config(tmp_path, **{"train.num_steps": 2})
    with Workdir(tmp_path / "run", config) as wd:
        stage = pretrain.build(config, wd.path)
        assert stage.mesh.size == jax.device_count() == 8
        key = loop.step_key(config.train.seed, stage.mesh)
        position = stage.batches.get_state()
        batch = next(stage.batches)
        assert stage.batches.get_state() != position  # the peek left the iterator in place
        copy = jax.tree.map(lambda a: a.copy(), stage.state)
        state, metrics = stage.step(stage.state, batch, key)
        assert stage.step.compiled is not None  # no fallback to compiling again
        jitted_state, jitted_metrics = stage.step.step(copy, batch, key)
    np.testing.assert_array_equal(metrics["loss"], jitted_metrics["loss"])
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(jitted_state.params)):
        np.testing.assert_array_equal(a, b)
        assert a.sharding == b.sharding


@pytest.mark.allow_compile_fallback
def test_arguments_unlike_the_promised_ones_compile_again(caplog):
    mesh = single_device_mesh()
    ahead = launch.CompiledAhead(
        _doubler(mesh), jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sharding.replicated(mesh))
    )
    with caplog.at_level(logging.WARNING, logger="train.launch"):
        out = ahead(jnp.arange(3, dtype=jnp.float32))
    assert ahead.compiled is None and "compiled for other arguments" in caplog.text
    np.testing.assert_array_equal(out, [0, 2, 4])
    np.testing.assert_array_equal(ahead(jnp.ones(3, jnp.float32)), [2, 2, 2])


def test_promised_arguments_run_the_compiled_executable():
    mesh = single_device_mesh()
    spec = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=sharding.replicated(mesh))
    ahead = launch.CompiledAhead(_doubler(mesh), spec)
    x = jax.device_put(jnp.arange(3, dtype=jnp.float32), sharding.replicated(mesh))
    np.testing.assert_array_equal(ahead(x), [0, 2, 4])
    assert ahead.compiled is not None and ahead.seconds > 0


def test_an_error_while_compiling_is_raised_by_the_first_call():
    mesh = single_device_mesh()
    rep = sharding.replicated(mesh)
    matmul = sharding.jit_sharded(lambda x: x @ x, mesh, in_shardings=rep, out_shardings=rep)
    ahead = launch.CompiledAhead(matmul, jax.ShapeDtypeStruct((3, 4), jnp.float32, sharding=rep))
    with pytest.raises(TypeError, match="dot_general"):
        ahead(jnp.ones((3, 4), jnp.float32))
