"""Fused LayerNorm / RMSNorm: one Pallas (Triton) kernel forward, one backward.

XLA splits a norm's forward and backward into several fusions that each read
the activations again; these kernels touch every big array once per pass:

  forward:  read x, write y (+ per-row mean and rstd in float32, a few bytes
            a row, kept for the backward pass);
  backward: read x, dy and the residual stream's own cotangent, write dx; the
            scale/bias gradients come out as per-program partial sums that plain
            JAX adds up (a few MB, against hundreds of MB of activations).

The definition they match is `model.layers.Norm` (statistics and arithmetic in
float32, output cast to the compute dtype):

  layernorm: xhat = (x - mean(x)) * rstd,  rstd = rsqrt(mean((x - mean)^2) + eps)
  rmsnorm:   xhat = x * rstd,              rstd = rsqrt(mean(x^2) + eps)
  y = xhat * scale (+ bias)

and, with g = dy * scale, dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
(rmsnorm: no mean(g) term), dscale = sum_rows(dy * xhat), dbias = sum_rows(dy).

`norm_keep_input(x, ...) -> (x, y)` is the form a pre-norm block uses: the
residual stream x feeds both the norm and the residual add, so autodiff would
add the two cotangents of x in a separate pass over the activations. Returning
x from the custom_vjp hands both cotangents to one backward kernel, which
writes dx = dx_residual + dx_norm once. Under differentiation the x returned is a
copy the forward kernel writes as it reads x: the residual add after the block's
next product can then take that buffer in place, where XLA would otherwise copy x
(which the backward pass keeps) before each such product (BENCHMARKS.md, change 70).

`add_norm(x, residual, ...) -> (x + residual, norm(x + residual))` is the forward kernel
alone, for a decoding step: a residual add and the norm after it in one kernel.

Each row needs all of its D columns, so the kernels run per device under
`shard_map` on the rows (`run_sharded`); scale and bias are replicated and
the partial gradient sums, split over the devices like the rows, are summed
outside the shard_map (XLA adds the all-reduce).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.typing import DTypeLike

from model.kernels.partition import interpret_mode, num_sms, row_logical, run_sharded

MAX_D = 8192  # whole padded rows live in registers; wider rows would need a column loop


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch shapes, measured on an H200 (BENCHMARKS.md, "Speed round eighteen", change
    75); benchmarks may pass their own.

    A program holds `rows x next_pow2(D)` float32 values spread over its threads, with 8
    warps from 4096 values on and 4 below. Small programs won: 2048 values (two rows of
    gpt2-124m's D = 768, one of gpt-1.3b's 2048) and 4 programs per SM took the backward
    kernel from 0.147 to 0.137 ms at gpt2-124m's batch 64 and from 0.172 to 0.163 ms at
    gpt-1.3b's batch 16 (at gpt2-124m's size 3, 5, 6 or 10 programs per SM were 11-33%
    slower, 8 or 16 3-4%: how evenly the waves come out), the forward from 0.095 to 0.091
    and from 0.114 to 0.111 ms. Whether the backward loop was software-pipelined (Triton's
    stages) changed nothing.
    """

    fwd_elems: int = 2048
    fwd_warps: int | None = None  # None: by the values a program holds (`_rows_and_warps`)
    bwd_elems: int = 2048
    max_rows: int = 16
    # The backward kernel loops over row blocks so that there are few partial sums
    # (528 x D floats at 132 SMs: ~1% of the traffic at GPT-2 size).
    bwd_programs_per_sm: int = 4
    bwd_programs: int | None = None  # overrides the per-SM count (tests use it)


DEFAULT_TUNING = Tuning()
# `add_norm`'s one row of a decoding step: 8 warps for gpt-1.3b's 2,048 values, not 4
# ("Speed round thirty-two")
ADD_NORM_TUNING = Tuning(fwd_warps=8)


