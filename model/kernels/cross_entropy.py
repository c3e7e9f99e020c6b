"""Cross-entropy's two statistics over the vocabulary: one Pallas (Triton) kernel forward,
one backward.

Next-token cross-entropy needs, per row of logits x (the rows of [B, L, V]), the logit of
the target and log Z = logsumexp(x) over the real vocabulary. The logits are the largest
array of a small model's step (gpt2-124m at batch 64: 65,536 x 50,304 in bf16, 6.6 GB).
XLA reads them three times besides the matrix products (the maximum, the sum of
exponentials, the backward pass) and writes them once; these kernels read them twice and
write them once:

  forward:  one read. Each program takes a few rows and walks their columns, keeping a
            running maximum and sum of exponentials (flash attention's online softmax)
            per group of `lanes` adjacent columns: a group lies in one thread, so the loop
            needs no exchange between threads; the groups are combined once at the end.
            The target's logit is one load per row. Columns at or past `vocab_size`
            (the padding that rounds the vocabulary up to a multiple of 128) are left out
            inside the kernel, so the model hands over its logits unmasked;
  backward: one read and one write: dx = g_logz * softmax(x) + g_target * onehot(target),
            0 on the padding columns (and, for the float8 head of `fp8_head.py`, a second
            write of dx / s as e5m2 from the same pass);
  single pass (`exponentials`, for `fused_head.py`, which applies the output head
            itself): one read and one write. The kernel writes e = exp(x - r) minus
            s = sum(e) at the target, which is s (softmax(x) - onehot(target)), with r the
            row's largest logit among its first `fwd_cols` columns: the forward pass needs
            no maximum of the whole row first, and the backward pass needs no pass over
            the logits at all, since dx is e scaled per row and the head's products take
            that scale on their small side. A row whose largest logit exceeds r by more
            than `_HEADROOM` (e would approach float32's range) is swept again with its
            true maximum.

Why the loads are written as they are: Triton turns a block load into 16-byte vector loads
only where it can prove the load's mask constant over 8 adjacent columns. Masks here
compare columns with static, 128-aligned bounds only; the real vocabulary's limit (not
aligned, and per device with tensor parallelism) is applied to the loaded values. A first
version masked its loads with that limit and read at 0.85 TB/s (BENCHMARKS.md, change 37).

With the vocabulary split over devices (tensor parallelism), each device's kernel returns
its columns' maximum, sum and target logit, and plain JAX combines them as flash-decoding
combines its splits; the backward pass needs only the combined log Z.

Exponentials are taken base 2 (one `ex2` instruction); the running statistics are in
units of log2.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from model.kernels.partition import (
    active_mesh,
    fit_logical,
    interpret_mode,
    row_logical,
    run_sharded,
)

LOG2_E = math.log2(math.e)
# Running maximum's start: finite, so that a group whose columns are all left out (-inf)
# gives exp2(start - start) = 1 times a zero sum rather than inf - inf = NaN.
_START = -1e30
# How far (log2 units) a row's largest logit may exceed the single-pass kernel's reference r
# before the row is swept again: e <= 2^64 and s <= 2^80 stay far inside float32 and bf16.
_HEADROOM = 64.0


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Block shapes (powers of two); the defaults were chosen on an H200 (BENCHMARKS.md,
    "Speed round eight"); tests pass small blocks."""

    fwd_rows: int = 4
    fwd_cols: int = 1024
    fwd_lanes: int = 8  # adjacent columns sharing one running max and sum (one 16-byte load)
    fwd_warps: int = 4
    fwd_stages: int = 3  # column blocks loaded ahead of the one being reduced
    bwd_rows: int = 8
    bwd_cols: int = 1024
    bwd_warps: int = 8

    def __post_init__(self):
        if self.fwd_cols % self.fwd_lanes:
            raise ValueError(f"cross_entropy: fwd_lanes={self.fwd_lanes} must divide fwd_cols")


DEFAULT_TUNING = Tuning()


def _rows(ref, row_R, row_ok_R, other):
    return plgpu.load(ref.at[row_R], mask=row_ok_R, other=other)


