"""Flash attention over packed rows (segment ids and per-document positions), as Pallas
(Triton) kernels: one forward kernel, and a backward pass of two kernels (dq; dk and dv).

The mask rule is exactly `model.masking.attention_mask`: query i sees key j when both
carry the same non-zero segment id and position[j] <= position[i]. So the kernel takes
the per-token segment ids and positions instead of a dense [B, T, T] mask, and never
builds one: each program builds its [block_q, block_k] piece of the mask from the
block's ids and positions. Scores and the softmax are float32 (Dao et al. 2022: the
running maximum and sum; Dao 2023: the backward pass recomputes probabilities from the
saved log-sum-exp and runs dq and dk/dv as separate kernels, so neither needs atomics).

Block skipping: which key blocks a query block can see depends on the data (positions
restart in every document); `model/kernels/block_visibility.py` derives each kernel's loop
bounds from per-block summaries of the ids and positions, and skipping never changes the
result. Inside a query block's range, the run of blocks where every pair is visible is
computed without building the mask.

Padding queries (segment 0) see nothing. The reference gives them the uniform average
of all values (its finite MASK_VALUE); here their output is 0 and they pass no
gradient. Nothing reads those rows: their loss weight is 0.

Packed q/k/v (`flash_attention_packed`): one [B, T, G, R + 2, D] array holding, per
key/value head g, its key, its value and its R query heads, the output of one projection
with stacked weights. The kernels read q, k and v from it in place, and the backward pass
writes dq, dk and dv into one array of the same layout, so the projection's backward is
one input-gradient product and one weight-gradient product instead of three each and a sum.

Shape letters: B batch, T length (Tp: padded to whole blocks), H query heads, G key/value
heads, R = H // G query heads per group, S slots per group (R + 2 when packed), D head
dim, N blocks along T.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.typing import DTypeLike

from model.kernels import flash_attention_mgpu
from model.kernels.block_visibility import block_visibility, loop_bounds
from model.kernels.partition import dot, fit_logical, interpret_mode, on_hopper, run_sharded
from model.masking import MASK_VALUE

_LOG2_E = math.log2(math.e)  # exp(x) = exp2(x * log2(e)): exp2 is the cheaper instruction


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Block sizes and launch settings, chosen by measurement on an H200 (BENCHMARKS.md,
    flash attention and speed rounds seven and twelve); tests pass small blocks."""

    # query rows a forward program: None = 128 at head_dim 128 (the one size measured
    # to gain; above it the larger query block may not fit shared memory), else 64. At
    # gpt2-124m's batch 64 (head_dim 64) 64 x 64 blocks gave the fastest forward of nine
    # settings; at gpt-1.3b's batch 16 (head_dim 128) 128 x 64 took 1.026, 0.972 ms
    # against 1.220, 1.135 ("Speed round twelve", change 61).
    fwd_block_q: int | None = None
    fwd_block_k: int = 64
    fwd_warps: int = 4
    dq_block_q: int = 64
    dq_block_k: int = 64
    dkv_block_q: int = 64
    dkv_block_k: int = 64
    bwd_warps: int = 4
    # software-pipelined key/value loads: None = 3 for head_dim <= 64, 2 above. Three
    # stages made gpt2-124m's packed step 1.7 ms faster on an H200 (122.0, 122.2 ->
    # 120.0, 120.8 ms; BENCHMARKS.md, "Speed round seven"), while the kernel at gpt-1.3b's
    # head_dim 128 took 3.9 instead of 3.3 ms (shared memory for the third stage).
    num_stages: int | None = None
    # the forward and backward passes: "triton" (the kernels below), "mgpu" (the
    # warp-specialised Mosaic GPU kernels of `flash_attention_mgpu.py`: Hopper; one query
    # head a key/value head, head_dim 64 or 128, 16-bit; "triton" where they do not fit) or,
    # for the backward pass, "auto": "mgpu" at head_dim 128 on a Hopper GPU, where it was
    # measured faster (gpt-1.3b's packed step 494.4 -> 489.4 ms, the pair alone -7%), with
    # a jax at least the one it ran on (`flash_attention_mgpu.RUN_ON_JAX`), and "triton"
    # elsewhere (at head_dim 64 no faster; the forward slower at both; BENCHMARKS.md,
    # "Speed round twenty-one")
    fwd_kernel: str = "triton"
    bwd_kernel: str = "auto"
    mgpu_block: int = 64  # their streamed block
    mgpu_slots: int = 3  # and their pipeline depth

    def kernel(self, which: str, H: int, G: int, D: int, dtype: DTypeLike, interpret: bool) -> str:
        """The kernel ("triton" or "mgpu") for pass `which` ("fwd" or "bwd") at these shapes."""
        kind = self.fwd_kernel if which == "fwd" else self.bwd_kernel
        if kind == "auto":
            measured = D == 128 and not interpret and on_hopper()
            kind = "mgpu" if measured and flash_attention_mgpu.run_on_this_jax() else "triton"
        if kind == "mgpu" and flash_attention_mgpu.supported(H, G, D, dtype):
            return "mgpu"
        return "triton"

    def stages(self, head_dim: int) -> int:
        if self.num_stages is not None:
            return self.num_stages
        return 3 if head_dim <= 64 else 2

    def fwd_q(self, head_dim: int) -> int:
        if self.fwd_block_q is not None:
            return self.fwd_block_q
        return 128 if head_dim == 128 else 64

    def row_multiple(self, head_dim: int) -> int:
        """Rows are padded to a multiple of every block size (all powers of two)."""
        return max(
            self.fwd_q(head_dim),
            self.fwd_block_k,
            self.dq_block_q,
            self.dq_block_k,
            self.dkv_block_q,
            self.dkv_block_k,
        )


