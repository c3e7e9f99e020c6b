"""The output head's forward and input-gradient products in float8, fused with the
cross-entropy kernels.

For a small model the output head is a large share of a training step's matrix work:
gpt2-124m at batch 64 spends about 22 ms of a ~112 ms step on the head's [65,536 x 768] by
[768 x 50,304] products (forward, input gradient, weight gradient; BENCHMARKS.md, round
eight), and Hopper's float8 tensor cores run each about twice as fast (change 62). This
module computes the pretraining loss's two statistics per token, the target's logit and
log Z, from the final hidden states x [..., D] and the head's weight w [V, D]:

  forward:  logits = q(x) . q(w)^T * s_x s_w in the compute dtype, q(.) = e4m3 after
            dividing by the tensor's scale; the statistics by the cross-entropy forward
            kernel (`cross_entropy.py`), which keeps the logits for the backward pass;
  backward: the cross-entropy backward kernel writes d logits twice in its one pass, in the
            compute dtype and divided by s_g as e5m2; dx = dl_e5m2 . q(w) in float8, and
            the weight gradient dw = dl^T . x in the compute dtype.

The weight gradient stays in the compute dtype because that is where float8 cost accuracy:
gpt2-124m trained 600 steps with every head product in float8 ended 0.09 nats above the
compute-dtype head; with this split, 0.01, inside the run-to-run spread (BENCHMARKS.md,
change 63). Scales are per tensor and taken from this step's values ("current scaling":
no state between steps): s = max|t| / (the format's largest finite value). The logits'
gradient needs no pass to find its maximum: entry (r, v) is g_logz[r] p[r, v] +
g_target[r] [v = target], so |g_logz[r]| + |g_target[r]| bounds row r, and the largest row
bound is the scale. Opt-in: `ModelConfig.head_matmul="fp8"`.

The products are plain `dot_general`s on float8 operands: XLA gives them to cuBLASLt's
float8 GEMM on Hopper GPUs and emulates them elsewhere (the CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from model.kernels import cross_entropy
from model.kernels.partition import interpret_mode

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2


def scale_for(amax: jax.Array, dtype: DTypeLike) -> jax.Array:
    """float32 scale s with amax / s = the largest finite value of `dtype` (1 for amax 0)."""
    amax = amax.astype(jnp.float32)
    return jnp.where(amax > 0, amax / float(jnp.finfo(dtype).max), 1.0)


def quantize(x: jax.Array, dtype: DTypeLike = E4M3) -> tuple[jax.Array, jax.Array]:
    """(x / s as `dtype`, s), with the per-tensor scale s from max |x|."""
    scale = scale_for(jnp.max(jnp.abs(x)), dtype)
    top = float(jnp.finfo(dtype).max)
    return jnp.clip(x.astype(jnp.float32) / scale, -top, top).astype(dtype), scale


def _scaled_dot(a, b, dims, scale, out_dtype):
    """a . b over `dims` ((a's contracted dims), (b's)), times scale, as `out_dtype`."""
    out = jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=out_dtype)
    return out * scale.astype(out_dtype)


@functools.cache
def _make(vocab_size, tuning, interpret, x_dtype, w_dtype):
    def forward(x, w, targets):
        x8, s_x = quantize(x)
        w8, s_w = quantize(w)
        logits = _scaled_dot(x8, w8, ((x.ndim - 1,), (1,)), s_x * s_w, x_dtype)
        stats = cross_entropy.forward_statistics(logits, targets, vocab_size, tuning, interpret)
        return stats, (x, w8, s_w, logits, targets, stats[1])

    @jax.custom_vjp
    def statistics(x, w, targets):
        return forward(x, w, targets)[0]

    def backward(residuals, cotangents):
        x, w8, s_w, logits, targets, log_z = residuals
        g_target, g_log_z = (g.astype(jnp.float32) for g in cotangents)
        s_g = scale_for(jnp.max(jnp.abs(g_log_z) + jnp.abs(g_target)), E5M2)
        dl, dl8 = cross_entropy.backward_logits(
            logits, targets, log_z, g_log_z, g_target, vocab_size, tuning, interpret, s_g
        )
        dx = _scaled_dot(dl8, w8, ((x.ndim - 1,), (0,)), s_g * s_w, x_dtype)
        rows = tuple(range(x.ndim - 1))
        dw = jax.lax.dot_general(dl, x, ((rows, rows), ((), ())), preferred_element_type=x_dtype)
        return dx, dw.astype(w_dtype), None

    statistics.defvjp(forward, backward)
    return statistics


def target_logit_and_log_z(
    x: jax.Array,
    w_VD: jax.Array,
    targets: jax.Array,
    vocab_size: int | None = None,
    *,
    tuning: cross_entropy.Tuning = cross_entropy.DEFAULT_TUNING,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(logit of the target, log Z over the first `vocab_size` columns), float32, of the
    logits x . w_VD^T computed in float8 (module docstring); differentiable in x and w_VD.
    x [..., D] in the compute dtype, w_VD [V, D], targets [...] below `vocab_size`."""
    vocab_size = cross_entropy.check_head_inputs("fp8_head", x, w_VD, targets, vocab_size)
    interpret = interpret_mode() if interpret is None else interpret
    fn = _make(vocab_size, tuning, bool(interpret), x.dtype, w_VD.dtype)
    return fn(x, w_VD, targets.astype(jnp.int32))