def _row_blocks(x_ref, t_ref, lim_ref, n, v, tuning):
    """The forward kernels' rows r..r+R: (row_R, row_ok_R, targets, column limits,
    block), block(j) = (indices, in-bounds mask, x_RGK) of column block j, x_RGK the real
    logits in log2 units (-inf elsewhere), in G groups of K adjacent lanes."""
    R, C, K = tuning.fwd_rows, tuning.fwd_cols, tuning.fwd_lanes
    row_R = pl.program_id(0) * R + jnp.arange(R)
    row_ok_R = row_R < n
    t_R, lim_R = _rows(t_ref, row_R, row_ok_R, -1), _rows(lim_ref, row_R, row_ok_R, 0)
    col_GK = K * jnp.arange(C // K)[:, None] + jnp.arange(K)[None, :]

    def block(j):
        col_GK_j = j * C + col_GK
        idx = (row_R[:, None, None], col_GK_j[None])
        in_bounds = row_ok_R[:, None, None] & (col_GK_j < v)[None]  # static bounds: vectors
        x_RGK = plgpu.load(x_ref.at[idx], mask=in_bounds, other=-jnp.inf).astype(jnp.float32)
        real = col_GK_j[None] < lim_R[:, None, None]
        return idx, in_bounds, jnp.where(real, x_RGK * LOG2_E, -jnp.inf)

    return row_R, row_ok_R, t_R, lim_R, block


def _fwd_kernel(x_ref, t_ref, lim_ref, m_ref, s_ref, tl_ref, *, n, v, tuning):
    """Rows r..r+R: max and sum of 2^(x log2 e - max) over the columns below each row's
    limit (log2 units), and the target's logit. Shapes: R rows, G groups of K lanes."""
    R, G = tuning.fwd_rows, tuning.fwd_cols // tuning.fwd_lanes
    row_R, row_ok_R, t_R, lim_R, block = _row_blocks(x_ref, t_ref, lim_ref, n, v, tuning)

    def body(j, carry):
        m_RG, s_RG = carry
        _, _, x_RGK = block(j)
        new_m_RG = jnp.maximum(m_RG, jnp.max(x_RGK, axis=2))
        s_RG = s_RG * jnp.exp2(m_RG - new_m_RG) + jnp.sum(
            jnp.exp2(x_RGK - new_m_RG[:, :, None]), axis=2
        )
        return new_m_RG, s_RG

    start = (jnp.full((R, G), _START, jnp.float32), jnp.zeros((R, G), jnp.float32))
    m_RG, s_RG = jax.lax.fori_loop(0, pl.cdiv(v, tuning.fwd_cols), body, start)
    m_R = jnp.max(m_RG, axis=1)
    s_R = jnp.sum(s_RG * jnp.exp2(m_RG - m_R[:, None]), axis=1)
    # the target's logit, if it is one of this device's real columns (else 0, summed away)
    has_target_R = row_ok_R & (t_R >= 0) & (t_R < lim_R)
    tl_R = plgpu.load(x_ref.at[row_R, t_R], mask=has_target_R, other=0.0).astype(jnp.float32)
    for ref, value in ((m_ref, m_R), (s_ref, s_R), (tl_ref, tl_R)):
        plgpu.store(ref.at[row_R], value, mask=row_ok_R)


def _bwd_kernel(x_ref, t_ref, lim_ref, lz_ref, glz_ref, gt_ref, *refs, n, v, tuning):
    """dx = g_logz * 2^(x log2 e - log2 Z) + g_target * onehot, 0 past each row's limit;
    given a per-row 1/s (`refs`: inv_ref, dx_ref, dx8_ref), dx / s in float8 as well."""
    inv_ref, dx_ref, dx8_ref = refs if len(refs) == 3 else (None, *refs, None)
    R, C = tuning.bwd_rows, tuning.bwd_cols
    row_R = pl.program_id(0) * R + jnp.arange(R)
    col_C = pl.program_id(1) * C + jnp.arange(C)
    row_ok_R = row_R < n
    idx = (row_R[:, None], col_C[None, :])
    in_bounds_RC = row_ok_R[:, None] & (col_C < v)[None, :]  # static bounds: vector access
    t_R, lim_R = _rows(t_ref, row_R, row_ok_R, -1), _rows(lim_ref, row_R, row_ok_R, 0)
    lz_R, glz_R, gt_R = (_rows(r, row_R, row_ok_R, 0.0) for r in (lz_ref, glz_ref, gt_ref))
    x_RC = plgpu.load(x_ref.at[idx], mask=in_bounds_RC, other=0.0).astype(jnp.float32)
    real_RC = col_C[None, :] < lim_R[:, None]
    probs_RC = jnp.where(real_RC, jnp.exp2(x_RC * LOG2_E - lz_R[:, None] * LOG2_E), 0.0)
    onehot_RC = jnp.where(col_C[None, :] == t_R[:, None], gt_R[:, None], 0.0)
    dx_RC = glz_R[:, None] * probs_RC + onehot_RC
    plgpu.store(dx_ref.at[idx], dx_RC.astype(dx_ref.dtype), mask=in_bounds_RC)
    if inv_ref is not None:
        inv_R = _rows(inv_ref, row_R, row_ok_R, 0.0)
        dx8_RC = (dx_RC * inv_R[:, None]).astype(dx8_ref.dtype)
        plgpu.store(dx8_ref.at[idx], dx8_RC, mask=in_bounds_RC)


def _single_pass_kernel(
    x_ref, t_ref, lim_ref, e_ref, r_ref, s_ref, tl_ref, *, n, v, tuning, interpret
):
    """Rows r..r+R: e = 2^(x log2 e - ref) at every column (0 past each row's limit),
    s = sum(e), e - s written at the target; out (ref, s, target logit). ref (log2 units)
    is the largest real logit among the first C columns, or the row's own largest where
    that one exceeds it by more than _HEADROOM (then the row block is swept again)."""
    R, G = tuning.fwd_rows, tuning.fwd_cols // tuning.fwd_lanes
    row_R, row_ok_R, t_R, lim_R, block = _row_blocks(x_ref, t_ref, lim_ref, n, v, tuning)

    def sweep(ref_R):
        def body(j, carry):
            m_RG, s_RG = carry
            idx, in_bounds, x_RGK = block(j)
            e_RGK = jnp.exp2(x_RGK - ref_R[:, None, None])
            plgpu.store(e_ref.at[idx], e_RGK.astype(e_ref.dtype), mask=in_bounds)
            return jnp.maximum(m_RG, jnp.max(x_RGK, axis=2)), s_RG + jnp.sum(e_RGK, axis=2)

        return body

    ref_R = jnp.max(block(0)[2], axis=(1, 2))
    ref_R = jnp.where(ref_R > _START, ref_R, 0.0)  # no real column in the first block
    start = (jnp.full((R, G), _START, jnp.float32), jnp.zeros((R, G), jnp.float32))
    n_blocks = pl.cdiv(v, tuning.fwd_cols)
    m_RG, s_RG = jax.lax.fori_loop(0, n_blocks, sweep(ref_R), start)
    m_R = jnp.max(m_RG, axis=1)
    again_R = m_R - ref_R > _HEADROOM
    ref_R = jnp.where(again_R, m_R, ref_R)
    again = jnp.max(again_R.astype(jnp.int32)) > 0
    m_RG, s_RG = jax.lax.cond(
        again, lambda: jax.lax.fori_loop(0, n_blocks, sweep(ref_R), start), lambda: (m_RG, s_RG)
    )
    s_R = jnp.sum(s_RG, axis=1)
    has_target_R = row_ok_R & (t_R >= 0) & (t_R < lim_R)
    tl_R = plgpu.load(x_ref.at[row_R, t_R], mask=has_target_R, other=0.0).astype(jnp.float32)
    e_target_R = jnp.exp2(tl_R * LOG2_E - ref_R)
    if not interpret:  # every thread's stores of e land before the target's is replaced
        plgpu.debug_barrier()
    plgpu.store(e_ref.at[row_R, t_R], (e_target_R - s_R).astype(e_ref.dtype), mask=has_target_R)
    for ref, value in ((r_ref, ref_R), (s_ref, s_R), (tl_ref, tl_R)):
        plgpu.store(ref.at[row_R], value, mask=row_ok_R)


# jitted so that each kernel is traced and lowered once per shape
@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def _forward_rows(x_NV, t_N, lim_N, *, tuning, interpret):
    """(max, sum of 2^(x log2 e - max), both in log2 units, target logit), each [N]
    float32, over this device's columns."""
    n, v = x_NV.shape
    stat = jax.ShapeDtypeStruct((n,), jnp.float32)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, n=n, v=v, tuning=tuning),
        grid=(pl.cdiv(n, tuning.fwd_rows),),
        out_shape=[stat, stat, stat],
        compiler_params=plgpu.CompilerParams(
            num_warps=tuning.fwd_warps, num_stages=tuning.fwd_stages
        ),
        interpret=interpret,
        name="cross_entropy_fwd",
    )(x_NV, t_N, lim_N)