DEFAULT_TUNING = Tuning()


def supported(n_heads: int, kv_heads: int, head_dim: int) -> bool:
    """Triton's matrix products need a power-of-two head dim of at least 16."""
    return n_heads % kv_heads == 0 and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def flash_attention(
    q_BTHD: jax.Array,
    k_BTGD: jax.Array,
    v_BTGD: jax.Array,
    segment_ids_BT: jax.Array | None,
    positions_BT: jax.Array,
    *,
    tuning: Tuning | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """out_BTHD: softmax(q k^T / sqrt(D), masked by `attention_mask`) v, differentiable in
    q, k and v. `segment_ids_BT=None` means one document per row.

    Runs per device under the active mesh (rows split over the batch axes, heads over
    the tensor axis); `interpret` defaults to True off the GPU, `tuning` to
    `DEFAULT_TUNING` as it is when called.
    """
    B, T, H, D = q_BTHD.shape
    G = k_BTGD.shape[2]
    if k_BTGD.shape != (B, T, G, D) or v_BTGD.shape != k_BTGD.shape:
        raise ValueError(
            f"flash_attention: k and v must be [B, T, G, D] = [{B}, {T}, G, {D}] like q "
            f"{q_BTHD.shape}, got k {k_BTGD.shape} and v {v_BTGD.shape}"
        )
    if not supported(H, G, D):
        raise ValueError(
            f"flash_attention needs a power-of-two head_dim >= 16 and query heads a multiple "
            f"of key/value heads, got head_dim={D}, {H} query heads, {G} key/value heads"
        )
    if not q_BTHD.dtype == k_BTGD.dtype == v_BTGD.dtype:
        raise ValueError(
            f"flash_attention: q, k and v must share one dtype, got "
            f"{q_BTHD.dtype}, {k_BTGD.dtype}, {v_BTGD.dtype}"
        )
    interpret = interpret_mode() if interpret is None else interpret
    R = H // G
    tuning = DEFAULT_TUNING if tuning is None else tuning
    out_BTGRD = _make_attention(tuning, bool(interpret), packed=False)(
        (q_BTHD.reshape(B, T, G, R, D), k_BTGD[:, :, :, None], v_BTGD[:, :, :, None]),
        *_ids(segment_ids_BT, positions_BT, B, T),
    )
    return out_BTGRD.reshape(B, T, H, D)


def flash_attention_packed(
    qkv_BTGSD: jax.Array,
    segment_ids_BT: jax.Array | None,
    positions_BT: jax.Array,
    *,
    tuning: Tuning | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """`flash_attention` of q, k and v packed in one array (module docstring):
    qkv_BTGSD[:, :, g] holds key/value head g's key (slot 0), value (slot 1) and its R
    query heads (slots 2 .. R + 1; query head h = g * R + r). Returns out_BTHD; the
    gradient comes back in the same packed layout."""
    B, T, G, S, D = qkv_BTGSD.shape
    R = S - 2
    if R < 1 or not supported(G * R, G, D):
        raise ValueError(
            f"flash_attention_packed: qkv must be [B, T, G, R + 2, D] with R >= 1 and a "
            f"power-of-two D >= 16, got {qkv_BTGSD.shape}"
        )
    interpret = interpret_mode() if interpret is None else interpret
    tuning = DEFAULT_TUNING if tuning is None else tuning
    out_BTGRD = _make_attention(tuning, bool(interpret), packed=True)(
        qkv_BTGSD, *_ids(segment_ids_BT, positions_BT, B, T)
    )
    return out_BTGRD.reshape(B, T, G * R, D)


def _ids(segment_ids_BT, positions_BT, B, T):
    """(segment ids, positions) as int32 [B, T]; no ids: one document per row."""
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    for name, x in (("segment_ids", segment_ids_BT), ("positions", positions_BT)):
        if x.shape != (B, T):
            raise ValueError(f"flash_attention: {name} must be [B, T] = [{B}, {T}], got {x.shape}")
    return segment_ids_BT.astype(jnp.int32), positions_BT.astype(jnp.int32)


# Where q, k and v sit along the slot axis of the 5-D arrays the kernels read: packed,
# all three in one array (key, value, then the query heads); separate, q [B, T, G, R, D]
# and k, v [B, T, G, 1, D].
_PACKED_SLOTS = (2, 0, 1)
_SEPARATE_SLOTS = (0, 0, 0)


@functools.cache
def _make_attention(tuning: Tuning, interpret: bool, packed: bool):
    """The custom_vjp (qkv, segment_ids, positions) -> out_BTGRD for one static setting;
    qkv is the packed array, or the tuple (q, k, v) of 5-D views."""
    settings = dict(tuning=tuning, interpret=interpret, packed=packed)
    split = (lambda qkv: (qkv, qkv, qkv)) if packed else (lambda qkv: qkv)  # noqa: E731

    @jax.custom_vjp
    def attention(qkv, seg, pos):
        return _sharded_forward(*split(qkv), seg, pos, **settings)[0]

    def fwd(qkv, seg, pos):
        out, lse = _sharded_forward(*split(qkv), seg, pos, **settings)
        return out, (qkv, seg, pos, out, lse)

    def bwd(residuals, d_out):
        qkv, seg, pos, out, lse = residuals
        grads = _sharded_backward(*split(qkv), seg, pos, out, lse, d_out, **settings)
        # no gradient for the integer ids and positions
        return (grads[0] if packed else tuple(grads)), None, None

    attention.defvjp(fwd, bwd)
    return attention


# ----------------------------------------------------------------------------
# Sharding: rows over the batch axes, heads over the tensor axis (query and key/value
# heads split alike, so each device keeps whole groups).


def _logical(x_BTGSD):
    batch, heads = fit_logical((x_BTGSD.shape[0], x_BTGSD.shape[2]), ("batch", "act_heads"))
    return (batch, None, heads, None, None), (batch, None), (batch, heads, None)


def _sharded_forward(q, k, v, seg, pos, *, tuning, interpret, packed):
    five, rows, lse = _logical(k)
    local = functools.partial(_forward, tuning=tuning, interpret=interpret, packed=packed)
    return run_sharded(local, (q, k, v, seg, pos), (five, five, five, rows, rows), (five, lse))


def _sharded_backward(q, k, v, seg, pos, out, lse, d_out, *, tuning, interpret, packed):
    five, rows, lse_axes = _logical(k)
    local = functools.partial(_backward, tuning=tuning, interpret=interpret, packed=packed)
    return run_sharded(
        local,
        (q, k, v, seg, pos, out, lse, d_out),
        (five, five, five, rows, rows, five, lse_axes, five),
        (five,) if packed else (five, five, five),
    )


# ----------------------------------------------------------------------------
# The kernels. Scores are kept in base 2: s2 = q.k * D^-0.5 * log2(e), p = exp2(s2 - max).
# Each loops over its blocks in three runs: masked, wholly visible (no mask), masked.


def _visible(q_seg, q_pos, k_seg, k_pos):
    """The mask rule on one [queries, keys] tile."""
    same_doc = (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] != 0)
    return same_doc & (k_pos[None, :] <= q_pos[:, None])


def _visible_t(k_seg, k_pos, q_seg, q_pos):
    """The mask rule on one [keys, queries] tile."""
    same_doc = (k_seg[:, None] == q_seg[None, :]) & (q_seg[None, :] != 0)
    return same_doc & (k_pos[:, None] <= q_pos[None, :])


def _three_runs(bounds_ref, step, carry):
    """step(i, carry, masked) over blocks [lo, full_lo) and [full_hi, hi) with the mask,
    and over [full_lo, full_hi) without."""
    lo, full_lo, full_hi, hi = (bounds_ref[i] for i in range(4))
    carry = jax.lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
    carry = jax.lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
    return jax.lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)


