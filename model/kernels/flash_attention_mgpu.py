"""Flash attention over packed rows as Mosaic GPU kernels (Hopper only): the three kernels
of `model/kernels/flash_attention.py` (forward; dq with delta; dk and dv), written
warp-specialised as in FlashAttention-3 (Shah et al. 2024). On an H200 they match the
Triton kernels' values; the backward pair is faster at head dimension 128 (gpt-1.3b's
packed step 494.4 -> 489.4 ms) and the default there (`Tuning.bwd_kernel="auto"`, with a
jax at least `RUN_ON_JAX`), while
at head dimension 64 they are no faster and the forward kernel is slower at both, so
elsewhere they are opt-in: `Tuning(fwd_kernel="mgpu", bwd_kernel="mgpu")` (BENCHMARKS.md,
"Speed round twenty-one").

Why a second backend: inside a Triton program the products, the row statistics and the
exponentials wait on one another (BENCHMARKS.md, change 81), and Triton cannot split a
program into warpgroups with different jobs. Here every program runs three warpgroups:
two compute warpgroups own 64 rows each and issue asynchronous `wgmma` products, while a
third only streams the blocks they read into shared memory with TMA copies, `slots`
blocks ahead. Each step's products go to the tensor cores as one group, and the step's
last product is issued with the next step's group, so one step's softmax arithmetic
overlaps the next step's products. That machinery (the producer, grouped products, the
loop over a program's blocks) is `model/kernels/mgpu_pipeline.py`.

The mask rule, the block skipping (`model/kernels/block_visibility.py`: only the blocks
that may hold a visible pair are streamed, and the wholly visible run is computed
without a mask) and the treatment of padding queries (output 0, no gradient) are the
Triton kernels'; so are the inputs and outputs (base-2 log-sum-exp, q/k/v as slots of
5-D arrays, the packed layout's gradient in one array), so `_forward` and `_backward`
there route here where the shapes fit (`supported`).

Segment ids and positions travel as float32 (exact below 2**24) next to each block's
log-sum-exp and delta, so one small copy a block brings every per-token number a step
needs: stats_BH4T holds (lse, delta, segment id, position) along its third axis.

On the CPU the kernels run in Mosaic GPU's interpreter, which simulates the warpgroups,
the copies and the barriers (a wrong slot or phase deadlocks or reads a stale block) but
has no transposed wgmma operands: there each product is computed from loaded values.

Shape letters: B batch, T length (Tp: padded to whole 128-row tiles), H heads (query and
key/value heads alike here), G key/value heads, S slots of the 5-D arrays, D head dim.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.typing import DTypeLike

from model.kernels import mgpu_pipeline as mp
from model.kernels.block_visibility import block_visibility, loop_bounds
from model.masking import MASK_VALUE

_ROWS = 64  # rows a compute warpgroup owns: one wgmma tile
_WGS = 2  # compute warpgroups a program; one more streams the blocks
_TILE = _ROWS * _WGS  # rows a program owns
_LOG2_E = math.log2(math.e)


# The jax release whose Mosaic GPU compiler ran these kernels on a GPU, in the tests and the
# measurements (0.11.2). Older releases lower them (the CPU tests) but never ran them
# compiled here, so "auto" does not pick them there (`flash_attention.Tuning.kernel`).
RUN_ON_JAX = (0, 11)


def run_on_this_jax() -> bool:
    """Whether this jax is at least the release the kernels ran on, compiled (RUN_ON_JAX)."""
    return tuple(jax.__version_info__[:2]) >= RUN_ON_JAX


def supported(n_heads: int, kv_heads: int, head_dim: int, dtype: DTypeLike) -> bool:
    """One query head a key/value head, a head dim the 128-byte swizzle tiles, 16-bit."""
    return (
        n_heads == kv_heads
        and head_dim in (64, 128)
        and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    )


def forward(
    q5: jax.Array, k5: jax.Array, v5: jax.Array, seg: jax.Array, pos: jax.Array,
    *, slots: int, packed: bool, block: int, interpret: bool,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(out_BTGRD, lse_BHTp) like `flash_attention._forward` (R = 1, Tp a multiple of 128):
    q5/k5/v5 as in `backward`."""
    B, T, G, _, D = k5.shape
    q5, k5, v5, seg, pos, Tp = _pad(T, packed, q5, k5, v5, seg, pos)
    ids_B2T = jnp.stack([seg, pos], axis=1).astype(jnp.float32)
    bounds = loop_bounds(*block_visibility(seg, pos, _TILE, block))
    out, lse = _launch(
        functools.partial(_fwd_kernel, **_consts(D, packed, block, slots, interpret)),
        [
            jax.ShapeDtypeStruct((B, Tp, G, D), q5.dtype),
            jax.ShapeDtypeStruct((B, G, Tp), jnp.float32),
        ],
        _fwd_scratch(D, q5.dtype, block, slots),
        (B, G, Tp),
        interpret,
    )(bounds, q5, k5, v5, ids_B2T)
    return out[:, :T, :, None], lse


