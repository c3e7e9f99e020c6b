"""One decoding step's attention over the KV cache, as a single Pallas (Triton) kernel.

A decoding step has one query per row, so its attention reads every cached key
and value once and does little arithmetic: it is bound by memory and by kernel
count. Through XLA the hand-written reference attention (`model/attention.py`)
becomes about five kernels a layer (scores, mask, max, sum, weighted values),
together ~12 us a layer on an H100 for gpt-1.3b's 3 MB of cache per row
(BENCHMARKS.md, decode profile). This kernel does the same work in one pass:
for each (row, key/value head) it walks the cache in blocks, with the running
maximum and sum of flash attention (Dao et al. 2022) so scores never leave
registers.

The mask rule is exactly `model.masking.attention_mask`: a slot is visible when its
segment id equals the query's (non-zero) segment id and its position is not
later than the query's. Fully masked rows get the same uniform average over
all slots as the reference (nothing reads them).

Shape letters as in `model/attention.py`: B batch, S cache slots, H query heads,
G key/value heads, R = H // G query heads per group, D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from model.kernels.partition import dot, fit_logical, interpret_mode, run_sharded
from model.masking import MASK_VALUE

# Elements of the [R, block, D] product held in registers per step (4 warps).
_REGISTER_BUDGET = 8192


def supported(n_heads: int, kv_heads: int, head_dim: int) -> bool:
    """Triton tensors need power-of-two sizes: head_dim and heads per group."""
    per_group = n_heads // kv_heads
    return _is_power_of_two(head_dim) and _is_power_of_two(per_group)


def decode_attention(
    q_BHD: jax.Array,
    k_BSGD: jax.Array,
    v_BSGD: jax.Array,
    q_positions_B: jax.Array,
    q_segments_B: jax.Array,
    kv_positions_BS: jax.Array,
    kv_segments_BS: jax.Array,
    *,
    formulation: str = "dot",
    block: int | None = None,
    splits: int | None = None,
    num_warps: int = 4,
) -> jax.Array:
    """out_BHD: masked softmax(q k^T / sqrt(D)) v for one query per row.

    Runs per device under the active mesh (rows split over the batch axes,
    heads over the tensor axis), like the rest of the model.

    formulation "dot": scores and weighted values as tensor-core products, the
    group's query heads padded to 16 rows (the smallest MMA tile); "reduce":
    elementwise products and sums on the CUDA cores. `block`: cache slots per
    loop step; `splits`: programs per (row, head) along the cache (default: one
    block each).
    """
    B, H, D = q_BHD.shape
    G = k_BSGD.shape[2]
    if not supported(H, G, D):
        raise ValueError(
            f"decode_attention needs power-of-two head_dim and heads per group, got "
            f"head_dim={D}, {H} query heads over {G} key/value heads"
        )
    # Rows and heads split as in the rest of the model where they divide evenly (a
    # one-sequence decode cannot be split over the data axes).
    batch, heads = fit_logical((B, G), ("batch", "act_heads"))
    local = functools.partial(
        _decode_attention_local,
        formulation=formulation,
        block=block,
        splits=splits,
        num_warps=num_warps,
    )
    return run_sharded(
        local,
        (q_BHD, k_BSGD, v_BSGD, q_positions_B, q_segments_B, kv_positions_BS, kv_segments_BS),
        logical_in=(
            (batch, heads, None),
            (batch, None, heads, None),
            (batch, None, heads, None),
            (batch,),
            (batch,),
            (batch, None),
            (batch, None),
        ),
        logical_out=(batch, heads, None),
    )


def _decode_attention_local(
    q_BHD, k_BSGD, v_BSGD, q_pos_B, q_seg_B, kv_pos_BS, kv_seg_BS, **settings
):
    formulation, block, splits, num_warps = (
        settings[k] for k in ("formulation", "block", "splits", "num_warps")
    )
    B, H, D = q_BHD.shape
    _, S, G, _ = k_BSGD.shape
    R = H // G
    q_BGRD = q_BHD.reshape(B, G, R, D)
    if formulation == "dot":
        # MMA tiles have at least 16 rows. One query head per group (plain multi-head)
        # is repeated 16 times inside the kernel; several are padded with zero rows here.
        rows = R if R == 1 or R >= 16 else 16
        q_BGRD = jnp.pad(q_BGRD, ((0, 0), (0, 0), (0, rows - R), (0, 0)))
        block = block or 64
        body = _dot_step
    elif formulation == "reduce":
        rows = R
        block = block or max(16, min(_next_power_of_two(S), _REGISTER_BUDGET // (R * D)))
        body = _reduce_step
    else:
        raise ValueError(f"unknown decode_attention formulation {formulation!r}")
    n_blocks = pl.cdiv(S, block)
    # Flash-decoding (Dao et al. 2023): the cache is split over several programs per
    # (row, head) so that enough SMs read it at once; default one block per program.
    splits = min(splits or n_blocks, n_blocks)
    blocks_per_split = pl.cdiv(n_blocks, splits)
    kernel = functools.partial(
        _kernel,
        body=body,
        block=block,
        blocks_per_split=blocks_per_split,
        n_slots=S,
        scale=D**-0.5,
        # the reference's finite mask value (read here: model.attention imports this module)
        mask_value=MASK_VALUE,
    )
    per_program = lambda *shape: pl.BlockSpec(  # noqa: E731
        (None, None, None, *shape), lambda b, g, n: (b, g, n) + (0,) * len(shape)
    )
    acc_BGNRD, max_BGNR, sum_BGNR = pl.pallas_call(
        kernel,
        grid=(B, G, splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, g, n: (b,)),  # query position
            pl.BlockSpec((None,), lambda b, g, n: (b,)),  # query segment
            pl.BlockSpec((None, None, rows, D), lambda b, g, n: (b, g, 0, 0)),
            pl.BlockSpec((None, S, None, D), lambda b, g, n: (b, 0, g, 0)),
            pl.BlockSpec((None, S, None, D), lambda b, g, n: (b, 0, g, 0)),
            pl.BlockSpec((None, S), lambda b, g, n: (b, 0)),
            pl.BlockSpec((None, S), lambda b, g, n: (b, 0)),
        ],
        out_specs=[per_program(rows, D), per_program(rows), per_program(rows)],
        out_shape=[
            jax.ShapeDtypeStruct((B, G, splits, rows, D), jnp.float32),
            jax.ShapeDtypeStruct((B, G, splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((B, G, splits, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret_mode(),
        name="decode_attention",
    )(
        q_pos_B.astype(jnp.int32),
        q_seg_B.astype(jnp.int32),
        q_BGRD,
        k_BSGD,
        v_BSGD,
        kv_pos_BS.astype(jnp.int32),
        kv_seg_BS.astype(jnp.int32),
    )
    # Combine the splits: rescale each to the overall maximum, then normalise.
    acc_BGNRD, max_BGNR, sum_BGNR = (x[:, :, :, :R] for x in (acc_BGNRD, max_BGNR, sum_BGNR))
    weight_BGNR = jnp.exp(max_BGNR - jnp.max(max_BGNR, axis=2, keepdims=True))
    out_BGRD = (
        jnp.sum(weight_BGNR[..., None] * acc_BGNRD, axis=2)
        / jnp.sum(weight_BGNR * sum_BGNR, axis=2)[..., None]
    )
    return out_BGRD.reshape(B, H, D).astype(q_BHD.dtype)


def _kernel(
    q_pos_ref,
    q_seg_ref,
    q_ref,
    k_ref,
    v_ref,
    kv_pos_ref,
    kv_seg_ref,
    acc_ref,
    max_ref,
    sum_ref,
    **static,
):
    """One (row, key/value head, split of the cache): q_ref [R, D], k_ref/v_ref [S, D],
    kv_*_ref [S]; writes the split's unnormalised output, running max and sum."""
    body, block, n_slots, scale = (static[k] for k in ("body", "block", "n_slots", "scale"))
    mask_value = static["mask_value"]
    blocks_per_split = static["blocks_per_split"]
    first_block = pl.program_id(2) * blocks_per_split
    q_pos = q_pos_ref[...]
    q_seg = q_seg_ref[...]
    q_RD = q_ref[...]
    R, D = q_RD.shape
    repeat_query = body is _dot_step and R == 1
    if repeat_query:  # 16 identical rows: the smallest tensor-core product
        q_RD = jnp.broadcast_to(q_RD, (16, D))
        R = 16

    def step(i, carry):
        acc_RD, max_R, sum_R = carry
        slots_K = i * block + jnp.arange(block)
        in_cache_K = slots_K < n_slots
        window = pl.ds(i * block, block)
        kv_pos_K = plgpu.load(kv_pos_ref.at[window], mask=in_cache_K, other=0)
        kv_seg_K = plgpu.load(kv_seg_ref.at[window], mask=in_cache_K, other=0)
        visible_K = (kv_seg_K == q_seg) & (q_seg != 0) & (kv_pos_K <= q_pos)
        k_KD = plgpu.load(k_ref.at[window, :], mask=in_cache_K[:, None], other=0.0)
        v_KD = plgpu.load(v_ref.at[window, :], mask=in_cache_K[:, None], other=0.0)
        scores_RK = body.scores(q_RD, k_KD) * scale
        scores_RK = jnp.where(visible_K[None, :], scores_RK, mask_value)
        new_max_R = jnp.maximum(max_R, jnp.max(scores_RK, axis=-1))
        rescale_R = jnp.exp(max_R - new_max_R)
        # Slots past the end of the cache (block padding) weigh nothing, masked ones do
        # (exp(mask_value - max) is 0 unless the whole row is masked, as in the reference).
        p_RK = jnp.where(in_cache_K[None, :], jnp.exp(scores_RK - new_max_R[:, None]), 0.0)
        acc_RD = acc_RD * rescale_R[:, None] + body.weighted(p_RK, v_KD)
        sum_R = sum_R * rescale_R + jnp.sum(p_RK, axis=-1)
        return acc_RD, new_max_R, sum_R

    init = (
        jnp.zeros((R, D), jnp.float32),
        jnp.full((R,), jnp.finfo(jnp.float32).min, jnp.float32),
        jnp.zeros((R,), jnp.float32),
    )
    last_block = jnp.minimum(first_block + blocks_per_split, pl.cdiv(n_slots, block))
    acc_RD, max_R, sum_R = jax.lax.fori_loop(first_block, last_block, step, init)
    if repeat_query:  # the 16 rows are equal: keep one (max of equal values is exact)
        acc_RD = jnp.max(acc_RD, axis=0, keepdims=True)
        max_R = jnp.max(max_R, axis=0, keepdims=True)
        sum_R = jnp.max(sum_R, axis=0, keepdims=True)
    acc_ref[...] = acc_RD
    max_ref[...] = max_R
    sum_ref[...] = sum_R


class _dot_step:
    """Tensor-core products (bf16 in, float32 accumulate)."""

    @staticmethod
    def scores(q_RD, k_KD):
        return dot(q_RD, k_KD, trans_b=True)

    @staticmethod
    def weighted(p_RK, v_KD):
        return dot(p_RK.astype(v_KD.dtype), v_KD)


class _reduce_step:
    """Elementwise products and sums in float32 on the CUDA cores."""

    @staticmethod
    def scores(q_RD, k_KD):
        q = q_RD.astype(jnp.float32)
        return jnp.sum(q[:, None, :] * k_KD.astype(jnp.float32)[None, :, :], axis=-1)

    @staticmethod
    def weighted(p_RK, v_KD):
        return jnp.sum(p_RK[:, :, None] * v_KD.astype(jnp.float32)[None, :, :], axis=1)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
