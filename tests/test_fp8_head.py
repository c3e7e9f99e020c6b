"""The float8 output head fused with the cross-entropy kernels (`model/kernels/fp8_head.py`,
interpreted on CPU): its statistics and gradients are the compute-dtype head's to float8's
precision and equal the same computation on float8-rounded operands, the backward kernel's
e5m2 output is its own gradient rounded once, the pretraining step with it (sharded) follows
the step without it, and its kernels lower to Triton."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import get_preset
from model.kernels import cross_entropy as ce
from model.kernels import fp8_head
from tests.helpers import (
    mesh_of,
    one_pretraining_step,
    random_lm_batch,
    triton_kernels,
    verify_triton_ir,
)
from train import losses

SMALL_BLOCKS = ce.Tuning(fwd_rows=2, fwd_cols=32, fwd_lanes=8, bwd_rows=4, bwd_cols=32)
V, VOCAB, D = 136, 130, 48  # padded columns, real vocabulary, hidden width


def _inputs(shape=(3, 7), seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (*shape, D))
    w = jax.random.normal(k[1], (V, D)) * D**-0.5 * 2.0
    targets = jax.random.randint(k[2], shape, 0, VOCAB)
    return x, w, targets, jax.random.normal(k[3], shape), jax.random.normal(k[4], shape)


def _value_and_grads(fn, x, w, targets, g_target, g_log_z):
    out, vjp = jax.vjp(lambda x, w: fn(x, w, targets), x, w)
    return out, vjp((g_target, g_log_z))


def _compute_dtype_head(x, w, targets):
    return losses.reference_masked_statistics(x @ w.T, targets, VOCAB)


def _fp8(x, w, targets):
    return fp8_head.target_logit_and_log_z(x, w, targets, VOCAB, tuning=SMALL_BLOCKS)


def _relative_error(got, want):
    got, want = np.float64(got), np.float64(want)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_statistics_and_gradients_are_the_compute_dtype_heads_to_fp8_precision():
    """e4m3 operands (3 mantissa bits) and an e5m2 logit gradient (2 bits): at this width
    (48) the target logits within 6% of the float32 head's in norm, log Z within 1%, the
    input gradient within 10%, the weight gradient (from the unrounded logits' gradient)
    within 4% (measured over four seeds: 3-5%, 0.6%, 5-7%, 1.8-2.3%)."""
    inputs = _inputs()
    (tl, lz), (dx, dw) = _value_and_grads(_fp8, *inputs)
    (tl_ref, lz_ref), (dx_ref, dw_ref) = _value_and_grads(_compute_dtype_head, *inputs)
    assert dx.dtype == inputs[0].dtype and dw.dtype == inputs[1].dtype
    assert _relative_error(tl, tl_ref) < 0.06
    assert _relative_error(lz, lz_ref) < 0.01
    assert _relative_error(dx, dx_ref) < 0.1
    assert _relative_error(dw, dw_ref) < 0.04
    assert np.all(np.float32(dw)[VOCAB:] == 0)  # the padding rows of the head get nothing


def test_equals_the_compute_dtype_head_on_float8_rounded_operands():
    """The same computation done in float32 on the float8-rounded operands and logit
    gradient: equal up to summation order (and the rare gradient entry rounded the other
    way at an e5m2 tie, hence the 1e-3)."""
    x, w, targets, g_target, g_log_z = _inputs(seed=2)
    (tl, lz), (dx, dw) = _value_and_grads(_fp8, x, w, targets, g_target, g_log_z)
    (x8, s_x), (w8, s_w) = fp8_head.quantize(x), fp8_head.quantize(w)
    x_, w_ = np.float32(x8) * s_x, np.float32(w8) * s_w
    (tl_ref, lz_ref), vjp = jax.vjp(
        lambda logits: losses.reference_masked_statistics(logits, targets, VOCAB), x_ @ w_.T
    )
    (dl,) = vjp((g_target, g_log_z))
    s_g = fp8_head.scale_for(jnp.max(jnp.abs(g_log_z) + jnp.abs(g_target)), fp8_head.E5M2)
    dl_ = np.float32((dl / s_g).astype(fp8_head.E5M2)) * s_g
    # the input gradient from the float8 operands, the weight gradient from the unrounded ones
    dx_ref, dw_ref = dl_ @ w_, np.einsum("blv,bld->vd", dl, x)
    for got, want in ((tl, tl_ref), (lz, lz_ref), (dx, dx_ref), (dw, dw_ref)):
        assert _relative_error(got, want) < 1e-3


def test_the_e5m2_logit_gradient_is_the_kernels_gradient_rounded_once():
    """With a scale, the backward kernel writes its usual gradient (unchanged) and that
    gradient divided by the scale as e5m2, rounded once from float32; the largest row bound
    lands on e5m2's largest finite value, so nothing saturates and the range is used."""
    x, w, targets, g_target, g_log_z = _inputs(seed=1)
    logits = x @ w.T
    log_z = ce.forward_statistics(logits, targets, VOCAB, SMALL_BLOCKS, True)[1]
    s_g = fp8_head.scale_for(jnp.max(jnp.abs(g_log_z) + jnp.abs(g_target)), fp8_head.E5M2)
    args = (logits, targets, log_z, g_log_z, g_target, VOCAB, SMALL_BLOCKS, True)
    plain = ce.backward_logits(*args)
    wide, narrow = ce.backward_logits(*args, fp8_scale=s_g)
    assert narrow.dtype == fp8_head.E5M2 and wide.dtype == logits.dtype
    np.testing.assert_array_equal(np.float32(wide), np.float32(plain))
    want = (np.float32(plain) * np.float32(1 / s_g)).astype(fp8_head.E5M2)
    np.testing.assert_array_equal(np.float32(narrow), np.float32(want))
    top = float(jnp.finfo(fp8_head.E5M2).max)
    assert np.all(np.isfinite(np.float32(narrow))) and np.abs(np.float32(plain) / s_g).max() <= top


def test_quantize_uses_the_formats_range_and_survives_zeros():
    x = jnp.array([[-3.0, 0.5, 1.5], [0.0, 2.0, -0.25]])
    q, scale = fp8_head.quantize(x)
    assert q.dtype == fp8_head.E4M3
    np.testing.assert_allclose(float(scale), 3.0 / 448.0, rtol=1e-7)
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == 448.0
    np.testing.assert_allclose(np.float32(q) * float(scale), x, rtol=1 / 16)
    q0, scale0 = fp8_head.quantize(jnp.zeros((2, 3)))
    assert float(scale0) == 1.0 and not np.any(np.float32(q0))


def _tiny(head: str):
    """tiny preset with 250 real tokens (6 padding columns), the Pallas cross-entropy."""
    return get_preset("tiny", vocab_size=250, cross_entropy_impl="pallas", head_matmul=head)


@pytest.mark.parametrize(
    "mesh_shape", [dict(data=1), dict(data=2, fsdp=2, tensor=2)], ids=["one-device", "dp-fsdp-tp"]
)
def test_training_step_with_the_fp8_head_follows_the_compute_dtype_step(mesh_shape):
    """One sharded pretraining step from the same state: the loss within float8's precision,
    and every parameter's update (AdamW, so roughly the gradient's sign) mostly the same."""
    mesh, batch = mesh_of(mesh_shape), random_lm_batch(0, batch=4, length=12, vocab=250)
    loss, before, after = one_pretraining_step(_tiny("compute"), mesh, batch)
    fp8_loss, _, fp8_after = one_pretraining_step(_tiny("fp8"), mesh, batch)
    delta = jax.tree.map(np.subtract, after, before)
    fp8_delta = jax.tree.map(np.subtract, fp8_after, before)
    np.testing.assert_allclose(fp8_loss, loss, rtol=0.01)
    got, want = (
        np.concatenate([d.ravel() for d in jax.tree.leaves(t)]) for t in (fp8_delta, delta)
    )
    moved = np.abs(want) > 1e-6
    assert np.mean(np.sign(got[moved]) == np.sign(want[moved])) > 0.95


def test_bad_inputs_fail_clearly():
    x, w, t = jnp.zeros((4, 8)), jnp.zeros((16, 8)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="x has width 7, the head's weight 8"):
        fp8_head.target_logit_and_log_z(x[:, :7], w, t)
    with pytest.raises(ValueError, match=r"targets have shape \(3,\), expected \(4,\)"):
        fp8_head.target_logit_and_log_z(x, w, t[:3])
    with pytest.raises(ValueError, match=r"vocab_size=17 must be in 1\.\.16"):
        fp8_head.target_logit_and_log_z(x, w, t, 17)
    with pytest.raises(ValueError, match="head_matmul='bf16' is not one of"):
        get_preset("tiny", head_matmul="bf16")


def test_lowers_to_verified_triton_at_gpt2_size():
    """gpt2-124m at batch 64: the same two cross-entropy kernels as the compute-dtype head,
    the backward storing bf16 and float8 (e5m2)."""
    x = jax.ShapeDtypeStruct((64, 1024, 768), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((50304, 768), jnp.float32)
    t = jax.ShapeDtypeStruct((64, 1024), jnp.int32)

    def loss(x, w, t):
        target_logit, log_z = fp8_head.target_logit_and_log_z(x, w, t, 50257, interpret=False)
        return jnp.sum(log_z - target_logit)

    kernels = triton_kernels(jax.jit(jax.grad(loss, argnums=(0, 1))), x, w, t)
    assert sorted(k.name for k in kernels) == ["cross_entropy_bwd", "cross_entropy_fwd"]
    verify_triton_ir(kernels)
    (bwd,) = (k for k in kernels if k.name == "cross_entropy_bwd")
    assert b"f8E5M2" in bwd.ttir