def backward(
    q5: jax.Array, k5: jax.Array, v5: jax.Array, seg: jax.Array, pos: jax.Array,
    out5: jax.Array, lse: jax.Array, d_out5: jax.Array,
    *, slots: int, packed: bool, block: int, interpret: bool,
) -> tuple[jax.Array, ...]:  # fmt: skip
    """(dq, dk, dv) like `flash_attention._backward`: q5/k5/v5 [B, T, G, S, D] 5-D views
    (the packed array thrice, or q [B, T, G, 1, D] and k, v [B, T, G, 1, D]), out5 and
    d_out5 [B, T, G, 1, D], lse [B, H, Tp'] base 2 from the forward (any Tp' >= T).
    Packed: (dqkv,) in q5's layout; else (dq, dk, dv) shaped like q5, k5, v5."""
    B, T, G, _, D = k5.shape
    H = G
    q5, k5, v5, seg, pos, Tp = _pad(T, packed, q5, k5, v5, seg, pos)
    o_BTHD, do_BTHD = (jnp.pad(x, _row_padding(x, Tp)).reshape(B, Tp, H, D) for x in (out5, d_out5))
    lse = jnp.pad(lse[:, :, :T], [(0, 0), (0, 0), (0, Tp - T)])
    ids_B2T = jnp.stack([seg, pos], axis=1).astype(jnp.float32)
    stats_BH4T = jnp.concatenate(
        [
            lse[:, :, None],
            jnp.zeros_like(lse)[:, :, None],
            jnp.broadcast_to(ids_B2T[:, None], (B, H, 2, Tp)),
        ],
        axis=2,
    )
    consts = _consts(D, packed, block, slots, interpret)

    dq_bounds = loop_bounds(*block_visibility(seg, pos, _TILE, block))
    dq, delta = _launch(
        functools.partial(_dq_kernel, **consts),
        [
            jax.ShapeDtypeStruct((B, Tp, H, D), q5.dtype),
            jax.ShapeDtypeStruct((B, H, Tp), jnp.float32),
        ],
        _dq_scratch(D, q5.dtype, block, slots),
        (B, H, Tp),
        interpret,
    )(dq_bounds, q5, k5, v5, o_BTHD, do_BTHD, stats_BH4T, ids_B2T)

    stats_BH4T = stats_BH4T.at[:, :, 1].set(delta)
    kv_bounds = loop_bounds(
        *(jnp.swapaxes(x, 1, 2) for x in block_visibility(seg, pos, block, _TILE))
    )
    if packed:
        out_type = [jax.ShapeDtypeStruct(q5.shape, q5.dtype)]
    else:
        out_type = [jax.ShapeDtypeStruct((B, Tp, H, D), q5.dtype)] * 2
    grads = _launch(
        functools.partial(_dkv_kernel, packed=packed, **consts),
        out_type,
        _dkv_scratch(D, q5.dtype, block, slots),
        (B, G, Tp),
        interpret,
    )(kv_bounds, q5, k5, v5, do_BTHD, stats_BH4T, ids_B2T, dq)
    if packed:
        return (grads[0][:, :T],)
    dk, dv = (x[:, :T].reshape(B, T, G, 1, D) for x in grads)
    return dq[:, :T].reshape(B, T, G, 1, D), dk, dv


def _row_padding(x, Tp):
    return [(0, 0), (0, Tp - x.shape[1])] + [(0, 0)] * (x.ndim - 2)