@functools.partial(jax.jit, static_argnames=("tuning", "interpret", "fp8_dtype"))
def _backward_rows(x_NV, t_N, lim_N, lz_N, glz_N, gt_N, inv_N, *, tuning, interpret, fp8_dtype):
    """dx [N, V] in the logits' dtype; with `fp8_dtype`, also dx * inv_N[:, None] as it."""
    n, v = x_NV.shape
    out_shape = [jax.ShapeDtypeStruct((n, v), x_NV.dtype)]
    if fp8_dtype is not None:
        out_shape.append(jax.ShapeDtypeStruct((n, v), fp8_dtype))
    return pl.pallas_call(
        functools.partial(_bwd_kernel, n=n, v=v, tuning=tuning),
        grid=(pl.cdiv(n, tuning.bwd_rows), pl.cdiv(v, tuning.bwd_cols)),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=tuning.bwd_warps, num_stages=1),
        interpret=interpret,
        name="cross_entropy_bwd",
    )(x_NV, t_N, lim_N, lz_N, glz_N, gt_N, *([] if inv_N is None else [inv_N]))


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def _single_pass_rows(x_NV, t_N, lim_N, *, tuning, interpret):
    """(e - s onehot [N, V] in the logits' dtype, ref in log2 units, s, target logit)."""
    n, v = x_NV.shape
    stat = jax.ShapeDtypeStruct((n,), jnp.float32)
    return pl.pallas_call(
        functools.partial(_single_pass_kernel, n=n, v=v, tuning=tuning, interpret=interpret),
        grid=(pl.cdiv(n, tuning.fwd_rows),),
        out_shape=[jax.ShapeDtypeStruct((n, v), x_NV.dtype), stat, stat, stat],
        compiler_params=plgpu.CompilerParams(
            num_warps=tuning.fwd_warps, num_stages=tuning.fwd_stages
        ),
        interpret=interpret,
        name="cross_entropy_single_pass",
    )(x_NV, t_N, lim_N)


