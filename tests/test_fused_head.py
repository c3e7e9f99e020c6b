"""The output head fused with the single-pass cross-entropy kernel (`model/kernels/
fused_head.py`, the kernel interpreted on CPU) equals the loss's definition on the head's
logits: values and gradients with and without a gradient of log Z, rows whose largest
logit lies far past the first column block (swept twice), sharded meshes, the pretraining
step with z-loss; what the kernel writes is s (softmax - onehot) exactly; and it lowers to
Triton at gpt2-124m's size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import get_preset
from model.kernels import cross_entropy as ce
from model.kernels import fused_head
from tests.helpers import (
    assert_trees_close,
    mesh_of,
    one_pretraining_step,
    random_lm_batch,
    triton_kernels,
    verify_triton_ir,
)
from train import losses, sharding

# A last row block part full, a last column block past the padded vocabulary, five
# column blocks a row; groups of 8 lanes as on the GPU.
SMALL_BLOCKS = ce.Tuning(fwd_rows=2, fwd_cols=32, fwd_lanes=8)
V, VOCAB, D = 136, 130, 48  # padded columns, real vocabulary, hidden width


def _inputs(shape=(3, 7), seed=0, dtype="float32"):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (*shape, D)).astype(dtype)
    w = jax.random.normal(k[1], (V, D)) * D**-0.5 * 3.0
    targets = jax.random.randint(k[2], shape, 0, VOCAB)
    return x, w, targets, jax.random.normal(k[3], shape), jax.random.normal(k[4], shape)


def _definition(x, w, targets):
    target_logit, log_z = losses.reference_masked_statistics(
        x.astype(jnp.float32) @ w.astype(x.dtype).astype(jnp.float32).T, targets, VOCAB
    )
    return log_z - target_logit, log_z


def _fused(x, w, targets, tuning=SMALL_BLOCKS):
    return fused_head.cross_entropy_and_log_z(x, w, targets, VOCAB, tuning=tuning)


def _value_and_grads(fn, x, w, targets, g_ce, g_log_z):
    out, vjp = jax.vjp(lambda x, w: fn(x, w, targets), x, w)
    return out, vjp((g_ce, g_log_z))


@pytest.mark.parametrize(
    "dtype, tuning, tol",
    [
        ("float32", SMALL_BLOCKS, dict(rtol=2e-5, atol=2e-5)),
        ("float32", ce.DEFAULT_TUNING, dict(rtol=2e-5, atol=2e-5)),
        ("bfloat16", SMALL_BLOCKS, dict(rtol=3e-2, atol=3e-2)),
    ],
    ids=["float32-small", "float32-default", "bfloat16-small"],
)
def test_values_and_gradients_match_the_definition(dtype, tuning, tol):
    x, w, targets, g_ce, g_log_z = _inputs(dtype=dtype)
    fused = lambda x, w, t: _fused(x, w, t, tuning)  # noqa: E731
    got = _value_and_grads(fused, x, w, targets, g_ce, g_log_z)
    want = _value_and_grads(_definition, x, w, targets, g_ce, g_log_z)
    assert got[1][0].dtype == x.dtype and got[1][1].dtype == w.dtype
    assert_trees_close(got, want, check_dtype=False, **tol)
    assert np.all(np.float32(got[1][1])[VOCAB:] == 0)  # the head's padding rows get nothing


def test_without_a_log_z_gradient_no_one_hot_part_is_traced():
    """The cross-entropy alone (no z-loss): the same gradients as the definition's, from the
    two products only; the one-hot part (a scatter-add into the weight's gradient) is not
    in the program at all."""
    x, w, targets, g_ce, _ = _inputs(seed=1)

    def grads(fn):
        return jax.grad(lambda x, w: jnp.sum(g_ce * fn(x, w, targets)[0]), argnums=(0, 1))

    assert_trees_close(grads(_fused)(x, w), grads(_definition)(x, w), rtol=2e-5, atol=2e-5)
    assert "scatter" not in str(jax.make_jaxpr(grads(_fused))(x, w))
    assert "scatter" in str(jax.make_jaxpr(jax.grad(lambda x: _fused(x, w, targets)[1].sum()))(x))


def test_the_kernel_writes_s_times_softmax_minus_onehot():
    """e' / s = softmax - onehot at every real column, 0 on the padding; and a row whose
    largest logit lies 300 nats past its first column block's (beyond the headroom, so the
    row block is swept again) stays finite and exact."""
    x, w, targets, *_ = _inputs(seed=2)
    logits = (x @ w.T).at[0, 1, 100].set(300.0).at[1, 2, :].set(-1e4)
    e, s, log_z, target_logit = ce.exponentials(logits, targets, VOCAB, SMALL_BLOCKS, True)
    want_tl, want_lz = losses.reference_masked_statistics(logits, targets, VOCAB)
    probs = jax.nn.softmax(jnp.where(jnp.arange(V) < VOCAB, logits, -jnp.inf), axis=-1)
    want = probs - jax.nn.one_hot(targets, V)
    assert np.all(np.isfinite(np.float32(e))) and np.all(np.isfinite(np.float32(s)))
    np.testing.assert_allclose(e / s[..., None], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_z, want_lz, rtol=1e-6)
    np.testing.assert_allclose(target_logit, want_tl, rtol=1e-6)
    assert np.all(np.float32(e)[..., VOCAB:] == 0)


@pytest.mark.parametrize(
    "mesh_shape, batch",
    [(dict(data=2, fsdp=2, tensor=2), 4), (dict(tensor=8), 3), (dict(data=8), 3)],
    ids=["data2-fsdp2-tensor2", "tensor8-vocab-split", "data8-batch3-unsplittable"],
)
def test_sharded_matches_the_definition(mesh_shape, batch):
    """Rows split over the batch axes (the kernel per device), or the vocabulary over the
    tensor axis (the two-kernel fallback), or whole where the mesh does not divide them."""
    x, w, targets, g_ce, g_log_z = _inputs(shape=(batch, 5), seed=3)
    want = _value_and_grads(_definition, x, w, targets, g_ce, g_log_z)
    run = jax.jit(lambda *a: _value_and_grads(_fused, *a))
    mesh = mesh_of(mesh_shape)
    with sharding.mesh_context(mesh):
        got = run(x, w, targets, g_ce, g_log_z)
    assert_trees_close(got, want, check_dtype=False, rtol=2e-5, atol=2e-5)


def _tiny(impl: str):
    """tiny preset with 250 real tokens: 6 padding columns in its 256-row head."""
    return get_preset("tiny", vocab_size=250, cross_entropy_impl=impl)


@pytest.mark.parametrize("mesh_shape", [dict(data=1), dict(data=2, fsdp=2, tensor=2)])
def test_training_step_with_the_fused_head_equals_xla(mesh_shape):
    """One sharded pretraining step (with a z-loss, so log Z has a gradient too) from the same
    state: same loss, same parameters after."""
    mesh, batch = mesh_of(mesh_shape), random_lm_batch(0, batch=4, length=12, vocab=250)
    xla_loss, _, xla_params = one_pretraining_step(_tiny("xla"), mesh, batch, z_loss=1e-2)
    fused_loss, _, fused_params = one_pretraining_step(_tiny("fused"), mesh, batch, z_loss=1e-2)
    np.testing.assert_allclose(fused_loss, xla_loss, rtol=1e-6)
    assert_trees_close(fused_params, xla_params, rtol=1e-5, atol=1e-6)


def test_bad_inputs_fail_clearly():
    x, w, t = jnp.zeros((4, 8)), jnp.zeros((16, 8)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="x has width 7, the head's weight 8"):
        fused_head.cross_entropy_and_log_z(x[:, :7], w, t)
    with pytest.raises(ValueError, match=r"targets have shape \(3,\), expected \(4,\)"):
        fused_head.cross_entropy_and_log_z(x, w, t[:3])
    with pytest.raises(ValueError, match=r"vocab_size=17 must be in 1\.\.16"):
        fused_head.cross_entropy_and_log_z(x, w, t, 17)


def test_lowers_to_verified_triton_at_gpt2_size():
    """gpt2-124m at batch 64: one kernel, the single pass, one program per 4 rows; its
    exponentials by exp2 (`ex2`); no kernel in the backward pass."""
    x = jax.ShapeDtypeStruct((64, 1024, 768), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((50304, 768), jnp.float32)
    t = jax.ShapeDtypeStruct((64, 1024), jnp.int32)

    def loss(x, w, t):
        return jnp.sum(fused_head.cross_entropy_and_log_z(x, w, t, 50257, interpret=False)[0])

    kernels = triton_kernels(jax.jit(jax.grad(loss, argnums=(0, 1))), x, w, t)
    assert [(k.name, k.grid) for k in kernels] == [
        ("cross_entropy_single_pass", (64 * 1024 // ce.DEFAULT_TUNING.fwd_rows, 1, 1))
    ]
    verify_triton_ir(kernels)
    assert b"__nv_exp2f" in kernels[0].ttir and b"__nv_expf" not in kernels[0].ttir
