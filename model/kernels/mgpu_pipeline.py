"""What the Mosaic GPU kernels share (`flash_attention_mgpu.py`): the producer warpgroup
that streams blocks into shared memory, products issued as one wgmma group, the loop over
a program's blocks with one product deferred a step, and the differences between jax
versions and between the GPU and Mosaic GPU's interpreter on the CPU, in one place.

A program here is warp-specialised: compute warpgroups own rows and run `products`,
while one more warpgroup runs `stream`, copying each block a step needs into one of
`slots` shared-memory buffers once the compute warpgroups have released it (a barrier a
buffer, with one arrival a compute warpgroup).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# ----------------------------------------------------------------------------
# Version and mode differences.


def compiler_params() -> plgpu.CompilerParams:
    """Lane semantics (jax 0.11's default is Warpgroup), whose register layouts the
    kernels spell out; approximate math (ex2.approx, as Triton's exp2 uses)."""
    return plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)


def interpreter() -> Any:
    """Mosaic GPU's interpreter (CPU). Not public in jax 0.10: imported from its module."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


# jax 0.10's `load` requires an index after the ref; 0.11's takes none (deprecated)
_idx = inspect.signature(plgpu.load).parameters.get("idx")
_LOAD_NEEDS_INDEX = _idx is not None and _idx.default is inspect.Parameter.empty


def load(ref: Any, layout: Any, interpret: bool, optimized: bool = True) -> jax.Array:
    """ref's value in a register layout; the interpreter has no layouts (nor `load`).
    optimized=False allows a layout whose transfer has shared-memory bank conflicts."""
    if interpret:
        return ref[...]
    if _LOAD_NEEDS_INDEX:
        return plgpu.load(ref, (), layout=layout, optimized=optimized)
    return plgpu.load(ref, layout=layout, optimized=optimized)


def cast(x: jax.Array, layout: Any, interpret: bool) -> jax.Array:
    """x in a register layout (a no-op in the interpreter)."""
    return x if interpret else plgpu.layout_cast(x, layout)


def transposed(ref: Any) -> Any:
    """The transposed view of a [rows, D] shared-memory tile, as a wgmma operand."""
    return ref.transpose((1, 0))


# ----------------------------------------------------------------------------
# The parts of a kernel: shared-memory tiles, products, broadcasts, the block loop and the
# producer.


def tile_smem(shape: tuple[int, ...], dtype: Any) -> Any:
    """A shared-memory tile laid out for TMA and wgmma (128-byte swizzle)."""
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def products(terms: Sequence[tuple], interpret: bool) -> tuple[jax.Array, ...]:
    """One group of wgmma products, waited for once. terms: (acc, a, b, trans_b), for
    acc + a @ b (b^T with trans_b), a fresh float32 accumulator where acc is None; a in
    shared memory or registers, b in shared memory. The interpreter has no transposed
    wgmma operands nor `run_state`: there each product is computed from loaded values."""

    def shape(a, b, trans_b):
        return (a.shape[0], b.shape[0] if trans_b else b.shape[1])

    if interpret:
        out = []
        for acc, a, b, trans_b in terms:
            a = a if isinstance(a, jax.Array) else a[...]
            prod = jnp.dot(a, b[...].T if trans_b else b[...], preferred_element_type=jnp.float32)
            out.append(prod if acc is None else acc + prod)
        return tuple(out)

    def zeros(a, b, trans_b):
        return plgpu.layout_cast(jnp.zeros(shape(a, b, trans_b), jnp.float32), plgpu.Layout.WGMMA)

    def body(acc_refs):
        for acc_ref, (_, a, b, trans_b) in zip(acc_refs, terms):
            plgpu.wgmma(acc_ref, a, transposed(b) if trans_b else b)

    inits = tuple(plgpu.ACC.init(zeros(*t[1:]) if t[0] is None else t[0]) for t in terms)
    return tuple(pl.run_state(body)(inits))


def rows(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """A per-row vector broadcast over a [rows, cols] tile."""
    return lax.broadcast_in_dim(x, shape, [0])


def cols(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """A per-column vector broadcast over a [rows, cols] tile."""
    return lax.broadcast_in_dim(x, shape, [1])


def run_blocks(bounds: Any, slots: int, step: Callable, flush: Callable, carry: Any) -> Any:
    """step(j, slot, carry, masked, first) over blocks [lo, hi): the first one alone
    (`first`: nothing deferred yet; masked, which is always exact), then [lo + 1, full_lo)
    and [full_hi, hi) with the mask and [full_lo, full_hi) without; then flush(slot, carry)
    for the last block's deferred product, where there was a block."""
    lo, full_lo, full_hi, hi = bounds
    slot_of = lambda j: lax.rem(j - lo, jnp.array(slots, j.dtype))  # noqa: E731

    def body(masked, first):
        return lambda j, carry: step(j, slot_of(j), carry, masked=masked, first=first)

    rest = jnp.minimum(lo + 1, hi)
    carry = lax.fori_loop(lo, rest, body(True, True), carry)
    carry = lax.fori_loop(rest, full_lo, body(True, False), carry)
    carry = lax.fori_loop(jnp.maximum(full_lo, rest), full_hi, body(False, False), carry)
    carry = lax.fori_loop(jnp.maximum(full_hi, rest), hi, body(True, False), carry)
    return lax.fori_loop(lo, rest, lambda _, carry: flush(slot_of(hi - 1), carry), carry)


def stream(bounds: Any, block: int, slots: int, consumed: Any, streams: Sequence[tuple]) -> None:
    """The producer warpgroup: for blocks j in [lo, hi), each stream's block j copied into
    slot (j - lo) % slots once the compute warpgroups have released that slot. A stream
    is (view, buffers, barriers): view(rows) the global array's block, buffers [slots, ...]."""
    lo, hi = bounds[0], bounds[3]
    plgpu.set_max_registers(40, action="decrease")

    def issue(j, _):
        t = j - lo
        slot = lax.rem(t, jnp.array(slots, t.dtype))

        @pl.when(t >= slots)
        def _():
            plgpu.barrier_wait(consumed.at[slot])

        for view, buffers, barriers in streams:
            plgpu.copy_gmem_to_smem(
                view(pl.ds(j * block, block)), buffers.at[slot], barriers.at[slot]
            )

    lax.fori_loop(lo, hi, issue, None)

    # observe the last releases too, so that every barrier ends its use in the same phase
    # on every warpgroup (a kernel may rely on it; the interpreter checks it)
    def drain(j, _):
        plgpu.barrier_wait(consumed.at[lax.rem(j - lo, jnp.array(slots, j.dtype))])

    lax.fori_loop(jnp.maximum(lo, hi - slots), hi, drain, None)
