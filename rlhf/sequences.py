"""Padded sequences: positions and segments from a mask, last-token index, per-token log-probs.

Post-training works on rows of `tokens_BL` with `mask_BL` (1 on real tokens,
0 on padding on either side). T = L - 1 indexes next-token predictions:
entry t of any `_BT` array is about token t + 1 given tokens 0..t.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.sampling import filter_logits
from train.losses import token_log_probs


def positions_and_segments(mask_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(positions_BL, segment_ids_BL) for a padded row: positions count real tokens
    from 0 (so left padding does not shift them), segment 1 on real tokens, 0 on padding."""
    mask_BL = mask_BL.astype(jnp.int32)
    positions_BL = jnp.maximum(jnp.cumsum(mask_BL, axis=1) - 1, 0)
    return positions_BL.astype(jnp.int32), mask_BL


def last_token_index(mask_BL: jax.Array) -> jax.Array:
    """index_B of the last real token of each row, for left or right padding alike.

    (Not `mask.sum() - 1`: that is only right for right padding, the classic
    reward-model bug.)
    """
    L = mask_BL.shape[1]
    return (L - 1 - jnp.argmax(mask_BL[:, ::-1] > 0, axis=1)).astype(jnp.int32)


def gather_at(x_BL: jax.Array, index_B: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_BL, index_B[:, None], axis=1)[:, 0]


def lm_logits(
    model: nn.Module,
    params: Any,
    tokens_BL: jax.Array,
    mask_BL: jax.Array,
    temperature: float = 1.0,
) -> jax.Array:
    """logits_BTV at `temperature` for predicting tokens 1..L-1 (dropout off), through
    the sampler's own `filter_logits`, so log-probs match what was sampled."""
    positions_BL, segments_BL = positions_and_segments(mask_BL)
    logits_BLV = model.apply({"params": params}, tokens_BL, positions_BL, segments_BL)
    return filter_logits(logits_BLV[:, :-1], temperature, top_k=0, top_p=1.0)


def log_probs_and_entropy(
    logits_BTV: jax.Array, tokens_BL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(logp_BT of the next tokens, entropy_BT of the predictive distribution)."""
    logp_BT = token_log_probs(logits_BTV, tokens_BL[:, 1:])
    logp_all_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    entropy_BT = -jnp.sum(jnp.exp(logp_all_BTV) * logp_all_BTV, axis=-1)
    return logp_BT, entropy_BT


def sequence_log_probs(
    model: nn.Module,
    params: Any,
    tokens_BL: jax.Array,
    mask_BL: jax.Array,
    loss_mask_BL: jax.Array,
    temperature: float = 1.0,
) -> jax.Array:
    """logp_B: sum of log p(token) over the tokens where loss_mask_BL is 1."""
    logits_BTV = lm_logits(model, params, tokens_BL, mask_BL, temperature)
    logp_BT = token_log_probs(logits_BTV, tokens_BL[:, 1:])
    return jnp.sum(logp_BT * loss_mask_BL[:, 1:].astype(jnp.float32), axis=1)