def _rows_and_warps(d_pad: int, elems: int, max_rows: int) -> tuple[int, int]:
    rows = max(1, min(max_rows, elems // d_pad))
    # 8 warps once a program holds >= 4096 values: 16+ per thread is plenty of
    # work, and fewer warps would mean long per-thread register arrays.
    warps = 8 if rows * d_pad >= 4096 else 4
    return rows, warps


def _check_offsets(n: int, d: int):
    # Triton indexes with int32 offsets (row * D + column), per device. (Masked
    # rows past the end may wrap around; they are never accessed.)
    if n * d >= 2**31:
        raise ValueError(f"norm kernel: {n} rows x {d} per device overflow int32 offsets")


def _row_block(first_row, rows: int, n_rows: int, d: int, d_pad: int):
    """Row/column indices of one row block and the masks for its padding."""
    row_R = first_row + jnp.arange(rows)
    col_C = jnp.arange(d_pad)
    row_ok_R = row_R < n_rows
    col_ok_C = col_C < d
    idx = (row_R[:, None], col_C[None, :])
    return idx, row_R, row_ok_R, col_ok_C, row_ok_R[:, None] & col_ok_C[None, :]


def _load_f32(ref, idx, mask):
    return plgpu.load(ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)


def _fwd_kernel(
    *refs, n_rows, d, d_pad, rows, eps, rms, has_bias, has_residual, with_stats, with_copy
):
    """One block of `rows` rows: y = xhat * scale + bias, the row statistics, and a copy
    of x (`with_copy`). `has_residual`: x + residual, rounded to x's dtype, replaces x."""
    refs = list(refs)
    x_ref = refs.pop(0)
    residual_ref = refs.pop(0) if has_residual else None
    scale_ref = refs.pop(0)
    bias_ref = refs.pop(0) if has_bias else None
    y_ref = refs.pop(0)
    mean_ref = refs.pop(0) if with_stats and not rms else None
    rstd_ref = refs.pop(0) if with_stats else None
    copy_ref = refs.pop(0) if with_copy else None

    idx, row_R, row_ok_R, col_ok_C, ok_RC = _row_block(
        pl.program_id(0) * rows, rows, n_rows, d, d_pad
    )
    # the parameters' loads first: their latency then hides behind the statistics'
    scale_C = _load_f32(scale_ref, jnp.arange(d_pad), col_ok_C)
    bias_C = _load_f32(bias_ref, jnp.arange(d_pad), col_ok_C) if has_bias else None
    x_RC = _load_f32(x_ref, idx, ok_RC)  # padding reads as 0
    if has_residual:  # rounded as the model's add rounds it
        x_RC = (x_RC + _load_f32(residual_ref, idx, ok_RC)).astype(x_ref.dtype).astype(jnp.float32)
    if copy_ref is not None:
        plgpu.store(copy_ref.at[idx], x_RC.astype(copy_ref.dtype), mask=ok_RC)
    if rms:
        xc_RC = x_RC
    else:
        mean_R = jnp.sum(x_RC, axis=1) / d
        # the padded columns would contribute mean^2 each to the variance
        xc_RC = jnp.where(col_ok_C[None, :], x_RC - mean_R[:, None], 0.0)
    rstd_R = jax.lax.rsqrt(jnp.sum(xc_RC * xc_RC, axis=1) / d + eps)
    y_RC = xc_RC * rstd_R[:, None] * scale_C[None, :]
    if has_bias:
        y_RC = y_RC + bias_C[None, :]
    plgpu.store(y_ref.at[idx], y_RC.astype(y_ref.dtype), mask=ok_RC)
    if mean_ref is not None:
        plgpu.store(mean_ref.at[row_R], mean_R, mask=row_ok_R)
    if rstd_ref is not None:
        plgpu.store(rstd_ref.at[row_R], rstd_R, mask=row_ok_R)


def _bwd_kernel(*refs, n_rows, d, d_pad, rows, programs, trips, rms, has_bias, has_res):
    """Row blocks pid, pid + programs, ...: dx for each, and this program's
    partial sums of dy * xhat and dy over all its rows."""
    refs = list(refs)
    x_ref, dy_ref = refs.pop(0), refs.pop(0)
    dres_ref = refs.pop(0) if has_res else None
    scale_ref = refs.pop(0)
    mean_ref = None if rms else refs.pop(0)
    rstd_ref = refs.pop(0)
    dx_ref, dscale_ref = refs.pop(0), refs.pop(0)
    dbias_ref = refs.pop(0) if has_bias else None

    pid = pl.program_id(0)
    col_C = jnp.arange(d_pad)
    col_ok_C = col_C < d
    scale_C = _load_f32(scale_ref, col_C, col_ok_C)

    def body(t, acc):
        idx, row_R, row_ok_R, _, ok_RC = _row_block(
            (pid + t * programs) * rows, rows, n_rows, d, d_pad
        )
        # Padding loads as 0 (rstd too, for rows past the end), so dy, g and
        # dy * xhat vanish there and the row sums and partials need no masking.
        x_RC = _load_f32(x_ref, idx, ok_RC)
        dy_RC = _load_f32(dy_ref, idx, ok_RC)
        rstd_R = plgpu.load(rstd_ref.at[row_R], mask=row_ok_R, other=0.0)
        if rms:
            xhat_RC = x_RC * rstd_R[:, None]
        else:
            mean_R = plgpu.load(mean_ref.at[row_R], mask=row_ok_R, other=0.0)
            xhat_RC = (x_RC - mean_R[:, None]) * rstd_R[:, None]
        g_RC = dy_RC * scale_C[None, :]
        gx_R = jnp.sum(g_RC * xhat_RC, axis=1) / d
        dxn_RC = g_RC - xhat_RC * gx_R[:, None]
        if not rms:
            dxn_RC = dxn_RC - (jnp.sum(g_RC, axis=1) / d)[:, None]
        dx_RC = dxn_RC * rstd_R[:, None]
        if has_res:
            dx_RC = dx_RC + _load_f32(dres_ref, idx, ok_RC)
        plgpu.store(dx_ref.at[idx], dx_RC.astype(dx_ref.dtype), mask=ok_RC)
        # Accumulated per row slot and summed over the rows once at the end:
        # a sum over rows every round would be a cross-warp (shared memory)
        # reduction of D values, against an add in registers.
        return (acc[0] + dy_RC * xhat_RC, *((acc[1] + dy_RC,) if has_bias else ()))

    zeros_RC = jnp.zeros((rows, d_pad), jnp.float32)
    acc = jax.lax.fori_loop(0, trips, body, (zeros_RC,) * (2 if has_bias else 1))
    plgpu.store(dscale_ref.at[pid, col_C], jnp.sum(acc[0], axis=0), mask=col_ok_C)
    if has_bias:
        plgpu.store(dbias_ref.at[pid, col_C], jnp.sum(acc[1], axis=0), mask=col_ok_C)


# jitted so that each kernel is traced and lowered once per shape, not once per norm of the
# model (flash_attention._forward says why).
@functools.partial(
    jax.jit,
    static_argnames=("eps", "rms", "out_dtype", "with_stats", "with_copy", "tuning", "interpret"),
)
def _forward_rows(
    x_ND, res_ND, scale_D, bias_D, *, eps, rms, out_dtype, with_stats, with_copy, tuning, interpret
):
    """The forward kernel on [N, D] rows: (y_ND, mean_N or None, rstd_N or None, a copy
    of x_ND or None); the statistics if with_stats, the copy if with_copy; x_ND + res_ND
    in place of x_ND unless res_ND is None."""
    n, d = x_ND.shape
    _check_offsets(n, d)
    d_pad = pl.next_power_of_2(d)
    rows, warps = _rows_and_warps(d_pad, tuning.fwd_elems, tuning.max_rows)
    warps = tuning.fwd_warps or warps
    has_bias = bias_D is not None
    kernel = functools.partial(
        _fwd_kernel,
        n_rows=n,
        d=d,
        d_pad=d_pad,
        rows=rows,
        eps=eps,
        rms=rms,
        has_bias=has_bias,
        has_residual=res_ND is not None,
        with_stats=with_stats,
        with_copy=with_copy,
    )
    out_shape = [jax.ShapeDtypeStruct((n, d), out_dtype)]
    if with_stats:
        stat = jax.ShapeDtypeStruct((n,), jnp.float32)
        out_shape += [stat, stat] if not rms else [stat]
    if with_copy:
        out_shape.append(jax.ShapeDtypeStruct((n, d), x_ND.dtype))
    outs = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, rows),),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="norm_fwd",
    )(x_ND, *([] if res_ND is None else [res_ND]), scale_D, *([bias_D] if has_bias else []))
    outs = list(outs)
    y = outs.pop(0)
    mean = outs.pop(0) if with_stats and not rms else None
    rstd = outs.pop(0) if with_stats else None
    return y, mean, rstd, outs.pop(0) if with_copy else None


