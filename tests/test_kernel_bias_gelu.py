"""The fused bias + GELU kernels (Pallas, interpreted on CPU) equal XLA's bias add and
tanh-GELU: values and gradients (bias gradient included), sharded, inside the model; and
they lower to Triton for the GPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import get_preset
from model.kernels import bias_gelu as bg
from model.transformer import LanguageModel
from tests.helpers import (
    assert_trees_close,
    lm_value_and_grad,
    mesh_of,
    random_lm_batch,
    triton_kernels,
    verify_triton_ir,
)
from train import sharding

# Blocks smaller than the inputs: a last row block and a last column block part full,
# and in the backward pass several row blocks per program (2 programs).
SMALL_BLOCKS = bg.Tuning(rows=4, cols=32, warps=4, bwd_programs=2)


def _inputs(shape=(3, 7, 96), dtype="float32", seed=0):
    """h [*shape] (21 rows, 96 columns: not multiples of the small blocks), b, loss weights."""
    k = jax.random.split(jax.random.key(seed), 3)
    h = (2.0 * jax.random.normal(k[0], shape)).astype(dtype)
    b = 0.5 * jax.random.normal(k[1], shape[-1:])
    return h, b, jax.random.normal(k[2], shape)


def _definition(h, b):
    """The definition: GELU's tanh form of h + b, in float32, cast to h's dtype."""
    return jax.nn.gelu(h.astype(jnp.float32) + b, approximate=True).astype(h.dtype)


def _value_and_grad(fn, w):
    loss = lambda h, b: jnp.sum(fn(h, b).astype(jnp.float32) * w)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize(
    "dtype, tuning, tol",
    [
        ("float32", SMALL_BLOCKS, dict(rtol=1e-5, atol=1e-5)),
        ("float32", bg.DEFAULT_TUNING, dict(rtol=1e-5, atol=1e-5)),
        ("bfloat16", SMALL_BLOCKS, dict(rtol=1e-2, atol=1e-2)),
        # on a GPU: the approximate tanh
        ("bfloat16", bg.DEFAULT_TUNING, dict(rtol=1e-2, atol=1e-2)),
    ],
    ids=["float32-small", "float32-default", "bfloat16-small", "bfloat16-default"],
)
def test_values_and_gradients_match_the_definition(dtype, tuning, tol):
    h, b, w = _inputs(dtype=dtype)
    y = bg.bias_gelu(h, b, tuning=tuning)
    assert y.dtype == h.dtype and y.shape == h.shape
    assert_trees_close(y, _definition(h, b), **tol)
    got = _value_and_grad(lambda h, b: bg.bias_gelu(h, b, tuning=tuning), w)(h, b)
    want = _value_and_grad(_definition, w)(h, b)
    assert_trees_close(got, want, **tol)


def test_large_inputs_saturate_without_overflow():
    """|h + b| up to 1e4: the cube overflows nothing that matters, tanh saturates to +-1,
    so gelu(z) = z or 0 and the slope 1 or 0, never NaN."""
    h = jnp.asarray([[-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4, 2.0]])
    b = jnp.zeros(8)
    w = jnp.ones_like(h)
    got = _value_and_grad(lambda h, b: bg.bias_gelu(h, b, tuning=SMALL_BLOCKS), w)(h, b)
    want = _value_and_grad(_definition, w)(h, b)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))
    assert_trees_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mesh_shape, batch",
    [(dict(data=2, fsdp=2, tensor=2), 4), (dict(data=8), 3)],
    ids=["data2-fsdp2-tensor2", "data8-batch3-unsplittable"],
)
def test_sharded_matches_the_definition(mesh_shape, batch):
    """Rows split over the batch axes and columns over the tensor axis (or whole where
    the mesh does not divide them); the bias gradient summed over all devices' rows."""
    h, b, w = _inputs(shape=(batch, 5, 64), seed=3)
    want = _value_and_grad(_definition, w)(h, b)
    step = _value_and_grad(lambda h, b: bg.bias_gelu(h, b, tuning=SMALL_BLOCKS), w)
    mesh = mesh_of(mesh_shape)
    with sharding.mesh_context(mesh):
        if batch % 4 == 0:
            h = jax.device_put(h, sharding.batch_sharding(mesh))
        got = step(h, b)
        assert "shard_map" in str(step.trace(h, b).jaxpr)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mesh_shape, use_bias",
    [(None, True), (dict(data=2, fsdp=2, tensor=2), True), (None, False)],
    ids=["1", "sharded-8", "1-no-bias"],
)
def test_language_model_kernel_equals_xla(mesh_shape, use_bias):
    """A GPT-2-like model (GELU, with biases or, as gpt-1.3b, without): same parameters,
    same logits and gradients."""
    cfg = get_preset("tiny", use_bias=use_bias)
    tokens = jnp.asarray(random_lm_batch(0, batch=4, length=12, vocab=cfg.vocab_size)["inputs"])
    xla = LanguageModel(cfg.replace(activation_impl="xla"))
    kernel = LanguageModel(cfg.replace(activation_impl="pallas"))
    shapes = jax.eval_shape(xla.init, jax.random.key(0), tokens)["params"]
    assert jax.eval_shape(kernel.init, jax.random.key(0), tokens)["params"] == shapes
    rng = np.random.default_rng(0)
    params = jax.tree.map(  # non-zero biases, so that their gradients matter
        lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), nn.meta.unbox(shapes)
    )
    want = lm_value_and_grad(xla, tokens)(params)
    if mesh_shape is None:
        got = lm_value_and_grad(kernel, tokens)(params)
    else:
        with sharding.mesh_context(mesh_of(mesh_shape)):
            got = lm_value_and_grad(kernel, tokens)(params)
    # float32 throughout: XLA's bias add and the kernel's differ only in rounding
    assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match=r"bias has shape \(64,\), expected \(48,\)"):
        bg.bias_gelu(jnp.zeros((4, 48)), jnp.zeros(64))
    with pytest.raises(ValueError, match="floating"):
        bg.bias_gelu(jnp.zeros((4, 48), jnp.int32), jnp.zeros(48))


