"""Several matrix products of a decoding step's few rows as one Pallas (Triton) kernel.

Decoding one token multiplies R <= 16 rows (one per sequence) by every weight once: the time
is the weights' read and the number of kernels, each paying a few microseconds of ramp-up and
tail. This kernel computes several products of the same rows at once (q, k and v; a
SwiGLU's gate and up): each program owns `block_n` output columns of one weight and walks
the inputs in `block_k` steps (`stages` blocks in flight), bias and GELU applied to the
float32 sums before the one store. The rows are repeated to 16, the smallest tensor-core
tile. On an H200 it wins for wide products, XLA's split-K GEMMs for narrow ones, so "auto"
uses it for wide products only (`model.auto`; BENCHMARKS.md, "Speed rounds" nine, eleven).

A norm can run inside the kernel too (`InputNorm`): each program normalises the rows
itself, after adding `residual_RK` where given (program 0 stores that sum, the residual
stream's next value), as in gpt-1.3b's up-projection ("Speed round twenty-four").

For one sequence the sampler stores the weights [N, K] (`weights_nk`; the transposed form of
`model.auto.use_transposed_decoding`), and one row is multiplied on the CUDA cores, each
program summing its `block_n` weight rows against the row instead of a tile of 16 repeated
rows: gpt-1.3b 1.023 -> 0.993 ms a token (round thirty).

Shape letters: R rows, K input features, N output features (of one weight).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from model.kernels.partition import dot, interpret_mode

MAX_ROWS = 16  # one tensor-core tile of rows; more rows are a matrix product for cuBLAS
_TILE_ROWS = 16
MAX_NORM_K = 8192  # an input norm's statistics come from one load of [R, K] float32 values
ACTIVATIONS = (None, "gelu")


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Block shapes (powers of two) and Triton settings, the fastest measured on an H200."""

    block_n: int = 64  # output columns per program
    block_k: int = 256  # input features per loop step
    warps: int = 8
    stages: int = 4  # loop steps whose weight blocks are loaded ahead


DEFAULT_TUNING = Tuning()
# One row against [N, K] weights: many narrow programs, 8 columns each up to NARROW_OUTPUTS
# outputs (gpt-1.3b's q/k/v), else 16 (its up-projection; "Speed round thirty-one").
ROW_TUNING = Tuning(block_n=16, block_k=512, warps=4, stages=3)
NARROW_ROW_TUNING = Tuning(block_n=8, block_k=512, warps=4, stages=4)
NARROW_OUTPUTS = 6144


class InputNorm(NamedTuple):
    """LayerNorm (or RMSNorm, `rms`) of the kernel's input rows as `model.layers.Norm`
    computes it: statistics in float32, `scale` [K] and `bias` [K] or None, the result
    rounded to the rows' dtype before the products."""

    scale: jax.Array
    bias: jax.Array | None
    eps: float
    rms: bool


def supports_input_norm(k: int) -> bool:
    """Whether the kernel can normalise rows of `k` features itself: one power-of-two load
    of the whole rows (Triton's tensors have power-of-two shapes)."""
    return k & (k - 1) == 0 and 16 <= k <= MAX_NORM_K


def supported(
    rows: int, k: int, ns: Sequence[int], tuning: Tuning = DEFAULT_TUNING, weights_nk: bool = False
) -> bool:
    """Whether the kernel takes these shapes (else the caller keeps XLA's product): rows a
    power of two up to 16, inputs and outputs multiples of 16, the smallest tensor-core
    tile (outputs of 8 for one row against [N, K] weights, which has no tile)."""
    block_k, block_n = _blocks(k, ns, tuning)
    min_n = 8 if rows == 1 and weights_nk else _TILE_ROWS
    return rows in (1, 2, 4, 8, 16) and block_k >= _TILE_ROWS and block_n >= min_n


def _blocks(k: int, ns: Sequence[int], tuning: Tuning) -> tuple[int, int]:
    """(block_k, block_n): the tuning's, or the largest power of two dividing the shapes."""
    return math.gcd(k, tuning.block_k), math.gcd(*ns, tuning.block_n)