@functools.partial(jax.jit, static_argnames=("has_bias", "tuning", "interpret"))
def _backward_rows(x_ND, dy_ND, dres_ND, scale_D, mean_N, rstd_N, *, has_bias, tuning, interpret):
    """The backward kernel on [N, D] rows: dx_ND (+ dres_ND if given) and the
    [programs, D] float32 partial sums of dscale and dbias (None without bias)."""
    n, d = x_ND.shape
    _check_offsets(n, d)
    d_pad = pl.next_power_of_2(d)
    rows, warps = _rows_and_warps(d_pad, tuning.bwd_elems, tuning.max_rows)
    blocks = pl.cdiv(n, rows)
    programs = min(blocks, tuning.bwd_programs or tuning.bwd_programs_per_sm * num_sms())
    # Program p takes blocks p, p + programs, ...; in the last round some find
    # only rows past the end, all masked (no memory traffic).
    trips = pl.cdiv(blocks, programs)
    rms = mean_N is None
    has_res = dres_ND is not None
    kernel = functools.partial(
        _bwd_kernel,
        n_rows=n,
        d=d,
        d_pad=d_pad,
        rows=rows,
        programs=programs,
        trips=trips,
        rms=rms,
        has_bias=has_bias,
        has_res=has_res,
    )
    partial_PD = jax.ShapeDtypeStruct((programs, d), jnp.float32)
    args = [x_ND, dy_ND, *([dres_ND] if has_res else []), scale_D]
    args += [rstd_N] if rms else [mean_N, rstd_N]
    outs = pl.pallas_call(
        kernel,
        grid=(programs,),
        out_shape=[jax.ShapeDtypeStruct((n, d), x_ND.dtype), partial_PD]
        + ([partial_PD] if has_bias else []),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="norm_bwd_res" if has_res else "norm_bwd",
    )(*args)
    return outs[0], outs[1], outs[2] if has_bias else None