def _layout(x):
    """(logical names of the logits [..., V], of the rows [...], mesh axes splitting V)."""
    rows = row_logical(x.shape)
    (vocab,) = fit_logical(x.shape[-1:], ("act_vocab",))
    split = vocab is not None and active_mesh() is not None
    return (*rows, vocab), rows, nn.logical_to_mesh_axes((vocab,))[0] if split else None


def _local_columns(targets, x_local, vocab_size, vocab_axes):
    """This device's (targets relative to its first column, per-row column limit)."""
    v_local = x_local.shape[-1]
    first = 0 if vocab_axes is None else jax.lax.axis_index(vocab_axes) * v_local
    limit = jnp.clip(vocab_size - first, 0, v_local).astype(jnp.int32)
    return (targets - first).astype(jnp.int32), jnp.broadcast_to(limit, targets.shape)


def forward_statistics(
    x: jax.Array, targets: jax.Array, vocab_size: int, tuning: Tuning, interpret: bool
) -> tuple[jax.Array, jax.Array]:
    """(target logit, log Z), float32, of logits x [..., V] (no checks, no gradient)."""
    x_spec, row_spec, vocab_axes = _layout(x)
    split_spec = (x_spec[-1], *row_spec)  # partial statistics stacked over the vocab shards

    def local(x, targets):
        t, lim = _local_columns(targets, x, vocab_size, vocab_axes)
        stats = _forward_rows(
            x.reshape(-1, x.shape[-1]),
            t.reshape(-1),
            lim.reshape(-1),
            tuning=tuning,
            interpret=interpret,
        )
        return tuple(s.reshape(1, *targets.shape) for s in stats)

    m_S, s_S, tl_S = run_sharded(local, [x, targets], [x_spec, row_spec], [split_spec] * 3)
    m = jnp.max(m_S, axis=0)
    log2_z = m + jnp.log2(jnp.sum(s_S * jnp.exp2(m_S - m), axis=0))
    return jnp.sum(tl_S, axis=0), log2_z / LOG2_E