def _fwd_kernel(
    bounds_ref, q_ref, q_seg_ref, q_pos_ref, k_ref, v_ref, k_seg_ref, k_pos_ref,
    o_ref, lse_ref, *, block_k, scale2,
):  # fmt: skip
    """One (query block, row, head): q_ref [BQ, D], k_ref/v_ref the row's [Tp, D]."""
    q = q_ref[...]
    q_seg, q_pos = q_seg_ref[...], q_pos_ref[...]
    BQ, D = q.shape

    def step(j, carry, masked):
        acc, m, total = carry
        window = pl.ds(j * block_k, block_k)
        k, v = k_ref[window, :], v_ref[window, :]
        s2 = dot(q, k, trans_b=True) * scale2
        if masked:
            visible = _visible(q_seg, q_pos, k_seg_ref[window], k_pos_ref[window])
            s2 = jnp.where(visible, s2, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s2, axis=1))
        p = jnp.exp2(s2 - m_new[:, None])
        if masked:  # masked keys weigh exactly 0 (a row that saw nothing yet keeps total 0)
            p = jnp.where(visible, p, 0.0)
        rescale = jnp.exp2(m - m_new)
        acc = acc * rescale[:, None] + dot(p.astype(v.dtype), v)
        return acc, m_new, total * rescale + jnp.sum(p, axis=1)

    init = (
        jnp.zeros((BQ, D), jnp.float32),
        jnp.full((BQ,), MASK_VALUE, jnp.float32),
        jnp.zeros((BQ,), jnp.float32),
    )
    acc, m, total = _three_runs(bounds_ref, step, init)
    seen = total > 0  # False only for padding queries: output 0, and no gradient (p = 0)
    total = jnp.where(seen, total, 1.0)
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(total), 0.0)


