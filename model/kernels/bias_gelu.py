"""Fused bias + tanh-GELU for the GPT-2 MLP: one Pallas (Triton) kernel forward, one backward.

The up-projection's output h [N, F] (F = d_ff) is the largest activation of a GPT-2
block. XLA spends four passes over it beyond the matrix products (BENCHMARKS.md,
"Where the time goes"): the forward fusion reads h and writes both h + b, which autodiff
keeps for the backward pass, and gelu(h + b); the backward fusion reads dy and h + b and
writes dh; a reduction reads dh again for the bias gradient. These kernels:

  forward:  read h, write gelu(h + b); the backward pass keeps h itself (the product's
            output, already in memory) and the bias, not a biased copy;
  backward: read h and dy, write dh = dy * gelu'(h + b), and per-program partial sums
            of dh over rows, which plain JAX adds up into the bias gradient (a few
            hundred KB against hundreds of MB).

Arithmetic in float32 (the bias added in float32 too), outputs in h's dtype. With
u = sqrt(2/pi) (z + 0.044715 z^3), t = tanh(u), z = h + b:

  gelu(z)  = z (1 + t) / 2
  gelu'(z) = (1 + t) / 2 + z (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 z^2) / 2

Rows need no neighbours, so the kernels run per device under `shard_map`, rows split
like the batch and columns like the MLP's hidden units (`run_sharded`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from model.kernels.partition import fit_logical, interpret_mode, num_sms, row_logical, run_sharded

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
CUBIC = 0.044715


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Block shapes; the defaults were chosen on an H200 (BENCHMARKS.md, "Speed round
    seven"); tests pass small blocks. Each program works on `rows x cols` elements
    (powers of two); the backward kernel's programs loop over row blocks, `programs_per_sm`
    of them per SM and column block, so that few partial bias sums are written."""

    rows: int = 8
    cols: int = 1024
    warps: int = 8
    programs_per_sm: int = 2
    bwd_programs: int | None = None  # overrides the per-SM count (tests use it)
    # tanh as the GPU's one-instruction approximation (relative error about 2^-11) where
    # the output is 16-bit and rounds away more; libdevice's accurate tanh otherwise. The
    # backward kernel at gpt2-124m's batch 64: 0.362 -> 0.322 ms on an H200 (change 73)
    approx_tanh: bool = True


DEFAULT_TUNING = Tuning()


def _block(row0, col0, tuning: Tuning, n: int, f: int):
    row_R = row0 + jnp.arange(tuning.rows)
    col_C = col0 + jnp.arange(tuning.cols)
    ok_RC = (row_R < n)[:, None] & (col_C < f)[None, :]
    return (row_R[:, None], col_C[None, :]), col_C, ok_RC


def _tanh_term(z, approx: bool):
    """t = tanh(sqrt(2/pi) (z + 0.044715 z^3)), float32."""
    u = SQRT_2_OVER_PI * (z + CUBIC * z * z * z)
    return plgpu.approx_tanh(u) if approx else jnp.tanh(u)


def _approx(tuning: Tuning, dtype, interpret: bool) -> bool:
    """Whether the kernels use the approximate tanh (a PTX instruction: not interpreted)."""
    return tuning.approx_tanh and jnp.dtype(dtype).itemsize <= 2 and not interpret


def _fwd_kernel(h_ref, b_ref, y_ref, *, n, f, tuning, approx):
    idx, col_C, ok_RC = _block(
        pl.program_id(0) * tuning.rows, pl.program_id(1) * tuning.cols, tuning, n, f
    )
    b_C = plgpu.load(b_ref.at[col_C], mask=col_C < f, other=0.0).astype(jnp.float32)
    z = plgpu.load(h_ref.at[idx], mask=ok_RC, other=0.0).astype(jnp.float32) + b_C[None, :]
    y = 0.5 * z * (1.0 + _tanh_term(z, approx))
    plgpu.store(y_ref.at[idx], y.astype(y_ref.dtype), mask=ok_RC)


def _bwd_kernel(h_ref, b_ref, dy_ref, dh_ref, db_ref, *, n, f, tuning, approx, programs, trips):
    """Row blocks p, p + programs, ... of column block j: dh for each, and the partial
    sum of dh over all of them (masked rows load dy = 0, so they add nothing)."""
    p, j = pl.program_id(0), pl.program_id(1)
    col0 = j * tuning.cols
    col_C = col0 + jnp.arange(tuning.cols)
    b_C = plgpu.load(b_ref.at[col_C], mask=col_C < f, other=0.0).astype(jnp.float32)

    def body(i, acc_RC):
        idx, _, ok_RC = _block((p + i * programs) * tuning.rows, col0, tuning, n, f)
        z = plgpu.load(h_ref.at[idx], mask=ok_RC, other=0.0).astype(jnp.float32) + b_C[None, :]
        dy = plgpu.load(dy_ref.at[idx], mask=ok_RC, other=0.0).astype(jnp.float32)
        t = _tanh_term(z, approx)
        slope = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (
            1.0 + 3.0 * CUBIC * z * z
        )
        dh = dy * slope
        plgpu.store(dh_ref.at[idx], dh.astype(dh_ref.dtype), mask=ok_RC)
        # summed over rows once at the end: a per-round sum would be a cross-warp reduction
        return acc_RC + dh

    acc_RC = jax.lax.fori_loop(0, trips, body, jnp.zeros((tuning.rows, tuning.cols), jnp.float32))
    plgpu.store(db_ref.at[p, col_C], jnp.sum(acc_RC, axis=0), mask=col_C < f)