def decode_matmul(
    x_RK: jax.Array,
    weights: Sequence[jax.Array],
    biases: Sequence[jax.Array | None] | None = None,
    *,
    activation: str | None = None,
    caches: Sequence[jax.Array | None] | None = None,
    slots_R: jax.Array | None = None,
    norm: InputNorm | None = None,
    residual_RK: jax.Array | None = None,
    weights_nk: bool = False,
    tuning: Tuning | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, ...]:
    """(activation(x @ w + b) for each weight w and bias b), each [R, N] in x's dtype.

    `residual_RK` given: x + residual (rounded to x's dtype) replaces x, and that sum is
    returned after the products. `norm` given: the products take norm(x) instead of x.

    `weights` are [K, N], or [N, K] with `weights_nk` (the sampler's transposed form,
    `weights_layout="out_in"`: contiguous along K); biases [N] or None; `activation`
    None or "gelu" (tanh form, as GPT-2). Products, bias and activation in float32. One
    device's arrays: the callers use it only without a mesh (`model.auto.use_decode_matmul`).

    `caches`, one per weight or None: where a weight has a cache [R, S, ...] (a layer's
    keys or values, its trailing dimensions N values a slot), row r of that product is
    written into slot `slots_R[r]` of cache row r (clamped to S - 1, as
    `dynamic_update_slice` clamps) instead of being returned, and the cache is returned in
    its place, updated in place: a decoding step's new key and value need no kernel of
    their own to reach the cache.
    """
    R, K = x_RK.shape
    weights = tuple(weights)
    ns = tuple(w.shape[0 if weights_nk else 1] for w in weights)
    if tuning is None and R == 1 and weights_nk:
        tuning = NARROW_ROW_TUNING if sum(ns) <= NARROW_OUTPUTS else ROW_TUNING
    tuning = tuning or DEFAULT_TUNING
    for w in weights:
        if w.shape[1 if weights_nk else 0] != K:
            raise ValueError(f"decode_matmul: weight {w.shape} does not take {K} input features")
    caches = tuple(caches) if caches is not None else (None,) * len(weights)
    for c, n in zip(caches, ns):
        if c is not None and (c.shape[0] != R or math.prod(c.shape[2:]) != n):
            raise ValueError(f"decode_matmul: cache {c.shape} does not take {R} rows of {n}")
    if any(c is not None for c in caches) and (slots_R is None or slots_R.shape != (R,)):
        raise ValueError(f"decode_matmul: writing into caches needs slots_R of shape ({R},)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"decode_matmul: activation must be one of {ACTIVATIONS}")
    if not supported(R, K, ns, tuning, weights_nk):
        raise ValueError(
            f"decode_matmul takes a power of two rows up to {MAX_ROWS} and inputs and "
            f"outputs that are multiples of 16, got {R} rows, {K} inputs, outputs {ns}"
        )
    if norm is not None and not supports_input_norm(K):
        raise ValueError(
            f"decode_matmul normalises rows of a power of two features, 16 to {MAX_NORM_K}, not {K}"
        )
    if residual_RK is not None and (norm is None or residual_RK.shape != x_RK.shape):
        raise ValueError(
            f"decode_matmul adds a residual {x_RK.shape} only to rows it normalises, "
            f"got {residual_RK.shape}{'' if norm else ' without a norm'}"
        )
    biases = tuple(biases) if biases is not None else (None,) * len(weights)
    has_bias = tuple(b is not None for b in biases)
    prologue = ()  # the norm's scale and bias, then the residual, as kernel inputs
    if norm is not None:
        # float32 (see `_Rows.operand`); a cast of bf16 ones is a kernel in every decoding
        # step, which `LanguageModel.inference_form` spares the sampler
        prologue += tuple(v.astype(jnp.float32) for v in (norm.scale, norm.bias) if v is not None)
    if residual_RK is not None:
        prologue += (residual_RK.astype(x_RK.dtype),)
    norm_spec = None if norm is None else (float(norm.eps), bool(norm.rms), norm.bias is not None)
    if interpret is None:
        interpret = interpret_mode()
    has_cache = tuple(c is not None for c in caches)
    outs = _call(
        x_RK,
        weights,
        tuple(b.astype(jnp.float32) for b in biases if b is not None),
        jnp.zeros((R,), jnp.int32) if slots_R is None else slots_R.astype(jnp.int32),
        tuple(c.reshape(-1, n) for c, n in zip(caches, ns) if c is not None),
        prologue,
        has_bias=has_bias,
        has_cache=has_cache,
        norm_spec=norm_spec,
        has_residual=residual_RK is not None,
        activation=activation,
        weights_nk=weights_nk,
        tuning=tuning,
        interpret=interpret,
    )
    products = tuple(o if c is None else o.reshape(c.shape) for o, c in zip(outs, caches))
    return products + outs[len(weights) :]


@functools.partial(
    jax.jit,
    static_argnames=(
        "has_bias",
        "has_cache",
        "norm_spec",
        "has_residual",
        "activation",
        "weights_nk",
        "tuning",
        "interpret",
    ),
)
def _call(
    x_RK,
    weights,
    biases,
    slots_R,
    caches,
    prologue,
    *,
    has_bias,
    has_cache,
    norm_spec,
    has_residual,
    activation,
    weights_nk,
    tuning,
    interpret,
):
    R, K = x_RK.shape
    ns = [w.shape[0 if weights_nk else 1] for w in weights]
    block_k, block_n = _blocks(K, ns, tuning)
    # program p works on weight i for starts[i] <= p < starts[i + 1]
    starts = [0]
    for n in ns:
        starts.append(starts[-1] + n // block_n)
    kernel = functools.partial(
        _kernel,
        n_weights=len(weights),
        has_bias=has_bias,
        has_cache=has_cache,
        n_prologue=len(prologue),
        norm_spec=norm_spec,
        has_residual=has_residual,
        starts=tuple(starts),
        activation=activation,
        weights_nk=weights_nk,
        blocks=(block_k, block_n),
    )
    # outputs: the products without a cache, the caches (aliased to their inputs), the sum
    out_shape = [jax.ShapeDtypeStruct((R, n), x_RK.dtype) for n, c in zip(ns, has_cache) if not c]
    out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
    out_shape += [jax.ShapeDtypeStruct((R, K), x_RK.dtype)] * has_residual
    first_cache = 1 + len(weights) + len(biases) + 1 + len(prologue)
    n_plain = len(ns) - len(caches)
    outs = list(
        pl.pallas_call(
            kernel,
            grid=(starts[-1],),
            out_shape=out_shape,
            input_output_aliases={first_cache + c: n_plain + c for c in range(len(caches))},
            compiler_params=plgpu.CompilerParams(num_warps=tuning.warps, num_stages=tuning.stages),
            interpret=interpret,
            name="decode_matmul",
        )(x_RK, *weights, *biases, slots_R, *prologue, *caches)
    )
    summed = [outs.pop()] if has_residual else []
    plain, cached = outs[:n_plain], outs[n_plain:]
    products = tuple(cached.pop(0) if c else plain.pop(0) for c in has_cache)
    return products + tuple(summed)


def _kernel(
    x_ref,
    *refs,
    n_weights,
    has_bias,
    has_cache,
    n_prologue,
    norm_spec,
    has_residual,
    starts,
    activation,
    weights_nk,
    blocks,
):
    """Program p: columns [j * block_n, (j + 1) * block_n) of the weight i it falls in."""
    refs = iter(refs)
    w_refs = [next(refs) for _ in range(n_weights)]
    bias_refs = iter([next(refs) for _ in range(sum(has_bias))])
    slots_ref = next(refs)
    prologue = [next(refs) for _ in range(n_prologue)]
    n_caches = sum(has_cache)
    for _ in range(n_caches):  # the caches' inputs: aliased to their outputs
        next(refs)
    plain_refs = iter([next(refs) for _ in range(n_weights - n_caches)])
    cache_refs = iter([next(refs) for _ in range(n_caches)])
    sum_ref = next(refs) if has_residual else None
    p = pl.program_id(0)
    rows = _Rows(x_ref, prologue, norm_spec, sum_ref, p)
    for i in range(n_weights):
        bias_ref = next(bias_refs) if has_bias[i] else None
        out_ref = next(cache_refs) if has_cache[i] else next(plain_refs)

        @pl.when((p >= starts[i]) & (p < starts[i + 1]))
        def _(i=i, bias_ref=bias_ref, out_ref=out_ref):
            _columns(
                rows,
                w_refs[i],
                bias_ref,
                out_ref,
                slots_ref if has_cache[i] else None,
                p - starts[i],
                activation,
                weights_nk,
                blocks,
            )


class _Rows:
    """The rows a program's loop multiplies, normalised where a norm is given: each program
    loads the whole rows first (a few KB, in L2) for their statistics (quicker than in the
    epilogue, round twenty-four, or in the loop's first step, round thirty-one)."""

    def __init__(self, x_ref, prologue, norm_spec, sum_ref, p):
        self.x_ref, self.R = x_ref, x_ref.shape[0]
        self.norm = norm_spec is not None
        if not self.norm:
            return
        eps, rms, has_norm_bias = norm_spec
        prologue = iter(prologue)
        self.scale_ref = next(prologue)
        self.norm_bias_ref = next(prologue) if has_norm_bias else None
        self.residual_ref = next(prologue, None)
        x_RK = self._summed(slice(None))
        if sum_ref is not None:

            @pl.when(p == 0)
            def _():
                sum_ref[...] = x_RK.astype(x_ref.dtype)

        self.mean_R1 = 0.0 if rms else jnp.mean(x_RK, -1, keepdims=True)
        centred_RK = x_RK - self.mean_R1
        self.rstd_R1 = jax.lax.rsqrt(jnp.mean(centred_RK * centred_RK, -1, keepdims=True) + eps)

    def _summed(self, ks) -> jax.Array:
        """float32 [R, len(ks)]: x, or x + residual rounded as the model's add rounds it."""
        x_RK = self.x_ref[:, ks].astype(jnp.float32)
        if self.residual_ref is None:
            return x_RK
        x_RK = x_RK + self.residual_ref[:, ks].astype(jnp.float32)
        return x_RK.astype(self.x_ref.dtype).astype(jnp.float32)

    def operand(self, ks) -> jax.Array:
        """[16, BK]: the rows' inputs ks, each row repeated 16 / R times."""
        return _repeat_rows(self.rows(ks), self.R)

    def rows(self, ks) -> jax.Array:
        """[R, BK]: the rows' inputs ks, normalised where the kernel normalises them."""
        if not self.norm:
            return self.x_ref[:, ks]
        # scale and bias arrive in float32 (`decode_matmul`): bf16 loads of them here made
        # the kernel 1.5x slower (round twenty-four)
        y_RK = (self._summed(ks) - self.mean_R1) * self.rstd_R1 * self.scale_ref[ks][None, :]
        if self.norm_bias_ref is not None:
            y_RK = y_RK + self.norm_bias_ref[ks][None, :]
        return y_RK.astype(self.x_ref.dtype)


def _columns(rows, w_ref, bias_ref, out_ref, slots_ref, j, activation, weights_nk, blocks):
    """`slots_ref` given: out_ref is a cache [R * S, N], row r written at r * S + slot."""
    BK, BN = blocks
    R, K = rows.x_ref.shape
    cols = pl.ds(pl.multiple_of(j * BN, BN), BN)

    def step(kb, acc_TN):
        ks = pl.ds(pl.multiple_of(kb * BK, BK), BK)
        x_TK = rows.operand(ks)
        # weights stored in float32 are rounded here, not by a separate cast kernel
        if weights_nk:
            return acc_TN + dot(x_TK, w_ref[cols, ks].astype(x_TK.dtype), trans_b=True)
        return acc_TN + dot(x_TK, w_ref[ks, cols].astype(x_TK.dtype))

    def row_step(kb, acc_NK):
        # one row against [N, K] weights: a tensor-core tile would be 15 repeated rows of
        # 16, so the products run on the CUDA cores, summed along K once, after the loop
        ks = pl.ds(pl.multiple_of(kb * BK, BK), BK)
        x_1K = rows.rows(ks).astype(jnp.float32)
        w_NK = w_ref[cols, ks].astype(rows.x_ref.dtype).astype(jnp.float32)
        return acc_NK + w_NK * x_1K

    if weights_nk and R == 1:
        acc_NK = jax.lax.fori_loop(0, K // BK, row_step, jnp.zeros((BN, BK), jnp.float32))
        y_RN = jnp.sum(acc_NK, axis=1)[None, :]
    else:
        acc_TN = jax.lax.fori_loop(0, K // BK, step, jnp.zeros((_TILE_ROWS, BN), jnp.float32))
        y_RN = _first_rows(acc_TN, R)
    if bias_ref is not None:
        y_RN = y_RN + bias_ref[cols][None, :]
    if activation == "gelu":
        y_RN = jax.nn.gelu(y_RN, approximate=True)
    if slots_ref is None:
        out_ref[:, cols] = y_RN.astype(out_ref.dtype)
        return
    S = out_ref.shape[0] // R
    rows_R = jnp.arange(R, dtype=jnp.int32) * S + jnp.clip(slots_ref[...], 0, S - 1)
    out_ref[rows_R, cols] = y_RN.astype(out_ref.dtype)


def _repeat_rows(x_RK: jax.Array, R: int) -> jax.Array:
    """[R, K] -> [16, K]: the rows repeated 16 / R times (row t is row t mod R)."""
    if R == _TILE_ROWS:
        return x_RK
    if R == 1:
        return jnp.broadcast_to(x_RK, (_TILE_ROWS, x_RK.shape[1]))
    K = x_RK.shape[1]
    return jnp.broadcast_to(x_RK[None], (_TILE_ROWS // R, R, K)).reshape(_TILE_ROWS, K)


def _first_rows(acc_TN: jax.Array, R: int) -> jax.Array:
    """[16, N] of rows repeated with period R -> [R, N]. Repeated rows are equal, so their
    maximum is each row exactly (Triton tensors cannot be sliced)."""
    if R == _TILE_ROWS:
        return acc_TN
    N = acc_TN.shape[1]
    return jnp.max(acc_TN.reshape(_TILE_ROWS // R, R, N), axis=0)


def reference_decode_matmul(
    x_RK: jax.Array,
    weights: Sequence[jax.Array],
    biases: Sequence[jax.Array | None] | None = None,
    *,
    activation: str | None = None,
    norm: InputNorm | None = None,
    residual_RK: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """The definition `decode_matmul` is tested against, in plain JAX."""
    summed = ()
    if residual_RK is not None:
        x_RK = (x_RK.astype(jnp.float32) + residual_RK.astype(jnp.float32)).astype(x_RK.dtype)
        summed = (x_RK,)
    if norm is not None:
        x = x_RK.astype(jnp.float32)
        if not norm.rms:
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + norm.eps) * norm.scale
        x_RK = (x if norm.bias is None else x + norm.bias).astype(x_RK.dtype)
    biases = biases if biases is not None else [None] * len(weights)
    outs = []
    for w, b in zip(weights, biases):
        w_KN = w.astype(jnp.float32)
        y = jnp.dot(x_RK.astype(jnp.float32), w_KN, precision="highest")
        if b is not None:
            y = y + b.astype(jnp.float32)
        if activation == "gelu":
            y = jax.nn.gelu(y, approximate=True)
        outs.append(y.astype(x_RK.dtype))
    return tuple(outs) + summed