def _dq_kernel(
    bounds_ref, q_ref, q_seg_ref, q_pos_ref, o_ref, do_ref, lse_ref,
    k_ref, v_ref, k_seg_ref, k_pos_ref, dq_ref, delta_ref, *, block_k, scale2, scale,
):  # fmt: skip
    """One (query block, row, head): dq, and delta = rowsum(dO * O) for the dk/dv kernel."""
    q, do = q_ref[...], do_ref[...]
    q_seg, q_pos = q_seg_ref[...], q_pos_ref[...]
    lse = lse_ref[...]
    delta = jnp.sum(o_ref[...].astype(jnp.float32) * do.astype(jnp.float32), axis=1)
    delta_ref[...] = delta

    def step(j, dq, masked):
        window = pl.ds(j * block_k, block_k)
        k, v = k_ref[window, :], v_ref[window, :]
        p = jnp.exp2(dot(q, k, trans_b=True) * scale2 - lse[:, None])
        if masked:
            visible = _visible(q_seg, q_pos, k_seg_ref[window], k_pos_ref[window])
            p = jnp.where(visible, p, 0.0)
        ds = p * (dot(do, v, trans_b=True) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    dq = _three_runs(bounds_ref, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    bounds_ref, k_ref, v_ref, k_seg_ref, k_pos_ref, q_ref, do_ref, lse_ref, delta_ref,
    q_seg_ref, q_pos_ref, *out_refs, block_q, heads_per_group, q_slot, kv_slots, scale2, scale,
):  # fmt: skip
    """One (key block, row, key/value head): dk and dv summed over the group's query
    heads; q_ref [Tp, S, D] (query head r at slot q_slot + r), do_ref [Tp, R, D],
    lse_ref/delta_ref [R, Tp]. Tiles are [keys, queries]. `out_refs`: (dk [BK, D], dv
    [BK, D]); packed (`kv_slots` given), (dq's array as aliased input, its [BK, S, D]
    block), written at `kv_slots`."""
    k, v = k_ref[...], v_ref[...]
    k_seg, k_pos = k_seg_ref[...], k_pos_ref[...]
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for r in range(heads_per_group):

        def step(i, carry, masked, r=r):
            dk, dv = carry
            window = pl.ds(i * block_q, block_q)
            q, do = q_ref[window, q_slot + r, :], do_ref[window, r, :]
            lse, delta = lse_ref[r, window], delta_ref[r, window]
            p_t = jnp.exp2(dot(k, q, trans_b=True) * scale2 - lse[None, :])
            if masked:
                visible_t = _visible_t(k_seg, k_pos, q_seg_ref[window], q_pos_ref[window])
                p_t = jnp.where(visible_t, p_t, 0.0)
            dv = dv + dot(p_t.astype(do.dtype), do)
            ds_t = p_t * (dot(v, do, trans_b=True) - delta[None, :])
            return dk + dot(ds_t.astype(q.dtype), q), dv

        carry = _three_runs(bounds_ref, step, carry)
    dk, dv = carry
    if kv_slots is None:
        dk_ref, dv_ref = out_refs
        dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)
    else:  # packed: the array also holds dq, written by the dq kernel (aliased input first)
        _, dqkv_ref = out_refs
        dqkv_ref[:, kv_slots[0], :] = (dk * scale).astype(dqkv_ref.dtype)
        dqkv_ref[:, kv_slots[1], :] = dv.astype(dqkv_ref.dtype)