def backward_logits(
    x: jax.Array, targets: jax.Array, log_z: jax.Array, g_log_z: jax.Array,
    g_target: jax.Array, vocab_size: int, tuning: Tuning, interpret: bool,
    fp8_scale: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:  # fmt: skip
    """d loss / d logits [..., V] for the statistics' cotangents, in the logits' dtype; given
    a float32 scalar `fp8_scale` s, the pair (that, d logits / s as e5m2): the fused float8
    head (`fp8_head.py`) takes both from the one pass."""
    x_spec, row_spec, vocab_axes = _layout(x)
    fp8 = fp8_scale is not None

    def local(x, targets, log_z, g_log_z, g_target, *inv):
        t, lim = _local_columns(targets, x, vocab_size, vocab_axes)
        rows = lambda a: a.reshape(-1)  # noqa: E731
        grads = _backward_rows(
            x.reshape(-1, x.shape[-1]),
            *map(rows, (t, lim, log_z, g_log_z, g_target)),
            rows(inv[0]) if fp8 else None,
            tuning=tuning,
            interpret=interpret,
            fp8_dtype=jnp.float8_e5m2 if fp8 else None,
        )
        return tuple(g.reshape(x.shape) for g in grads) if fp8 else grads[0].reshape(x.shape)

    args = [x, targets, log_z, g_log_z.astype(jnp.float32), g_target.astype(jnp.float32)]
    if fp8:  # 1/s per row: a row array shards like the cotangents
        args.append(jnp.broadcast_to(1.0 / fp8_scale.astype(jnp.float32), targets.shape))
    out_spec = [x_spec, x_spec] if fp8 else x_spec
    return run_sharded(local, args, [x_spec] + [row_spec] * (len(args) - 1), out_spec)


def check_head_inputs(
    module: str, x: jax.Array, w_VD: jax.Array, targets: jax.Array, vocab_size: int | None
) -> int:
    """The output-head modules' argument checks (x [..., D], w_VD [V, D], targets [...]);
    returns vocab_size (default V)."""
    V, D = w_VD.shape
    if x.shape[-1] != D:
        raise ValueError(f"{module}: x has width {x.shape[-1]}, the head's weight {D}")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"{module}: targets have shape {targets.shape}, expected {x.shape[:-1]}")
    vocab_size = V if vocab_size is None else vocab_size
    if not 0 < vocab_size <= V:
        raise ValueError(f"{module}: vocab_size={vocab_size} must be in 1..{V}")
    return int(vocab_size)


def vocab_is_split(x: jax.Array) -> bool:
    """Whether the active mesh splits the last (vocabulary) dimension of logits x."""
    return _layout(x)[2] is not None


def exponentials(
    x: jax.Array, targets: jax.Array, vocab_size: int, tuning: Tuning, interpret: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(e', s, log Z, target logit) of logits x [..., V] whose vocabulary the mesh does not
    split: e' = s (softmax(x) - onehot(target)) in x's dtype, 0 on the padding columns,
    and s [...] float32 its per-row scale, from the single-pass kernel (module docstring);
    log Z and the target's logit float32, as `forward_statistics` gives them."""
    if vocab_is_split(x):
        raise ValueError("cross_entropy.exponentials: the vocabulary is split over devices")
    x_spec, row_spec, _ = _layout(x)

    def local(x, targets):
        t, lim = _local_columns(targets, x, vocab_size, None)
        e, ref, s, tl = _single_pass_rows(
            x.reshape(-1, x.shape[-1]),
            t.reshape(-1),
            lim.reshape(-1),
            tuning=tuning,
            interpret=interpret,
        )
        return e.reshape(x.shape), *(a.reshape(targets.shape) for a in (ref, s, tl))

    e, ref, s, tl = run_sharded(local, [x, targets], [x_spec, row_spec], [x_spec] + [row_spec] * 3)
    return e, s, (ref + jnp.log2(s)) / LOG2_E, tl


@functools.cache
def _make(vocab_size: int, tuning: Tuning, interpret: bool):
    @jax.custom_vjp
    def stats_fn(x, targets):
        return forward_statistics(x, targets, vocab_size, tuning, interpret)

    def fwd(x, targets):
        target_logit, log_z = forward_statistics(x, targets, vocab_size, tuning, interpret)
        return (target_logit, log_z), (x, targets, log_z)

    def bwd(res, cotangents):
        x, targets, log_z = res
        g_target, g_log_z = cotangents
        dx = backward_logits(x, targets, log_z, g_log_z, g_target, vocab_size, tuning, interpret)
        return dx, None

    stats_fn.defvjp(fwd, bwd)
    return stats_fn


def target_logit_and_log_z(
    logits: jax.Array,
    targets: jax.Array,
    vocab_size: int | None = None,
    *,
    tuning: Tuning = DEFAULT_TUNING,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(logits[..., target], logsumexp(logits) over the first `vocab_size` columns), float32,
    for logits [..., V] and integer targets [...] below `vocab_size` (default: V);
    differentiable in the logits. `interpret` defaults to True off the GPU."""
    V = logits.shape[-1]
    vocab_size = V if vocab_size is None else vocab_size
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"cross_entropy: logits must be floating, got {logits.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"cross_entropy: targets have shape {targets.shape}, expected {logits.shape[:-1]}"
        )
    if not 0 < vocab_size <= V:
        raise ValueError(f"cross_entropy: vocab_size={vocab_size} must be in 1..{V}")
    interpret = interpret_mode() if interpret is None else interpret
    return _make(int(vocab_size), tuning, bool(interpret))(logits, targets.astype(jnp.int32))