# ----------------------------------------------------------------------------
# Per-device wrappers: [..., D] arrays, run under shard_map over the rows.


def _forward(x, scale_D, bias_D, *, with_stats, with_copy=False, residual=None, interpret, **kw):
    """(y, mean or None, rstd or None, copy of x or None), as `_forward_rows`."""
    lead = row_logical(x.shape)
    d = x.shape[-1]

    row_args = [x] + ([residual] if residual is not None else [])
    params = [scale_D] + ([bias_D] if bias_D is not None else [])

    def local(*args):
        shape = args[0].shape  # this device's rows
        rows_ND = [a.reshape(-1, d) for a in args[: len(row_args)]]
        scale_D, *bias = args[len(row_args) :]
        outs = _forward_rows(
            rows_ND[0],
            rows_ND[1] if residual is not None else None,
            scale_D,
            bias[0] if bias else None,
            with_stats=with_stats,
            with_copy=with_copy,
            interpret=interpret,
            **kw,
        )
        rows = lambda a: a.reshape(shape if a.ndim == 2 else shape[:-1])  # noqa: E731
        return tuple(rows(a) for a in outs if a is not None)

    n_stats = 0 if not with_stats else 1 if kw["rms"] else 2
    outs = list(
        run_sharded(
            local,
            row_args + params,
            [(*lead, None)] * len(row_args) + [("norm",)] * len(params),
            [(*lead, None)] + [lead] * n_stats + [(*lead, None)] * with_copy,
        )
    )
    y = outs.pop(0)
    mean = outs.pop(0) if with_stats and not kw["rms"] else None
    rstd = outs.pop(0) if with_stats else None
    return y, mean, rstd, outs.pop(0) if with_copy else None