# ----------------------------------------------------------------------------
# Per-device launches.


def _pad_rows(T: int, multiple: int, *arrays):
    """Pads dimension 1 of each array to a multiple of `multiple` (padding tokens: segment 0)."""
    Tp = -(-T // multiple) * multiple
    if Tp == T:
        return arrays
    return tuple(jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2)) for x in arrays)


# jitted so that the kernel is traced and lowered once per shape, not once per layer: a
# model's identical calls then share one lowered function (gpt2-124m's training step took
# 9.0 s to trace and 10.6 s to lower for CUDA on a CPU, 9.2 s of it in 86 pallas_call
# lowerings; 4.1 + 2.0 s with this; BENCHMARKS.md, "Speed round two").
@functools.partial(jax.jit, static_argnames=("tuning", "interpret", "packed"))
def _forward(q, k, v, seg, pos, *, tuning: Tuning, interpret: bool, packed: bool):
    """(out_BTGRD, lse_BHTp) on one device; lse in base 2, padded rows included. q, k, v
    5-D: the packed array thrice, or [B, T, G, R, D] and [B, T, G, 1, D] twice."""
    B, T, G, _, D = k.shape
    R = q.shape[3] - 2 if packed else q.shape[3]
    H = G * R
    if tuning.kernel("fwd", H, G, D, q.dtype, interpret) == "mgpu":
        return flash_attention_mgpu.forward(
            q, k, v, seg, pos, slots=tuning.mgpu_slots, packed=packed, block=tuning.mgpu_block,
            interpret=interpret,
        )  # fmt: skip
    q_slot, k_slot, v_slot = _PACKED_SLOTS if packed else _SEPARATE_SLOTS
    if packed:  # one array: pad it once
        (q,) = _pad_rows(T, tuning.row_multiple(D), q)
        k = v = q
        seg, pos = _pad_rows(T, tuning.row_multiple(D), seg, pos)
    else:
        q, k, v, seg, pos = _pad_rows(T, tuning.row_multiple(D), q, k, v, seg, pos)
    Tp = q.shape[1]
    BQ, BK = tuning.fwd_q(D), tuning.fwd_block_k
    NQ = Tp // BQ
    bounds = loop_bounds(*block_visibility(seg, pos, BQ, BK))
    # Query blocks in reverse: the late blocks see the most keys, so they start first.
    rev = lambda n: NQ - 1 - n  # noqa: E731
    row_block = pl.BlockSpec((None, BQ), lambda n, b, h: (b, rev(n)))
    whole_row = pl.BlockSpec((None, Tp), lambda n, b, h: (b, 0))
    bounds_spec = pl.BlockSpec((None, None, 4), lambda n, b, h: (b, rev(n), 0))
    q_block = _head_block(BQ, D, R, q_slot, lambda n: rev(n))
    out_block = _head_block(BQ, D, R, 0, lambda n: rev(n))
    k_row, v_row = (_group_row(Tp, D, R, slot) for slot in (k_slot, v_slot))
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, block_k=BK, scale2=D**-0.5 * _LOG2_E),
        grid=(NQ, B, H),
        in_specs=[
            bounds_spec,
            q_block,
            row_block,
            row_block,
            k_row,
            v_row,
            whole_row,
            whole_row,
        ],
        out_specs=[out_block, pl.BlockSpec((None, None, BQ), lambda n, b, h: (b, h, rev(n)))],
        out_shape=[
            jax.ShapeDtypeStruct((B, Tp, G, R, D), q.dtype),
            jax.ShapeDtypeStruct((B, H, Tp), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=tuning.fwd_warps, num_stages=tuning.stages(D)
        ),
        interpret=interpret,
        name="flash_attention_fwd",
    )(bounds, q, seg, pos, k, v, seg, pos)
    return out[:, :T], lse