def _pad(T, packed, q5, k5, v5, seg, pos):
    """Rows padded to whole tiles (padding tokens: segment 0); packed, one array."""
    Tp = -(-T // _TILE) * _TILE
    q5, seg, pos = (jnp.pad(x, _row_padding(x, Tp)) for x in (q5, seg, pos))
    k5, v5 = (q5, q5) if packed else (jnp.pad(x, _row_padding(x, Tp)) for x in (k5, v5))
    return q5, k5, v5, seg, pos, Tp


def _consts(D, packed, block, slots, interpret):
    return dict(
        block=block, slots=slots, slot_ids=(2, 0, 1) if packed else (0, 0, 0),
        scale2=D**-0.5 * _LOG2_E, scale=D**-0.5, interpret=interpret,
    )  # fmt: skip


def _launch(kernel, out_type, scratch, BHT, interpret):
    """One program a (tile of 128 rows, row, head): two compute warpgroups and a producer."""
    B, H, Tp = BHT
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(Tp // _TILE, B, H),
        grid_names=("tile", "batch", "head"),
        num_threads=_WGS + 1,
        thread_name="wg",
        compiler_params=mp.compiler_params(),
        interpret=mp.interpreter() if interpret else None,
    )


# ----------------------------------------------------------------------------
# Scratch: per compute warpgroup its own rows; per slot one streamed block.


def _fwd_scratch(D, dtype, block, slots):
    return [
        mp.tile_smem((_WGS, _ROWS, D), dtype),  # q, then out on its way out
        plgpu.SMEM((_WGS, 2, _ROWS), jnp.float32),  # own query ids
        plgpu.SMEM((_WGS, _ROWS), jnp.float32),  # lse on its way out
        mp.tile_smem((slots, block, D), dtype),  # k
        mp.tile_smem((slots, block, D), dtype),  # v
        plgpu.SMEM((slots, 2, block), jnp.float32),  # key ids
        plgpu.Barrier(num_barriers=_WGS),  # own rows: q, ids
        plgpu.Barrier(num_barriers=_WGS),
        plgpu.Barrier(num_barriers=slots),  # streamed: k, v, ids
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_arrivals=_WGS, num_barriers=slots),  # slot consumed
    ]


def _dq_scratch(D, dtype, block, slots):
    return [
        mp.tile_smem((_WGS, _ROWS, D), dtype),  # q
        mp.tile_smem((_WGS, _ROWS, D), dtype),  # dO
        mp.tile_smem((_WGS, _ROWS, D), dtype),  # O, then dq on its way out
        plgpu.SMEM((_WGS, 4, _ROWS), jnp.float32),  # own stats
        plgpu.SMEM((_WGS, _ROWS), jnp.float32),  # delta on its way out
        mp.tile_smem((slots, block, D), dtype),  # k
        mp.tile_smem((slots, block, D), dtype),  # v
        plgpu.SMEM((slots, 2, block), jnp.float32),  # key ids
        plgpu.Barrier(num_barriers=_WGS),  # own rows: q, dO, O, stats (4 copies)
        plgpu.Barrier(num_barriers=_WGS),
        plgpu.Barrier(num_barriers=_WGS),
        plgpu.Barrier(num_barriers=_WGS),
        plgpu.Barrier(num_barriers=slots),  # streamed: k, v, ids
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_arrivals=_WGS, num_barriers=slots),  # slot consumed
    ]


def _dkv_scratch(D, dtype, block, slots):
    return [
        mp.tile_smem((_WGS, _ROWS, D), dtype),  # k, then dk on its way out
        mp.tile_smem((_WGS, _ROWS, D), dtype),  # v, then dv
        mp.tile_smem((_WGS, _ROWS, D), dtype),  # dq passing through (packed)
        plgpu.SMEM((_WGS, 2, _ROWS), jnp.float32),  # own key ids
        mp.tile_smem((slots, block, D), dtype),  # q
        mp.tile_smem((slots, block, D), dtype),  # dO
        plgpu.SMEM((slots, 4, block), jnp.float32),  # query stats
        plgpu.Barrier(num_barriers=_WGS),  # own rows: k, v, ids, dq (4 copies)
        plgpu.Barrier(num_barriers=_WGS),
        plgpu.Barrier(num_barriers=_WGS),
        plgpu.Barrier(num_barriers=_WGS),
        plgpu.Barrier(num_barriers=slots),  # streamed: q, dO, stats
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_arrivals=_WGS, num_barriers=slots),  # slot consumed
    ]