# jitted so that each kernel is traced and lowered once per shape, not once per layer
@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def _forward_rows(h_NF, b_F, *, tuning, interpret):
    n, f = h_NF.shape
    return pl.pallas_call(
        functools.partial(
            _fwd_kernel, n=n, f=f, tuning=tuning, approx=_approx(tuning, h_NF.dtype, interpret)
        ),
        grid=(pl.cdiv(n, tuning.rows), pl.cdiv(f, tuning.cols)),
        out_shape=jax.ShapeDtypeStruct((n, f), h_NF.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=tuning.warps, num_stages=1),
        interpret=interpret,
        name="bias_gelu_fwd",
    )(h_NF, b_F)


@functools.partial(jax.jit, static_argnames=("tuning", "interpret"))
def _backward_rows(h_NF, b_F, dy_NF, *, tuning, interpret):
    """(dh_NF, partial bias gradients [programs, F] in float32)."""
    n, f = h_NF.shape
    blocks, col_blocks = pl.cdiv(n, tuning.rows), pl.cdiv(f, tuning.cols)
    programs = tuning.bwd_programs or max(1, tuning.programs_per_sm * num_sms() // col_blocks)
    programs = min(blocks, programs)
    kernel = functools.partial(
        _bwd_kernel,
        n=n,
        f=f,
        tuning=tuning,
        approx=_approx(tuning, h_NF.dtype, interpret),
        programs=programs,
        trips=pl.cdiv(blocks, programs),
    )
    return pl.pallas_call(
        kernel,
        grid=(programs, col_blocks),
        out_shape=[
            jax.ShapeDtypeStruct((n, f), h_NF.dtype),
            jax.ShapeDtypeStruct((programs, f), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=tuning.warps, num_stages=1),
        interpret=interpret,
        name="bias_gelu_bwd",
    )(h_NF, b_F, dy_NF.astype(h_NF.dtype))


def _specs(h):
    """Logical names of h [..., F] and of the bias [F]: rows like the batch, columns like
    the MLP's hidden units (each dropped where the mesh does not divide it)."""
    lead = row_logical(h.shape)
    (cols,) = fit_logical(h.shape[-1:], ("act_mlp",))
    return (*lead, cols), (cols,)


def _forward(h, b, tuning, interpret):
    h_spec, b_spec = _specs(h)

    def local(h, b):  # this device's rows and columns
        y = _forward_rows(h.reshape(-1, h.shape[-1]), b, tuning=tuning, interpret=interpret)
        return y.reshape(h.shape)

    return run_sharded(local, [h, b], [h_spec, b_spec], h_spec)


def _backward(h, b, dy, tuning, interpret):
    h_spec, b_spec = _specs(h)
    # partial sums: stacked over the devices that split the rows
    partial_spec = (h_spec[0] if len(h_spec) > 1 else None, b_spec[0])

    def local(h, b, dy):
        f = h.shape[-1]
        dh, db = _backward_rows(
            h.reshape(-1, f), b, dy.reshape(-1, f), tuning=tuning, interpret=interpret
        )
        return dh.reshape(h.shape), db

    dh, db_PF = run_sharded(local, [h, b, dy], [h_spec, b_spec, h_spec], [h_spec, partial_spec])
    return dh, db_PF.sum(0)


@functools.cache
def _make(tuning: Tuning, interpret: bool):
    @jax.custom_vjp
    def bias_gelu_fn(h, b):
        return _forward(h, b, tuning, interpret)

    def fwd(h, b):
        return _forward(h, b, tuning, interpret), (h, b)

    def bwd(res, dy):
        h, b = res
        dh, db = _backward(h, b, dy, tuning, interpret)
        return dh, db.astype(b.dtype)

    bias_gelu_fn.defvjp(fwd, bwd)
    return bias_gelu_fn


def bias_gelu(
    h: jax.Array, b: jax.Array, *, tuning: Tuning = DEFAULT_TUNING, interpret: bool | None = None
) -> jax.Array:
    """gelu(h + b) (tanh approximation, as GPT-2) for h [..., F], b [F]; differentiable
    in both. `interpret` defaults to True off the GPU."""
    if h.ndim < 1 or not jnp.issubdtype(h.dtype, jnp.floating):
        raise ValueError(f"bias_gelu: h must be a floating array [..., F], got {h.dtype}{h.shape}")
    if b.shape != h.shape[-1:]:
        raise ValueError(f"bias_gelu: bias has shape {b.shape}, expected ({h.shape[-1]},)")
    interpret = interpret_mode() if interpret is None else interpret
    return _make(tuning, bool(interpret))(h, b)
