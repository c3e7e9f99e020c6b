"""Which blocks of a packed row can see which, for the flash-attention kernels
(`model/kernels/flash_attention.py`), in plain JAX.

Which key blocks a query block can see depends on the data, not on
the block indices (positions restart in every document), so before each kernel plain
JAX summarises every block of the row (its smallest and largest segment id, positions
at the extremes) and derives, per query block, the range of key blocks that may hold
a visible key, and per key block the range of query blocks that may see it. A block
pair is skipped only when the summaries prove that no pair in it is visible (disjoint
segment ranges, every key later than every query, or one shared document whose keys
all come after its queries), so skipping never changes the result. On packed rows
(segment ids increasing along the row, positions restarting at 0) this keeps exactly
the blocks that hold a visible pair: the causal triangle, minus documents that ended
before the query block began. Inside that range, the run of blocks where every pair is
visible (one document, keys before queries) is computed without building the mask.

Shape letters: B batch, T length (whole blocks), N query blocks, M key blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_INT_MAX = jnp.iinfo(jnp.int32).max
_INT_MIN = jnp.iinfo(jnp.int32).min


def block_summary(seg_BT: jax.Array, pos_BT: jax.Array, block: int) -> dict[str, jax.Array]:
    """Per block [B, N]: extreme segment ids and positions of its non-padding tokens.

    A block of padding only gets seg_min > seg_max, so it overlaps nothing."""
    B, T = seg_BT.shape
    seg = seg_BT.reshape(B, T // block, block)
    pos = pos_BT.reshape(B, T // block, block)
    real = seg != 0
    seg_min = jnp.where(real, seg, _INT_MAX).min(-1)
    seg_max = jnp.where(real, seg, 0).max(-1)
    at_min = real & (seg == seg_min[..., None])
    at_max = real & (seg == seg_max[..., None])
    return {
        "seg_min": seg_min,
        "seg_max": seg_max,
        "one_doc": real.all(-1) & (seg_min == seg_max),  # no padding, one segment
        "pos_min": jnp.where(real, pos, _INT_MAX).min(-1),
        "pos_max": jnp.where(real, pos, _INT_MIN).max(-1),
        "pos_min_at_seg_min": jnp.where(at_min, pos, _INT_MAX).min(-1),
        "pos_max_at_seg_max": jnp.where(at_max, pos, _INT_MIN).max(-1),
    }


def block_visibility(
    seg_BT: jax.Array, pos_BT: jax.Array, block_q: int, block_k: int
) -> tuple[jax.Array, jax.Array]:
    """(may_see_BNM, sees_all_BNM) for query block n and key block m.

    may_see is False only where the block pair provably holds no visible pair. Each test
    is necessary for one (same non-zero segment s, key position <= query position): s
    lies in both blocks' segment ranges; the smallest key position is at most the
    largest query position; and when the ranges share only s (the query block's last
    segment is the key block's first), the same holds for s alone.

    sees_all is True exactly where every pair is visible (both blocks one document,
    no padding, every key position <= every query position): no mask needed there.
    """
    q = {k: v[:, :, None] for k, v in block_summary(seg_BT, pos_BT, block_q).items()}
    k = {k: v[:, None, :] for k, v in block_summary(seg_BT, pos_BT, block_k).items()}
    overlap = (k["seg_min"] <= q["seg_max"]) & (q["seg_min"] <= k["seg_max"])
    causal = k["pos_min"] <= q["pos_max"]
    one_shared = q["seg_max"] == k["seg_min"]
    shared_causal = k["pos_min_at_seg_min"] <= q["pos_max_at_seg_max"]
    may_see = overlap & causal & (~one_shared | shared_causal)
    same_doc = q["one_doc"] & k["one_doc"] & (q["seg_min"] == k["seg_min"])
    return may_see, same_doc & (k["pos_max"] <= q["pos_min"])


def loop_bounds(may_see_BNM: jax.Array, sees_all_BNM: jax.Array) -> jax.Array:
    """bounds_BN4 = (lo, full_lo, full_hi, hi) along the last axis: blocks [lo, hi) hold
    every block that may be visible, and [full_lo, full_hi) inside them is a run of
    wholly visible ones (the first such run; empty, at hi, if there is none)."""
    M = may_see_BNM.shape[-1]
    idx = jnp.arange(M)
    any_BN = may_see_BNM.any(-1)
    lo = jnp.where(any_BN, jnp.argmax(may_see_BNM, axis=-1), 0)
    hi = jnp.where(any_BN, M - jnp.argmax(may_see_BNM[..., ::-1], axis=-1), 0)
    full_lo = jnp.where(sees_all_BNM.any(-1), jnp.argmax(sees_all_BNM, axis=-1), hi)
    # the run ends at the first block after full_lo that is not wholly visible
    ends = ~sees_all_BNM & (idx > full_lo[..., None])
    full_hi = jnp.where(ends.any(-1), jnp.argmax(ends, axis=-1), M)
    full_hi = jnp.where(full_lo < hi, jnp.minimum(full_hi, hi), hi)
    return jnp.stack([lo, full_lo, full_hi, hi], axis=-1).astype(jnp.int32)
