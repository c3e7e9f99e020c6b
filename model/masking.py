"""The one attention mask, and the constants every attention implementation shares.

A query sees a key only if both belong to the same document (segment id, 0 meaning
padding) and the key's position is not later than the query's. Positions restart at 0 in
every packed document, so the same rule is causality, padding and packing at once, and it
also covers a KV cache whose unwritten slots hold `EMPTY_POSITION`.

Shape letters: B batch, Q query length, K key length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite rather than -inf: a fully masked row (a padding query) then gets a
# uniform softmax instead of NaNs, and nothing reads that row's output.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Position stored in empty KV-cache slots: later than any query, so never seen.
EMPTY_POSITION = jnp.iinfo(jnp.int32).max


def attention_mask(
    q_positions_BQ: jax.Array,
    kv_positions_BK: jax.Array,
    q_segments_BQ: jax.Array | None,
    kv_segments_BK: jax.Array | None,
) -> jax.Array:
    """mask_BQK: True where the query may attend to the key."""
    mask_BQK = kv_positions_BK[:, None, :] <= q_positions_BQ[:, :, None]
    if q_segments_BQ is not None:
        same_doc_BQK = q_segments_BQ[:, :, None] == kv_segments_BK[:, None, :]
        mask_BQK &= same_doc_BQK & (q_segments_BQ[:, :, None] != 0)
    return mask_BQK
