"""The persistent-MLP probe (`experiments/bench/persistent_mlp.py`, BENCHMARKS.md change 89):
it lowers for CUDA, refuses shapes it does not tile or whose programs would not all be
resident at once (the barrier would wait forever), is patched into exactly the one-token
decoding steps and restored after, and on a Hopper GPU gives the reference's values.

Mosaic GPU's interpreter has no global semaphores, so on the CPU the kernel is lowered,
not run.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from experiments.bench import persistent_mlp as pm
from model import layers
from model.config import get_preset
from model.sampling import SamplingConfig, sample
from model.transformer import LanguageModel
from tests.helpers import lower_for_cuda

D, F = 128, 512  # 8 programs: up 8 column blocks, down 2 column blocks x 4 input slices


def _weights(d=D, f=F):
    ks = jax.random.split(jax.random.key(0), 5)
    return (
        jax.random.normal(ks[0], (d,), jnp.bfloat16),
        (jax.random.normal(ks[1], (d, f)) / d**0.5).astype(jnp.bfloat16),
        (jax.random.normal(ks[2], (f,)) * 0.1).astype(jnp.bfloat16),
        (jax.random.normal(ks[3], (f, d)) / f**0.5).astype(jnp.bfloat16),
        (jax.random.normal(ks[4], (d,)) * 0.1).astype(jnp.bfloat16),
    )


def test_lowers_for_cuda_with_a_grid_barrier():
    lowered = lower_for_cuda(jax.jit(pm.persistent_mlp), *_weights())
    assert lowered.as_text().count("mosaic_gpu") >= 1


def test_shapes_it_does_not_tile_are_refused():
    with pytest.raises(ValueError, match="do not tile"):
        pm.persistent_mlp(*_weights(f=320))  # 5 up programs for 2 down column blocks
    with pytest.raises(ValueError, match="do not fit"):  # every program must be resident
        pm.persistent_mlp(*_weights(f=64 * 256))


def _kernels_in_sampler(model, params):
    """The persistent kernels a greedy sampler traces (each takes one global semaphore)."""
    prompt = jnp.zeros((1, 8), jnp.int32)
    greedy = SamplingConfig(max_new_tokens=3, temperature=0)
    fn = lambda p: sample(model, p, prompt, jnp.full((1,), 8), jax.random.key(0), cfg=greedy)  # noqa: E731
    return str(jax.make_jaxpr(fn)(params)).count("get_global")


def test_patch_takes_only_decoding_steps_and_is_undone():
    cfg = get_preset("tiny", d_model=D, d_ff=F, n_layers=2, dtype="bfloat16")
    model = LanguageModel(cfg)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    original = layers.MLP.__call__
    assert _kernels_in_sampler(model, params) == 0  # on the CPU: XLA's products only
    with pm.patched_model(bk=64, slots=2):
        # one kernel a layer, in the decoding loop's body (the prompt's pass keeps XLA's)
        assert _kernels_in_sampler(model, params) == cfg.n_layers
    assert layers.MLP.__call__ is original


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="runs compiled, on a Hopper GPU")
def test_equals_the_reference_on_the_gpu():
    args = _weights(2048, 8192)
    ref = pm.mlp_reference(*args).astype(jnp.float32)
    out = jax.jit(pm.persistent_mlp)(*args).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))) < 2e-2