@functools.partial(jax.jit, static_argnames=("tuning", "interpret", "packed"))  # as _forward
def _backward(q, k, v, seg, pos, out, lse, d_out, *, tuning: Tuning, interpret: bool, packed):
    """On one device, from the forward's output and base-2 log-sum-exp: (dq, dk, dv) as
    [B, T, G, R, D], [B, T, G, 1, D] twice; packed, (dqkv,) in q's packed layout."""
    B, T, G, _, D = k.shape
    R = out.shape[3]
    H = G * R
    if tuning.kernel("bwd", H, G, D, q.dtype, interpret) == "mgpu":
        return flash_attention_mgpu.backward(
            q, k, v, seg, pos, out, lse, d_out, slots=tuning.mgpu_slots, packed=packed,
            block=tuning.mgpu_block, interpret=interpret,
        )  # fmt: skip
    q_slot, k_slot, v_slot = _PACKED_SLOTS if packed else _SEPARATE_SLOTS
    multiple = tuning.row_multiple(D)
    if packed:
        (q,) = _pad_rows(T, multiple, q)
        k = v = q
        seg, pos, out, d_out = _pad_rows(T, multiple, seg, pos, out, d_out)
    else:
        q, k, v, seg, pos, out, d_out = _pad_rows(T, multiple, q, k, v, seg, pos, out, d_out)
    Tp = q.shape[1]
    params = plgpu.CompilerParams(num_warps=tuning.bwd_warps, num_stages=tuning.stages(D))
    scales = dict(scale2=D**-0.5 * _LOG2_E, scale=D**-0.5)

    # dq (and delta): one program per (query block, row, head), over its key blocks.
    BQ, BK = tuning.dq_block_q, tuning.dq_block_k
    NQ = Tp // BQ
    bounds = loop_bounds(*block_visibility(seg, pos, BQ, BK))
    rev = lambda n: NQ - 1 - n  # noqa: E731
    bounds_spec = pl.BlockSpec((None, None, 4), lambda n, b, h: (b, rev(n), 0))
    row_block = pl.BlockSpec((None, BQ), lambda n, b, h: (b, rev(n)))
    whole_row = pl.BlockSpec((None, Tp), lambda n, b, h: (b, 0))
    q_block = _head_block(BQ, D, R, q_slot, lambda n: rev(n))
    out_block = _head_block(BQ, D, R, 0, lambda n: rev(n))
    stat_block = pl.BlockSpec((None, None, BQ), lambda n, b, h: (b, h, rev(n)))
    k_row, v_row = (_group_row(Tp, D, R, slot) for slot in (k_slot, v_slot))
    # packed: dq lands in an array of q's layout, whose k and v slots the dk/dv kernel fills
    dq_shape = q.shape if packed else (B, Tp, G, R, D)
    dq, delta = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=BK, **scales),
        grid=(NQ, B, H),
        in_specs=[
            bounds_spec,
            q_block,
            row_block,
            row_block,
            out_block,
            out_block,
            stat_block,
            k_row,
            v_row,
            whole_row,
            whole_row,
        ],  # fmt: skip
        out_specs=[q_block, stat_block],
        out_shape=[
            jax.ShapeDtypeStruct(dq_shape, q.dtype),
            jax.ShapeDtypeStruct((B, H, Tp), jnp.float32),
        ],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq",
    )(bounds, q, seg, pos, out, d_out, lse, k, v, seg, pos)

    # dk, dv: one program per (key block, row, key/value head), over the query blocks
    # that may see it, for each query head of the group.
    BQ, BK = tuning.dkv_block_q, tuning.dkv_block_k
    bounds = loop_bounds(*(jnp.swapaxes(x, 1, 2) for x in block_visibility(seg, pos, BQ, BK)))
    bounds_spec = pl.BlockSpec((None, None, 4), lambda m, b, g: (b, m, 0))
    key_block = pl.BlockSpec((None, BK), lambda m, b, g: (b, m))
    whole_row = pl.BlockSpec((None, Tp), lambda m, b, g: (b, 0))
    k_block, v_block = (
        pl.BlockSpec((None, BK, None, None, D), lambda m, b, g, s=slot: (b, m, g, s, 0))
        for slot in (k_slot, v_slot)
    )
    # every slot of group g: the whole row of q (its query heads), and this program's key
    # block of the packed gradient (whose k and v slots it writes)
    S = q.shape[3]
    q_rows = pl.BlockSpec((None, Tp, None, S, D), lambda m, b, g: (b, 0, g, 0, 0))
    packed_block = pl.BlockSpec((None, BK, None, S, D), lambda m, b, g: (b, m, g, 0, 0))
    group_stats = pl.BlockSpec((None, R, Tp), lambda m, b, g: (b, g, 0))
    kernel = functools.partial(
        _dkv_kernel,
        block_q=BQ,
        heads_per_group=R,
        q_slot=q_slot,
        kv_slots=(k_slot, v_slot) if packed else None,
        **scales,
    )
    in_specs = [
        bounds_spec,
        k_block,
        v_block,
        key_block,
        key_block,
        q_rows,
        pl.BlockSpec((None, Tp, None, R, D), lambda m, b, g: (b, 0, g, 0, 0)),
        group_stats,
        group_stats,
        whole_row,
        whole_row,
    ]
    args = [bounds, k, v, seg, pos, q, d_out, lse, delta, seg, pos]
    if packed:  # written into dq's array, in place
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        args.append(dq)
        out_specs, out_shape = [packed_block], [jax.ShapeDtypeStruct(dq.shape, dq.dtype)]
        aliases = {len(args) - 1: 0}
    else:
        out_specs = [k_block, v_block]
        out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2
        aliases = {}
    grads = pl.pallas_call(
        kernel,
        grid=(Tp // BK, B, G),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkv",
    )(*args)
    if packed:
        return (grads[0][:, :T],)
    return dq[:, :T], grads[0][:, :T], grads[1][:, :T]


def _head_block(rows: int, D: int, R: int, first_slot: int, block_of) -> pl.BlockSpec:
    """[rows, D] of query head h (grid axis 2) from a [B, Tp, G, S, D] array whose query
    heads of group g sit at slots first_slot .. first_slot + R - 1; `block_of(n)` the block
    index along T for grid axis 0."""
    return pl.BlockSpec(
        (None, rows, None, None, D),
        lambda n, b, h: (b, block_of(n), h // R, first_slot + h % R, 0),
    )


def _group_row(Tp: int, D: int, R: int, slot: int) -> pl.BlockSpec:
    """The whole row [Tp, D] at `slot` of query head h's group (grid axis 2)."""
    return pl.BlockSpec((None, Tp, None, None, D), lambda n, b, h: (b, 0, h // R, slot, 0))