def test_lowers_to_verified_triton_at_gpt2_size():
    """One Triton kernel each way at GPT-2 124M's batch-64 MLP, with the grids the
    default tuning asks for: forward one program per block; backward 2 programs per SM
    (132 without a GPU) spread over the 3 column blocks, each looping over row blocks."""
    h = jax.ShapeDtypeStruct((64, 1024, 3072), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((3072,), jnp.float32)

    def loss(h, b):
        return jnp.sum(bg.bias_gelu(h, b, interpret=False).astype(jnp.float32) ** 2)

    kernels = triton_kernels(jax.jit(jax.grad(loss, argnums=(0, 1))), h, b)
    tuning = bg.DEFAULT_TUNING
    col_blocks = 3072 // tuning.cols
    assert sorted((k.name, k.grid) for k in kernels) == [
        ("bias_gelu_bwd", (2 * 132 // col_blocks, col_blocks, 1)),
        ("bias_gelu_fwd", (64 * 1024 // tuning.rows, col_blocks, 1)),
    ]
    verify_triton_ir(kernels)


@pytest.mark.parametrize("dtype, approx", [("bfloat16", True), ("float32", False)])
def test_the_approximate_tanh_only_for_16_bit_outputs(dtype, approx):
    """bf16 rounds away more than tanh.approx.f32 errs (about 2^-11 relative), so both
    kernels use it there; float32 keeps libdevice's accurate tanh."""
    h = jax.ShapeDtypeStruct((64, 3072), jnp.dtype(dtype))
    b = jax.ShapeDtypeStruct((3072,), jnp.float32)

    def loss(h, b):
        return jnp.sum(bg.bias_gelu(h, b, interpret=False).astype(jnp.float32) ** 2)

    kernels = triton_kernels(jax.jit(jax.grad(loss, argnums=(0, 1))), h, b)
    assert sorted(k.name for k in kernels) == ["bias_gelu_bwd", "bias_gelu_fwd"]
    assert all((b"tanh.approx.f32" in k.ttir) == approx for k in kernels)
