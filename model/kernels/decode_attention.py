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
# Who combines the splits of a (row, head): an XLA fusion after the kernel, or the last
# of its programs to finish, inside the kernel (one kernel a layer fewer).
COMBINES = ("xla", "kernel")


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
    arrivals_BG: jax.Array | None = None,
    *,
    formulation: str = "dot",
    block: int | None = None,
    splits: int | None = None,
    num_warps: int = 4,
    combine: str = "xla",
) -> tuple[jax.Array, jax.Array]:
    """(out_BHD, arrivals_BG): masked softmax(q k^T / sqrt(D)) v for one query per row.

    `combine="kernel"`: `arrivals_BG` (int32, zero) counts the programs of each (row,
    key/value head) that have finished, so that the last one combines the splits (see
    `_kernel`); it is returned zero again, updated in place, for the next step. A decoding
    cache carries it (`model.attention.LayerCache`); None allocates one here (a memset
    kernel more). "xla" (the default until "kernel" is measured faster on a GPU) leaves
    the combining to XLA and the counts untouched.

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
    if combine not in COMBINES:
        raise ValueError(f"decode_attention: combine must be one of {COMBINES}, got {combine!r}")
    if arrivals_BG is None:
        arrivals_BG = jnp.zeros((B, G), jnp.int32)
    if arrivals_BG.shape != (B, G) or arrivals_BG.dtype != jnp.int32:
        raise ValueError(
            f"decode_attention: arrivals_BG must be int32 of shape {(B, G)}, got "
            f"{arrivals_BG.dtype} {arrivals_BG.shape}"
        )
    local = functools.partial(
        _decode_attention_local,
        formulation=formulation,
        block=block,
        splits=splits,
        num_warps=num_warps,
        combine=combine,
    )
    return run_sharded(
        local,
        (
            q_BHD,
            k_BSGD,
            v_BSGD,
            q_positions_B,
            q_segments_B,
            kv_positions_BS,
            kv_segments_BS,
            arrivals_BG,
        ),
        logical_in=(
            (batch, heads, None),
            (batch, None, heads, None),
            (batch, None, heads, None),
            (batch,),
            (batch,),
            (batch, None),
            (batch, None),
            (batch, heads),
        ),
        logical_out=((batch, heads, None), (batch, heads)),
    )


def _decode_attention_local(
    q_BHD, k_BSGD, v_BSGD, q_pos_B, q_seg_B, kv_pos_BS, kv_seg_BS, arrivals_BG, **settings
):
    formulation, block, splits, num_warps, combine = (
        settings[k] for k in ("formulation", "block", "splits", "num_warps", "combine")
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
    splits = pl.cdiv(n_blocks, blocks_per_split)  # none of them empty
    interpret = interpret_mode()
    kernel = functools.partial(
        _kernel,
        interpret=interpret,
        combine=combine,
        body=body,
        block=block,
        blocks_per_split=blocks_per_split,
        splits=splits,
        n_slots=S,
        scale=D**-0.5,
        # the reference's finite mask value (read here: model.attention imports this module)
        mask_value=MASK_VALUE,
    )
    # each program's block: the whole of its (row, head)'s output, arrivals and partials
    head = lambda *shape: pl.BlockSpec(  # noqa: E731
        (None, None, *shape), lambda b, g, n: (b, g) + (0,) * len(shape)
    )
    count = pl.BlockSpec((None, 1), lambda b, g, n: (b, g))  # an atomic needs an index
    padded = _next_power_of_two(splits)  # the partials' loads need power-of-two shapes
    per_split = lambda *shape: jax.ShapeDtypeStruct((B, G, padded, *shape), jnp.float32)  # noqa: E731
    out_BGRD, arrivals_BG, *partials = pl.pallas_call(
        kernel,
        grid=(B, G, splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, g, n: (b,)),  # query position
            pl.BlockSpec((None,), lambda b, g, n: (b,)),  # query segment
            head(rows, D),
            pl.BlockSpec((None, S, None, D), lambda b, g, n: (b, 0, g, 0)),
            pl.BlockSpec((None, S, None, D), lambda b, g, n: (b, 0, g, 0)),
            pl.BlockSpec((None, S), lambda b, g, n: (b, 0)),
            pl.BlockSpec((None, S), lambda b, g, n: (b, 0)),
            count,
        ],
        out_specs=[
            head(rows, D),
            count,
            head(padded, rows, D),
            head(padded, rows),
            head(padded, rows),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, G, rows, D), q_BHD.dtype),
            jax.ShapeDtypeStruct((B, G), jnp.int32),
            per_split(rows, D),  # each split's unnormalised output,
            per_split(rows),  # its running max
            per_split(rows),  # and its sum
        ],
        input_output_aliases={7: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="decode_attention",
    )(
        q_pos_B.astype(jnp.int32),
        q_seg_B.astype(jnp.int32),
        q_BGRD,
        k_BSGD,
        v_BSGD,
        kv_pos_BS.astype(jnp.int32),
        kv_seg_BS.astype(jnp.int32),
        arrivals_BG,
    )
    if combine == "xla" and splits > 1:
        real = (slice(None), slice(None), slice(splits), slice(R))  # splits, query heads
        out_BGRD = _combine_after(*(x[real] for x in partials)).astype(q_BHD.dtype)
    return out_BGRD[:, :, :R].reshape(B, H, D), arrivals_BG


def _combine_after(acc_BGNRD, max_BGNR, sum_BGNR):
    """The splits rescaled to their overall maximum, then normalised, by XLA."""
    weight_BGNR = jnp.exp(max_BGNR - jnp.max(max_BGNR, axis=2, keepdims=True))
    return (
        jnp.sum(weight_BGNR[..., None] * acc_BGNRD, axis=2)
        / jnp.sum(weight_BGNR * sum_BGNR, axis=2)[..., None]
    )


def _kernel(
    q_pos_ref,
    q_seg_ref,
    q_ref,
    k_ref,
    v_ref,
    kv_pos_ref,
    kv_seg_ref,
    _,  # arrivals, aliased to arrivals_ref
    out_ref,
    arrivals_ref,
    acc_ref,
    max_ref,
    sum_ref,
    **static,
):
    """One (row, key/value head, split of the cache): q_ref [R, D], k_ref/v_ref [S, D],
    kv_*_ref [S]. Stores the split's unnormalised output, running max and sum; with
    `combine="kernel"` the last of the (row, head)'s programs to finish combines them into
    out_ref [R, D], in place of an XLA kernel after this one.
    """
    body, block, n_slots, scale = (static[k] for k in ("body", "block", "n_slots", "scale"))
    mask_value, splits = static["mask_value"], static["splits"]
    blocks_per_split = static["blocks_per_split"]
    split = pl.program_id(2)
    first_block = split * blocks_per_split
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
    if splits == 1:
        out_ref[...] = (acc_RD / sum_R[:, None]).astype(out_ref.dtype)
        return
    acc_ref[split] = acc_RD
    max_ref[split] = max_R
    sum_ref[split] = sum_R
    if static["combine"] == "xla":
        return
    # Every thread's stores are issued before the count; the count's release (acq_rel,
    # GPU scope) makes them visible to the program that reads the count last. (The
    # interpreter runs the programs one after another.)
    if not static["interpret"]:
        plgpu.debug_barrier()
    arrived = plgpu.atomic_add(arrivals_ref, jnp.int32(0), jnp.int32(1))

    @pl.when(arrived == splits - 1)
    def _():
        arrivals_ref[...] = jnp.zeros((1,), jnp.int32)  # zero again for the next step
        out_ref[...] = _combine(acc_ref, max_ref, sum_ref, splits).astype(out_ref.dtype)


def _combine(acc_ref, max_ref, sum_ref, splits: int) -> jax.Array:
    """[R, D]: `_combine_after` for one (row, head), inside the kernel. Volatile loads:
    other SMs stored these values during this kernel."""
    padded = max_ref.shape[0]
    real_NR = jnp.broadcast_to((jnp.arange(padded) < splits)[:, None], max_ref.shape)
    lowest = jnp.finfo(jnp.float32).min
    max_NR = plgpu.load(max_ref, mask=real_NR, other=lowest, volatile=True)
    sum_NR = plgpu.load(sum_ref, mask=real_NR, other=0.0, volatile=True)
    top_R = jnp.max(max_NR, axis=0)
    weight_NR = jnp.where(real_NR, jnp.exp(max_NR - top_R[None, :]), 0.0)
    total_R = jnp.sum(weight_NR * sum_NR, axis=0)

    def add(n, acc_RD):
        acc_n_RD = plgpu.load(acc_ref.at[n], volatile=True)
        weight_R = plgpu.load(max_ref.at[n], volatile=True)
        return acc_RD + jnp.exp(weight_R - top_R)[:, None] * acc_n_RD

    acc_RD = jax.lax.fori_loop(0, splits, add, jnp.zeros(acc_ref.shape[1:], jnp.float32))
    return acc_RD / total_R[:, None]


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