# ----------------------------------------------------------------------------
# The kernels. Scores in base 2 as in the Triton kernels: s2 = q.k * D^-0.5 * log2(e).
#
# Each step issues its products as one group and waits for them once. A step's last
# product (p @ v, ds @ k, ds^T @ q) is not waited for in that step: it is issued with
# the next step's first products (FlashAttention-3's intra-warpgroup overlap), so the
# softmax arithmetic of one step and the tensor cores' work of the next overlap, and the
# block it read is released to the producer only then.


class _Program(NamedTuple):
    """Where a program is: tile n, row b, head h (of the grid), its warpgroup wg, its
    loop bounds, and the 64 rows a compute warpgroup owns."""

    n: jax.Array
    b: jax.Array
    h: jax.Array
    wg: jax.Array
    bounds: tuple
    rows: pl.Slice


def _program(bounds_ref) -> _Program:
    n, b, h = lax.axis_index("tile"), lax.axis_index("batch"), lax.axis_index("head")
    wg = lax.axis_index("wg")
    bounds = tuple(bounds_ref[b, n, i] for i in range(4))
    return _Program(n, b, h, wg, bounds, pl.ds(n * _TILE + wg * _ROWS, _ROWS))


def _warp_specialised(wg, producer, compute) -> None:
    """The last warpgroup streams blocks (`producer`); the others, given the registers
    the producer gives up, run `compute`."""
    pl.when(wg == _WGS)(producer)

    @pl.when(wg < _WGS)
    def _():
        plgpu.set_max_registers(232, action="increase")
        compute()


def _visible(q_seg, q_pos, k_seg, k_pos):
    """The mask rule (`model.masking.attention_mask`) on broadcast tiles."""
    return (q_seg == k_seg) & (q_seg != 0.0) & (k_pos <= q_pos)


def _key_producer(at: _Program, slot_ids, gmem, smem, barriers, block, slots, consumed):
    """The producer of the forward and dq kernels: streams key blocks' k, v and (segment
    id, position) for the program's row and head (gmem, smem, barriers: those three each)."""
    (k_ref, v_ref, ids_ref), (_, k_slot, v_slot) = gmem, slot_ids
    views = (
        lambda keys: k_ref.at[at.b, keys, at.h, k_slot],
        lambda keys: v_ref.at[at.b, keys, at.h, v_slot],
        lambda keys: ids_ref.at[at.b, :, keys],
    )
    return lambda: mp.stream(at.bounds, block, slots, consumed, list(zip(views, smem, barriers)))


def _sees_keys(q_seg, q_pos, kid_block, tile, interpret):
    """The mask of a [queries, keys] tile: the query rows' ids and positions (row vectors)
    against a streamed key block's (kid_block [2, keys] in shared memory)."""
    col = plgpu.Layout.WGMMA.reduce(0)
    k_seg, k_pos = (mp.load(kid_block.at[i], col, interpret) for i in (0, 1))
    return _visible(
        mp.rows(q_seg, tile), mp.rows(q_pos, tile), mp.cols(k_seg, tile), mp.cols(k_pos, tile)
    )


