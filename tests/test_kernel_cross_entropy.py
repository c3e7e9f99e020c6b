"""The cross-entropy kernels (Pallas, interpreted on CPU) equal the loss's definition on
masked logits: the target's logit and log Z, their gradients, sharded (vocabulary split over
the tensor axis), inside the pretraining and evaluation steps; and they lower to Triton."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import get_preset
from model.kernels import cross_entropy as ce
from model.transformer import LanguageModel
from tests.helpers import (
    assert_trees_close,
    mesh_of,
    one_pretraining_step,
    random_lm_batch,
    triton_kernels,
    verify_triton_ir,
)
from train import losses, sharding
from train.evaluate import make_eval_step

# Blocks smaller than the inputs: a last row block part full, a last column block past the
# padded vocabulary, several column blocks a row; groups of 8 lanes as on the GPU.
SMALL_BLOCKS = ce.Tuning(fwd_rows=2, fwd_cols=32, fwd_lanes=8, bwd_rows=4, bwd_cols=32)
V, VOCAB = 136, 130  # padded columns, real vocabulary (the last 6 columns are padding)


def _inputs(shape=(3, 7), dtype="float32", seed=0):
    """logits [*shape, V] (21 rows), targets below VOCAB, cotangents of both statistics."""
    k = jax.random.split(jax.random.key(seed), 4)
    logits = (3.0 * jax.random.normal(k[0], (*shape, V))).astype(dtype)
    targets = jax.random.randint(k[1], shape, 0, VOCAB)
    return logits, targets, jax.random.normal(k[2], shape), jax.random.normal(k[3], shape)


def _value_and_grad(fn, logits, targets, g_target, g_log_z):
    out, vjp = jax.vjp(lambda x: fn(x, targets), logits)
    return out, vjp((g_target, g_log_z))[0]


def _definition(x, t):
    return losses.reference_masked_statistics(x, t, VOCAB)


@pytest.mark.parametrize(
    "dtype, tuning, tol",
    [
        ("float32", SMALL_BLOCKS, dict(rtol=1e-5, atol=1e-5)),
        ("float32", ce.DEFAULT_TUNING, dict(rtol=1e-5, atol=1e-5)),
        ("float32", ce.Tuning(fwd_cols=32, fwd_lanes=32), dict(rtol=1e-5, atol=1e-5)),
        ("bfloat16", SMALL_BLOCKS, dict(rtol=2e-2, atol=2e-2)),
    ],
    ids=["float32-small", "float32-default", "float32-one-group-a-row", "bfloat16-small"],
)
def test_values_and_gradients_match_the_definition(dtype, tuning, tol):
    logits, *rest = _inputs(dtype=dtype)
    kernel = lambda x, t: ce.target_logit_and_log_z(x, t, VOCAB, tuning=tuning)  # noqa: E731
    got = _value_and_grad(kernel, logits, *rest)
    want = _value_and_grad(_definition, logits.astype(jnp.float32), *rest)
    assert got[1].dtype == logits.dtype
    assert_trees_close(got, want, check_dtype=False, **tol)
    dx = np.float32(got[1])
    assert np.all(dx[..., VOCAB:] == 0)  # the padding columns get no gradient


def test_extreme_logits_stay_finite():
    """Logits of +-1e4 and rows whose real columns are all equal: log Z is exact, the
    probabilities underflow to 0 rather than NaN, nothing overflows."""
    logits, targets, g_target, g_log_z = _inputs(shape=(2, 4), seed=1)
    logits = logits.at[0].set(1e4 * jnp.sign(logits[0])).at[1].set(-7.0)
    kernel = lambda x, t: ce.target_logit_and_log_z(x, t, VOCAB, tuning=SMALL_BLOCKS)  # noqa: E731
    got = _value_and_grad(kernel, logits, targets, g_target, g_log_z)
    want = _value_and_grad(_definition, logits, targets, g_target, g_log_z)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))
    assert_trees_close(got, want, check_dtype=False, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[0][1][1], -7.0 + np.log(VOCAB), rtol=1e-6)


@pytest.mark.parametrize(
    "mesh_shape, batch",
    [(dict(data=2, fsdp=2, tensor=2), 4), (dict(tensor=8), 3), (dict(data=8), 3)],
    ids=["data2-fsdp2-tensor2", "tensor8-vocab-split", "data8-batch3-unsplittable"],
)
def test_sharded_matches_the_definition(mesh_shape, batch):
    """Rows split over the batch axes, the vocabulary over the tensor axis (each device's
    statistics combined like flash-decoding's splits), or whole where the mesh does not
    divide them. With 8 vocabulary shards of 17 columns, the last holds padding only."""
    logits, *rest = _inputs(shape=(batch, 5), seed=3)
    want = _value_and_grad(_definition, logits, *rest)
    kernel = lambda x, t: ce.target_logit_and_log_z(x, t, VOCAB, tuning=SMALL_BLOCKS)  # noqa: E731
    run = jax.jit(lambda x, *r: _value_and_grad(kernel, x, *r))
    mesh = mesh_of(mesh_shape)
    with sharding.mesh_context(mesh):
        got = run(logits, *rest)
        assert "shard_map" in str(run.trace(logits, *rest).jaxpr)
    assert_trees_close(got, want, check_dtype=False, rtol=1e-5, atol=1e-5)


def _tiny(impl: str):
    """tiny preset with 250 real tokens: 6 padding columns in its 256-row head."""
    return get_preset("tiny", vocab_size=250, cross_entropy_impl=impl)


@pytest.mark.parametrize("mesh_shape", [dict(data=1), dict(data=2, fsdp=2, tensor=2)])
def test_training_step_with_the_kernel_equals_xla(mesh_shape):
    """One sharded pretraining step from the same state: same loss, same parameters after."""
    mesh, batch = mesh_of(mesh_shape), random_lm_batch(0, batch=4, length=12, vocab=250)
    xla_loss, _, xla_params = one_pretraining_step(_tiny("xla"), mesh, batch)
    kernel_loss, _, kernel_params = one_pretraining_step(_tiny("pallas"), mesh, batch)
    np.testing.assert_allclose(kernel_loss, xla_loss, rtol=1e-6)
    assert_trees_close(kernel_params, xla_params, rtol=1e-5, atol=1e-6)


def test_evaluation_with_the_kernel_equals_xla():
    batch = {k: jnp.asarray(v) for k, v in random_lm_batch(1, 3, 10, vocab=250).items()}
    model = LanguageModel(_tiny("xla"))
    params = model.init(jax.random.key(0), batch["inputs"])["params"]
    want = make_eval_step(model)(params, batch)
    got = make_eval_step(LanguageModel(_tiny("pallas")))(params, batch)
    assert_trees_close(got, want, check_dtype=False, rtol=1e-6, atol=1e-6)


def test_bad_inputs_fail_clearly():
    x, t = jnp.zeros((4, 48)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match=r"targets have shape \(3,\), expected \(4,\)"):
        ce.target_logit_and_log_z(x, t[:3])
    with pytest.raises(ValueError, match="floating"):
        ce.target_logit_and_log_z(x.astype(jnp.int32), t)
    with pytest.raises(ValueError, match=r"vocab_size=49 must be in 1\.\.48"):
        ce.target_logit_and_log_z(x, t, 49)
    with pytest.raises(ValueError, match="fwd_lanes=3 must divide fwd_cols"):
        ce.Tuning(fwd_lanes=3)


def test_lowers_to_verified_triton_at_gpt2_size():
    """GPT-2 124M's logits at batch 64 (6.6 GB, so 64-bit offsets): one forward program per
    4 rows, a backward program per 8 rows x 1024 columns; exponentials by exp2 (`ex2`),
    not libdevice's exact expf."""
    x = jax.ShapeDtypeStruct((64 * 1024, 50304), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((64 * 1024,), jnp.int32)

    def loss(x, t):
        target_logit, log_z = ce.target_logit_and_log_z(x, t, 50257, interpret=False)
        return jnp.sum(log_z - target_logit)

    kernels = triton_kernels(jax.jit(jax.grad(loss)), x, t)
    tuning = ce.DEFAULT_TUNING
    assert sorted((k.name, k.grid) for k in kernels) == [
        ("cross_entropy_bwd", (64 * 1024 // tuning.bwd_rows, -(-50304 // tuning.bwd_cols), 1)),
        ("cross_entropy_fwd", (64 * 1024 // tuning.fwd_rows, 1, 1)),
    ]
    verify_triton_ir(kernels)
    for kernel in kernels:
        assert b"__nv_exp2f" in kernel.ttir and b"__nv_expf" not in kernel.ttir
