"""Token-level losses with per-token weights; every stage uses these.

Losses are returned as sums together with the sum of weights, so that
microbatches and devices can be combined exactly before one final division.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _target_logit_and_log_z(logits_BLV: jax.Array, targets_BL: jax.Array):
    logits = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
    return target_logit_BL, log_z_BL


def token_log_probs(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """log p(target) at every position, in float32."""
    target_logit_BL, log_z_BL = _target_logit_and_log_z(logits_BLV, targets_BL)
    return target_logit_BL - log_z_BL


def cross_entropy_sums(
    logits_BLV: jax.Array,
    targets_BL: jax.Array,
    weights_BL: jax.Array,
    z_loss: float = 0.0,
) -> dict[str, jax.Array]:
    """Weighted sums of next-token cross-entropy and z-loss (PaLM, Chowdhery et al. 2022).

    Returns {"loss_sum": sum w*(CE + z_loss*logZ^2), "ce_sum": sum w*CE,
    "weight_sum": sum w}. Tokens with weight 0 (padding, prompts) contribute
    nothing, neither to the value nor to the gradient.
    """
    target_logit_BL, log_z_BL = _target_logit_and_log_z(logits_BLV, targets_BL)
    weights_BL = weights_BL.astype(jnp.float32)
    ce_sum = jnp.sum(weights_BL * (log_z_BL - target_logit_BL))
    loss_sum = ce_sum + z_loss * jnp.sum(weights_BL * jnp.square(log_z_BL)) if z_loss else ce_sum
    return {"loss_sum": loss_sum, "ce_sum": ce_sum, "weight_sum": jnp.sum(weights_BL)}