def _fwd_kernel(
    bounds_ref, q_ref, k_ref, v_ref, ids_ref,  # inputs
    o_ref, lse_ref,  # outputs
    q_smem, qid_smem, lse_smem, k_smem, v_smem, kid_smem,
    q_bar, qid_bar, k_bar, v_bar, kid_bar, consumed,
    *, block, slots, slot_ids, scale2, scale, interpret,
):  # fmt: skip
    """One (query tile, row, head): the output and base-2 log-sum-exp of its 128 queries,
    over the key blocks they may see (Dao et al. 2022's running maximum and sum)."""
    del scale
    at = _program(bounds_ref)
    b, h, wg, rows = at.b, at.h, at.wg, at.rows
    q_slot = slot_ids[0]
    D = q_smem.shape[-1]
    tile = (_ROWS, block)
    producer = _key_producer(
        at, slot_ids, (k_ref, v_ref, ids_ref), (k_smem, v_smem, kid_smem),
        (k_bar, v_bar, kid_bar), block, slots, consumed,
    )  # fmt: skip

    def compute():
        q_own, id_own = q_smem.at[wg], qid_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h, q_slot], q_own, q_bar.at[wg])
        plgpu.copy_gmem_to_smem(ids_ref.at[b, :, rows], id_own, qid_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        plgpu.barrier_wait(qid_bar.at[wg])
        row = plgpu.Layout.WGMMA.reduce(1)
        q_seg, q_pos = (mp.load(id_own.at[i], row, interpret) for i in (0, 1))

        def step(j, slot, carry, masked, first):
            acc, m, total, p_prev, prev = carry
            plgpu.barrier_wait(k_bar.at[slot])
            scores = (None, q_own, k_smem.at[slot], True)
            if first:
                (s,) = mp.products([scores], interpret)
            else:  # the previous block's p @ v, deferred to here
                acc, s = mp.products([(acc, p_prev, v_smem.at[prev], False), scores], interpret)
                plgpu.barrier_arrive(consumed.at[prev])
            s2 = s * scale2
            plgpu.barrier_wait(kid_bar.at[slot])
            if masked:
                visible = _sees_keys(q_seg, q_pos, kid_smem.at[slot], tile, interpret)
                s2 = jnp.where(visible, s2, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s2, axis=1))
            p = jnp.exp2(s2 - mp.rows(m_new, tile))
            if masked:  # masked keys weigh exactly 0 (a row that saw nothing keeps total 0)
                p = jnp.where(visible, p, 0.0)
            rescale = jnp.exp2(m - m_new)
            acc = acc * mp.rows(rescale, acc.shape)
            total = total * rescale + jnp.sum(p, axis=1)
            plgpu.barrier_wait(v_bar.at[slot])
            return acc, m_new, total, p.astype(v_smem.dtype), slot

        def flush(slot, carry):
            acc, m, total, p_prev, _ = carry
            (acc,) = mp.products([(acc, p_prev, v_smem.at[slot], False)], interpret)
            plgpu.barrier_arrive(consumed.at[slot])
            return acc, m, total, p_prev, slot

        init = (
            mp.cast(jnp.zeros((_ROWS, D), jnp.float32), plgpu.Layout.WGMMA, interpret),
            mp.cast(jnp.full((_ROWS,), MASK_VALUE, jnp.float32), row, interpret),
            mp.cast(jnp.zeros((_ROWS,), jnp.float32), row, interpret),
            mp.cast(jnp.zeros(tile, v_smem.dtype), plgpu.Layout.WGMMA, interpret),
            jnp.int32(0),
        )
        acc, m, total, _, _ = mp.run_blocks(at.bounds, slots, step, flush, init)
        seen = total > 0  # False only for padding queries: output 0, and no gradient
        total = jnp.where(seen, total, 1.0)
        q_own[...] = (acc / mp.rows(total, acc.shape)).astype(q_own.dtype)
        lse_smem.at[wg][...] = jnp.where(seen, m + jnp.log(total) * _LOG2_E, 0.0)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_own, o_ref.at[b, rows, h])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows])
        plgpu.wait_smem_to_gmem(0)

    _warp_specialised(wg, producer, compute)