def _backward(x, dy, dres, scale_D, mean, rstd, *, has_bias, tuning, interpret):
    lead = row_logical(x.shape)
    rms = mean is None
    # Partial sums: one block of rows per device, stacked over the devices that
    # split the rows (the first row dimension's mesh axes).
    partial_axes = (lead[0] if lead else None, None)

    has_res = dres is not None

    def local(x, dy, *rest):
        rest = list(rest)
        dres_l = rest.pop(0) if has_res else None
        scale_l = rest.pop(0)
        mean_l = None if rms else rest.pop(0)
        rstd_l = rest.pop(0)
        flat = lambda a: None if a is None else a.reshape(-1, x.shape[-1])
        dx_ND, dscale_PD, dbias_PD = _backward_rows(
            flat(x),
            flat(dy),
            flat(dres_l),
            scale_l,
            None if rms else mean_l.reshape(-1),
            rstd_l.reshape(-1),
            has_bias=has_bias,
            tuning=tuning,
            interpret=interpret,
        )
        return (dx_ND.reshape(x.shape), dscale_PD) + ((dbias_PD,) if has_bias else ())

    args = [x, dy] + ([dres] if dres is not None else []) + [scale_D]
    args += [rstd] if rms else [mean, rstd]
    logical_in = [(*lead, None)] * (3 if dres is not None else 2) + [("norm",)]
    logical_in += [lead] * (1 if rms else 2)
    outs = run_sharded(
        local,
        args,
        logical_in,
        [(*lead, None), partial_axes] + ([partial_axes] if has_bias else []),
    )
    dbias_D = outs[2].sum(0) if has_bias else None
    return outs[0], outs[1].sum(0), dbias_D


# ----------------------------------------------------------------------------
# The differentiable functions.


def _check(x, scale, bias, out_dtype):
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"norm kernel: x must be a floating array [..., D], got {x.dtype}{x.shape}"
        )
    d = x.shape[-1]
    for name, p in (("scale", scale), ("bias", bias)):
        if p is not None and p.shape != (d,):
            raise ValueError(
                f"norm kernel: {name} has shape {p.shape}, expected ({d},) to match x {x.shape}"
            )
    if d > MAX_D:
        raise ValueError(f"norm kernel: D={d} > {MAX_D} is not supported (rows live in registers)")
    if not jnp.issubdtype(jnp.dtype(out_dtype), jnp.floating):
        raise ValueError(f"norm kernel: out_dtype must be floating, got {out_dtype}")


