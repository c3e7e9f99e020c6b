"""The output head's product and the cross-entropy as one function whose backward pass
never reads the logits.

With the logits computed by the model and the loss taken from them (`cross_entropy.py`),
a step reads the [N, V] logits twice besides the head's products (the forward kernel,
the backward kernel) and writes their gradient once: 19.8 GB at gpt2-124m's batch 64.
Here the forward pass writes instead, in its one read, what the backward products need:

  forward:  logits = x . w^T in the compute dtype; the single-pass kernel
            (`cross_entropy.exponentials`) writes e' = s (softmax - onehot(target)) and
            returns the per-row scale s, log Z and the target's logit;
  backward: d logits = g_ce (softmax - onehot) + g_logz softmax = u e' + g_logz onehot
            with u = (g_ce + g_logz) / s per row, so dx = u * (e' . w) and
            dw = e'^T . (u * x): the row scale goes on the products' small side and no
            pass over [N, V] is left besides the two products. The one-hot part is a
            gather and a scatter of [N, D] rows, traced only where log Z has a gradient
            (a z-loss): with none, JAX hands the backward pass a symbolic zero.

13.2 GB instead of 19.8. The outputs are the per-token cross-entropy log Z - logit[target]
and log Z, float32. Where the mesh splits the vocabulary (tensor parallelism), each
device's rows would need their own scale inside the products; there this falls back to
the logits and `cross_entropy.target_logit_and_log_z`, the same values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from model.kernels import cross_entropy
from model.kernels.partition import interpret_mode


@functools.cache
def _make(vocab_size: int, tuning: cross_entropy.Tuning, interpret: bool):
    def forward(x, w, targets):
        logits = x @ w.T
        e, s, log_z, target_logit = cross_entropy.exponentials(
            logits, targets, vocab_size, tuning, interpret
        )
        return (log_z - target_logit, log_z), (x, w, e, s, targets)

    @jax.custom_vjp
    def cross_entropy_and_log_z(x, w, targets):
        return forward(x, w, targets)[0]

    def fwd(x, w, targets):  # symbolic_zeros: each primal comes wrapped
        return forward(x.value, w.value, targets.value)

    def bwd(residuals, cotangents):
        x, w, e, s, targets = residuals
        g_ce, g_log_z = (None if isinstance(g, SymbolicZero) else g for g in cotangents)
        g = sum(c.astype(jnp.float32) for c in (g_ce, g_log_z) if c is not None)
        u = (g / s)[..., None]
        dx = u * jnp.einsum("...v,vd->...d", e, w).astype(jnp.float32)
        dw = jnp.einsum("...v,...d->vd", e, (u * x).astype(x.dtype))
        if g_log_z is not None:  # the one-hot part, g_logz at each row's target
            rows = g_log_z.astype(jnp.float32)[..., None]
            dx = dx + rows * w[targets].astype(jnp.float32)
            dw = dw + jnp.zeros(w.shape, jnp.float32).at[targets].add(rows * x).astype(w.dtype)
        return dx.astype(x.dtype), dw.astype(w.dtype), None

    cross_entropy_and_log_z.defvjp(fwd, bwd, symbolic_zeros=True)
    return cross_entropy_and_log_z


def cross_entropy_and_log_z(
    x: jax.Array,
    w_VD: jax.Array,
    targets: jax.Array,
    vocab_size: int | None = None,
    *,
    tuning: cross_entropy.Tuning = cross_entropy.DEFAULT_TUNING,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(log Z - logit of the target, log Z over the first `vocab_size` columns), float32,
    of the logits x . w_VD^T in x's dtype; differentiable in x and w_VD. x [..., D],
    w_VD [V, D] (cast to x's dtype, as the model's head does), targets [...] below
    `vocab_size` (default V)."""
    vocab_size = cross_entropy.check_head_inputs("fused_head", x, w_VD, targets, vocab_size)
    interpret = interpret_mode() if interpret is None else interpret
    w = w_VD.astype(x.dtype)
    targets = targets.astype(jnp.int32)
    logits_shape = jax.ShapeDtypeStruct((*x.shape[:-1], w_VD.shape[0]), x.dtype)
    if cross_entropy.vocab_is_split(logits_shape):
        target_logit, log_z = cross_entropy.target_logit_and_log_z(
            x @ w.T, targets, vocab_size, tuning=tuning, interpret=interpret
        )
        return log_z - target_logit, log_z
    return _make(vocab_size, tuning, bool(interpret))(x, w, targets)