def _dq_kernel(
    bounds_ref, q_ref, k_ref, v_ref, o_ref, do_ref, stats_ref, ids_ref,  # inputs
    dq_ref, delta_ref,  # outputs
    q_smem, do_smem, o_smem, own_smem, delta_smem, k_smem, v_smem, kid_smem,
    q_bar, do_bar, o_bar, own_bar, k_bar, v_bar, kid_bar, consumed,
    *, block, slots, slot_ids, scale2, scale, interpret,
):  # fmt: skip
    """One (query tile, row, head): dq and delta = rowsum(dO * O) over the key blocks
    its 128 queries may see; each compute warpgroup owns 64 of the queries."""
    at = _program(bounds_ref)
    b, h, wg, rows = at.b, at.h, at.wg, at.rows
    q_slot = slot_ids[0]
    D = q_smem.shape[-1]
    tile = (_ROWS, block)
    producer = _key_producer(
        at, slot_ids, (k_ref, v_ref, ids_ref), (k_smem, v_smem, kid_smem),
        (k_bar, v_bar, kid_bar), block, slots, consumed,
    )  # fmt: skip

    def compute():
        q_own, do_own, o_own = q_smem.at[wg], do_smem.at[wg], o_smem.at[wg]
        st_own = own_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h, q_slot], q_own, q_bar.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_own, do_bar.at[wg])
        plgpu.copy_gmem_to_smem(o_ref.at[b, rows, h], o_own, o_bar.at[wg])
        plgpu.copy_gmem_to_smem(stats_ref.at[b, h, :, rows], st_own, own_bar.at[wg])
        for bar in (q_bar, do_bar, o_bar, own_bar):
            plgpu.barrier_wait(bar.at[wg])
        row = plgpu.Layout.WGMMA.reduce(1)
        lse, q_seg, q_pos = (mp.load(st_own.at[i], row, interpret) for i in (0, 2, 3))
        o = mp.load(o_own, plgpu.Layout.WGMMA, interpret).astype(jnp.float32)
        do = mp.load(do_own, plgpu.Layout.WGMMA, interpret).astype(jnp.float32)
        delta = jnp.sum(o * do, axis=1)

        def step(j, slot, carry, masked, first):
            dq, ds_prev, prev = carry
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            terms = [
                (None, q_own, k_smem.at[slot], True),
                (None, do_own, v_smem.at[slot], True),
            ]
            if first:
                s, dp = mp.products(terms, interpret)
            else:  # the previous block's ds @ k, deferred to here
                deferred = (dq, ds_prev, k_smem.at[prev], False)
                dq, s, dp = mp.products([deferred, *terms], interpret)
                plgpu.barrier_arrive(consumed.at[prev])
            p = jnp.exp2(s * scale2 - mp.rows(lse, tile))
            plgpu.barrier_wait(kid_bar.at[slot])
            if masked:
                visible = _sees_keys(q_seg, q_pos, kid_smem.at[slot], tile, interpret)
                p = jnp.where(visible, p, 0.0)
            ds = p * (dp - mp.rows(delta, tile))
            return dq, ds.astype(k_smem.dtype), slot

        def flush(slot, carry):
            dq, ds_prev, _ = carry
            (dq,) = mp.products([(dq, ds_prev, k_smem.at[slot], False)], interpret)
            plgpu.barrier_arrive(consumed.at[slot])
            return dq, ds_prev, slot

        init = (
            mp.cast(jnp.zeros((_ROWS, D), jnp.float32), plgpu.Layout.WGMMA, interpret),
            mp.cast(jnp.zeros(tile, k_smem.dtype), plgpu.Layout.WGMMA, interpret),
            jnp.int32(0),
        )
        dq, _, _ = mp.run_blocks(at.bounds, slots, step, flush, init)
        o_own[...] = (dq * scale).astype(o_own.dtype)
        delta_smem.at[wg][...] = delta
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_own, dq_ref.at[b, rows, h])
        plgpu.copy_smem_to_gmem(delta_smem.at[wg], delta_ref.at[b, h, rows])
        plgpu.wait_smem_to_gmem(0)

    _warp_specialised(wg, producer, compute)