@functools.cache
def _make_norm(eps: float, rms: bool, out_dtype, tuning: Tuning, interpret: bool, copy: bool):
    """The custom_vjp (x, scale, bias) -> (x, y) for one static configuration. With `copy`,
    the differentiated forward pass returns a copy of x that its kernel writes: the
    residual add that consumes it can then take its buffer in place (cuBLASLt adds the
    residual stream as the next product's C operand, its output aliased to C), while
    the original, which the backward pass needs, stays; XLA would copy it first
    (BENCHMARKS.md, "Speed round sixteen")."""
    kw = dict(eps=eps, rms=rms, out_dtype=out_dtype, tuning=tuning, interpret=interpret)

    @jax.custom_vjp
    def norm_fn(x, scale, bias):
        return x, _forward(x, scale, bias, with_stats=False, **kw)[0]

    def fwd(x, scale, bias):
        # symbolic_zeros: arguments arrive as CustomVJPPrimal(value, perturbed)
        x, scale = x.value, scale.value
        bias = None if bias is None else bias.value
        y, mean, rstd, x_copy = _forward(x, scale, bias, with_stats=True, with_copy=copy, **kw)
        return (x if x_copy is None else x_copy, y), (x, scale, bias, mean, rstd)

    def bwd(res, cotangents):
        x, scale, bias, mean, rstd = res
        dres, dy = cotangents
        dres = None if isinstance(dres, SymbolicZero) else dres
        if isinstance(dy, SymbolicZero):  # only the passed-through x was used
            dx = jnp.zeros_like(x) if dres is None else dres
            dscale, dbias = jnp.zeros_like(scale), None if bias is None else jnp.zeros_like(bias)
            return dx, dscale, dbias
        dx, dscale, dbias = _backward(
            x,
            dy.astype(out_dtype),
            None if dres is None else dres.astype(x.dtype),
            scale,
            mean,
            rstd,
            has_bias=bias is not None,
            tuning=tuning,
            interpret=interpret,
        )
        return dx, dscale.astype(scale.dtype), None if bias is None else dbias.astype(bias.dtype)

    norm_fn.defvjp(fwd, bwd, symbolic_zeros=True)
    return norm_fn


def norm_keep_input(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    eps: float,
    rms: bool,
    out_dtype: DTypeLike,
    tuning: Tuning = DEFAULT_TUNING,
    interpret: bool | None = None,
    copy: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """(x, norm(x)) for x [..., D]: LayerNorm (rms=False) or RMSNorm (rms=True).

    Returns x itself so that, in a pre-norm block, the cotangents of the
    residual stream and of the norm meet in one backward kernel; under
    differentiation, with `copy`, as a copy its forward kernel writes (`_make_norm`).
    `out_dtype` is y's dtype; `interpret` defaults to True off the GPU.
    """
    out_dtype = jnp.dtype(out_dtype)
    _check(x, scale, bias, out_dtype)
    interpret = interpret_mode() if interpret is None else interpret
    fn = _make_norm(float(eps), bool(rms), out_dtype, tuning, bool(interpret), copy)
    return fn(x, scale, bias)


def norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None = None, **kwargs) -> jax.Array:
    """norm(x) alone (e.g. the final norm); same arguments as `norm_keep_input`.

    The unused pass-through output's cotangent is a symbolic zero, so the
    backward pass runs the kernel variant without the residual cotangent.
    """
    return norm_keep_input(x, scale, bias, copy=False, **kwargs)[1]


def add_norm(
    x: jax.Array,
    residual: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None = None,
    *,
    eps: float,
    rms: bool,
    out_dtype: DTypeLike,
    tuning: Tuning = ADD_NORM_TUNING,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(s, norm(s)) with s = x + residual rounded to x's dtype, as one forward kernel: a
    decoding step's residual add and the norm after it (`model.transformer.Block`), where
    XLA's norm of one row takes three kernels. Not differentiable."""
    if residual.shape != x.shape:
        raise ValueError(f"add_norm: residual {residual.shape} does not match x {x.shape}")
    out_dtype = jnp.dtype(out_dtype)
    _check(x, scale, bias, out_dtype)
    interpret = bool(interpret_mode() if interpret is None else interpret)
    kw = dict(eps=float(eps), rms=bool(rms), out_dtype=out_dtype, tuning=tuning)
    res = residual.astype(x.dtype)
    y, _, _, s = _forward(
        x, scale, bias, with_stats=False, with_copy=True, residual=res, interpret=interpret, **kw
    )
    return s, y
