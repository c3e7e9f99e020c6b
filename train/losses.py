"""Token-level losses with per-token weights; every stage uses these.

Losses are returned as sums together with the sum of weights, so that
microbatches and devices can be combined exactly before one final division.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.auto import choose_cross_entropy_impl
from model.config import ModelConfig
from model.kernels import cross_entropy
from model.transformer import mask_padded_vocab


def reference_target_logit_and_log_z(
    logits_BLV: jax.Array, targets_BL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(logit of the target, log of the partition function), float32, by plain autodiff.

    The definition `_target_logit_and_log_z` is tested against. Its gradient
    makes XLA keep a float32 copy of the [B, L, V] logits and several passes
    over it: at GPT-2 size about a fifth of the step time (BENCHMARKS.md).
    """
    logits = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits, targets_BL[..., None], axis=-1)[..., 0]
    return target_logit_BL, log_z_BL


def reference_masked_statistics(
    logits_BLV: jax.Array, targets_BL: jax.Array, vocab_size: int
) -> tuple[jax.Array, jax.Array]:
    """`reference_target_logit_and_log_z` after the model's mask of the padding columns:
    the definition `target_logit_and_log_z` is tested against for unmasked logits."""
    return reference_target_logit_and_log_z(mask_padded_vocab(logits_BLV, vocab_size), targets_BL)


@jax.custom_vjp
def _target_logit_and_log_z(logits_BLV: jax.Array, targets_BL: jax.Array):
    """Same values as `reference_target_logit_and_log_z`, fused: the float32 upcast
    happens inside each pass, so no float32 [B, L, V] array is ever stored, and the
    backward pass is one read of the logits and one write of their gradient."""
    return _fused_forward(logits_BLV, targets_BL)[0]


def _fused_forward(logits_BLV, targets_BL):
    max_BL = jnp.max(logits_BLV, axis=-1).astype(jnp.float32)  # exact in any dtype
    shifted_BLV = logits_BLV.astype(jnp.float32) - max_BL[..., None]
    log_z_BL = max_BL + jnp.log(jnp.sum(jnp.exp(shifted_BLV), axis=-1))
    target_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return (target_BL.astype(jnp.float32), log_z_BL), (logits_BLV, targets_BL, log_z_BL)


def _fused_backward(residuals, cotangents):
    logits_BLV, targets_BL, log_z_BL = residuals
    g_target_BL, g_log_z_BL = cotangents
    # d log_z / d logits = softmax; d target_logit / d logits = one-hot(target)
    probs_BLV = jnp.exp(logits_BLV.astype(jnp.float32) - log_z_BL[..., None])
    vocab_V = jnp.arange(logits_BLV.shape[-1], dtype=targets_BL.dtype)
    is_target_BLV = vocab_V == targets_BL[..., None]
    onehot_part_BLV = jnp.where(is_target_BLV, g_target_BL[..., None], 0.0)
    grad_BLV = g_log_z_BL[..., None] * probs_BLV + onehot_part_BLV
    return grad_BLV.astype(logits_BLV.dtype), None


_target_logit_and_log_z.defvjp(_fused_forward, _fused_backward)


def target_logit_and_log_z(
    logits_BLV: jax.Array, targets_BL: jax.Array, vocab_size: int | None = None, impl: str = "xla"
) -> tuple[jax.Array, jax.Array]:
    """(logit of the target, log Z over the first `vocab_size` columns), float32.

    `vocab_size` (default: all columns) leaves out the padding columns of logits the
    model did not mask (`LanguageModel(..., mask_vocab_padding=False)`). `impl`: "xla",
    the custom-VJP passes above, after the model's own mask; "pallas", the kernels of
    `model/kernels/cross_entropy.py`, which leave the padding out themselves.
    """
    if impl == "pallas":
        return cross_entropy.target_logit_and_log_z(logits_BLV, targets_BL, vocab_size)
    if vocab_size is not None and vocab_size < logits_BLV.shape[-1]:
        logits_BLV = mask_padded_vocab(logits_BLV, vocab_size)
    return _target_logit_and_log_z(logits_BLV, targets_BL)


def token_log_probs(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """log p(target) at every position, in float32."""
    target_logit_BL, log_z_BL = _target_logit_and_log_z(logits_BLV, targets_BL)
    return target_logit_BL - log_z_BL


def loss_options(cfg: ModelConfig) -> dict:
    """`cross_entropy_sums`' vocab_size and impl for logits of a model with config `cfg`
    applied with `mask_vocab_padding=False` (the kernels where the pretraining loss fuses
    them with the head: `cross_entropy_impl="fused"` concerns the head, not logits)."""
    impl = choose_cross_entropy_impl(cfg)
    return dict(vocab_size=cfg.vocab_size, impl="pallas" if impl == "fused" else impl)


def cross_entropy_sums(
    logits_BLV: jax.Array,
    targets_BL: jax.Array,
    weights_BL: jax.Array,
    z_loss: float = 0.0,
    *,
    vocab_size: int | None = None,
    impl: str = "xla",
) -> dict[str, jax.Array]:
    """Weighted sums of next-token cross-entropy and z-loss (PaLM, Chowdhery et al. 2022).

    Returns {"loss_sum": sum w*(CE + z_loss*logZ^2), "ce_sum": sum w*CE,
    "weight_sum": sum w}. Tokens with weight 0 (padding, prompts) contribute
    nothing, neither to the value nor to the gradient. `vocab_size` and `impl`: as
    `target_logit_and_log_z`.
    """
    target_logit_BL, log_z_BL = target_logit_and_log_z(logits_BLV, targets_BL, vocab_size, impl)
    return statistics_sums(target_logit_BL, log_z_BL, weights_BL, z_loss)


def statistics_sums(
    target_logit_BL: jax.Array, log_z_BL: jax.Array, weights_BL: jax.Array, z_loss: float = 0.0
) -> dict[str, jax.Array]:
    """`cross_entropy_sums` from the per-token statistics (target logit, log Z)."""
    return token_ce_sums(log_z_BL - target_logit_BL, log_z_BL, weights_BL, z_loss)


def token_ce_sums(
    ce_BL: jax.Array, log_z_BL: jax.Array, weights_BL: jax.Array, z_loss: float = 0.0
) -> dict[str, jax.Array]:
    """`cross_entropy_sums` from the per-token cross-entropy and log Z (read only with a
    z-loss)."""
    weights_BL = weights_BL.astype(jnp.float32)
    ce_sum = jnp.sum(weights_BL * ce_BL)
    loss_sum = ce_sum + z_loss * jnp.sum(weights_BL * jnp.square(log_z_BL)) if z_loss else ce_sum
    return {"loss_sum": loss_sum, "ce_sum": ce_sum, "weight_sum": jnp.sum(weights_BL)}