def _dkv_kernel(
    bounds_ref, q_ref, k_ref, v_ref, do_ref, stats_ref, ids_ref, dq_ref,  # inputs
    *refs, block, slots, slot_ids, scale2, scale, packed, interpret,
):  # fmt: skip
    """One (key tile, row, head): dk and dv over the query blocks that may see its 128
    keys; each compute warpgroup owns 64 of the keys. Tiles are [keys, queries]. Packed,
    the one output holds dq too: this program passes its rows of dq through."""
    outs, refs = (refs[:1], refs[1:]) if packed else (refs[:2], refs[2:])
    (k_smem, v_smem, dq_smem, kid_smem, q_smem, do_smem, st_smem,
     k_bar, v_bar, kid_bar, dq_bar, q_bar, do_bar, st_bar, consumed) = refs  # fmt: skip
    at = _program(bounds_ref)
    b, g, wg, rows = at.b, at.h, at.wg, at.rows
    q_slot, k_slot, v_slot = slot_ids
    D = k_smem.shape[-1]
    tile = (_ROWS, block)

    def producer():
        streams = [
            (lambda queries: q_ref.at[b, queries, g, q_slot], q_smem, q_bar),
            (lambda queries: do_ref.at[b, queries, g], do_smem, do_bar),
            (lambda queries: stats_ref.at[b, g, :, queries], st_smem, st_bar),
        ]
        mp.stream(at.bounds, block, slots, consumed, streams)

    def compute():
        k_own, v_own, dq_own = k_smem.at[wg], v_smem.at[wg], dq_smem.at[wg]
        id_own = kid_smem.at[wg]
        plgpu.copy_gmem_to_smem(k_ref.at[b, rows, g, k_slot], k_own, k_bar.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, rows, g, v_slot], v_own, v_bar.at[wg])
        plgpu.copy_gmem_to_smem(ids_ref.at[b, :, rows], id_own, kid_bar.at[wg])
        if packed:  # read now, written at the end: the copy overlaps the work
            plgpu.copy_gmem_to_smem(dq_ref.at[b, rows, g], dq_own, dq_bar.at[wg])
        for bar in (k_bar, v_bar, kid_bar):
            plgpu.barrier_wait(bar.at[wg])
        row = plgpu.Layout.WGMMA.reduce(1)
        k_seg, k_pos = (mp.load(id_own.at[i], row, interpret) for i in (0, 1))

        def step(j, slot, carry, masked, first):
            dk, dv, ds_prev, prev = carry
            plgpu.barrier_wait(q_bar.at[slot])
            scores = (None, k_own, q_smem.at[slot], True)
            if first:
                (s_t,) = mp.products([scores], interpret)
            else:  # the previous block's ds^T @ q, deferred to here
                dk, s_t = mp.products([(dk, ds_prev, q_smem.at[prev], False), scores], interpret)
                plgpu.barrier_arrive(consumed.at[prev])
            plgpu.barrier_wait(st_bar.at[slot])
            col = plgpu.Layout.WGMMA.reduce(0)
            lse, delta = (mp.load(st_smem.at[slot, i], col, interpret) for i in (0, 1))
            p_t = jnp.exp2(s_t * scale2 - mp.cols(lse, tile))
            if masked:
                q_seg, q_pos = (mp.load(st_smem.at[slot, i], col, interpret) for i in (2, 3))
                visible = _visible(
                    mp.cols(q_seg, tile),
                    mp.cols(q_pos, tile),
                    mp.rows(k_seg, tile),
                    mp.rows(k_pos, tile),
                )
                p_t = jnp.where(visible, p_t, 0.0)
            plgpu.barrier_wait(do_bar.at[slot])
            do_blk = do_smem.at[slot]
            dv, dp_t = mp.products(
                [(dv, p_t.astype(do_smem.dtype), do_blk, False), (None, v_own, do_blk, True)],
                interpret,
            )
            ds_t = p_t * (dp_t - mp.cols(delta, tile))
            return dk, dv, ds_t.astype(q_smem.dtype), slot

        def flush(slot, carry):
            dk, dv, ds_prev, _ = carry
            (dk,) = mp.products([(dk, ds_prev, q_smem.at[slot], False)], interpret)
            plgpu.barrier_arrive(consumed.at[slot])
            return dk, dv, ds_prev, slot

        zeros = mp.cast(jnp.zeros((_ROWS, D), jnp.float32), plgpu.Layout.WGMMA, interpret)
        init = (
            zeros,
            zeros,
            mp.cast(jnp.zeros(tile, q_smem.dtype), plgpu.Layout.WGMMA, interpret),
            jnp.int32(0),
        )
        dk, dv, _, _ = mp.run_blocks(at.bounds, slots, step, flush, init)
        k_own[...] = (dk * scale).astype(k_own.dtype)
        v_own[...] = dv.astype(v_own.dtype)
        plgpu.commit_smem()
        if packed:
            (dqkv_ref,) = outs
            plgpu.barrier_wait(dq_bar.at[wg])
            plgpu.copy_smem_to_gmem(dq_own, dqkv_ref.at[b, rows, g, q_slot])
            plgpu.copy_smem_to_gmem(k_own, dqkv_ref.at[b, rows, g, k_slot])
            plgpu.copy_smem_to_gmem(v_own, dqkv_ref.at[b, rows, g, v_slot])
        else:
            dk_ref, dv_ref = outs
            plgpu.copy_smem_to_gmem(k_own, dk_ref.at[b, rows, g])
            plgpu.copy_smem_to_gmem(v_own, dv_ref.at[b, rows, g])
        plgpu.wait_smem_to_gmem(0)

    _warp_specialised(wg, producer, compute)
