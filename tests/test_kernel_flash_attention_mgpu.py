"""The Mosaic GPU kernels (`model/kernels/flash_attention_mgpu.py`) give the Triton
kernels' outputs and gradients on packed rows, through `flash_attention`'s public entry
points; they lower for CUDA; and shapes they do not take fall back to the Triton kernels.

On CPU the pair runs in Mosaic GPU's interpreter, which simulates the warpgroups, the
TMA copies and the barriers between them (a wrong slot or phase deadlocks or reads a
stale block), but computes each product from the loaded values.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.kernels import flash_attention as fa
from model.kernels import flash_attention_mgpu as fm
from model.kernels.partition import interpret_mode
from tests.helpers import lower_for_cuda
from tests.test_kernel_flash_attention import (
    _assert_equal_on_real_queries,
    _packed_rows,
    _reference,
    _value_and_grads,
    packed_attention,
)

BOTH_MGPU = fa.Tuning(fwd_kernel="mgpu", bwd_kernel="mgpu")


def _case(B, T, H, D, max_doc, seed):
    rng = np.random.default_rng(seed)
    q, k, v, w = (jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.bfloat16) for _ in range(4))
    seg, pos = _packed_rows(rng, B, T, max_doc=max_doc)
    return q, k, v, seg, pos, w


CASES = {  # (B, T, H, D, longest document, slots, streamed block, layout)
    # many short documents: every block pair masked; 2 slots wrap around often
    "short-docs-separate": (2, 150, 1, 64, 30, 2, 64, "separate"),
    # documents longer than a tile: the unmasked run too; 128-row streamed blocks
    "long-docs-packed": (2, 256, 1, 64, 400, 3, 128, "packed"),
    # head dim 128, the shapes where the backward pair is the default, at its default
    # settings: on a GPU only (the interpreter's products do not depend on the head dim,
    # the compiled kernels' layouts do; `test_lowers_for_cuda` covers 128 on the CPU)
    "head-dim-128-packed": (2, 384, 2, 128, 300, 3, 64, "packed"),
}  # every case runs the Mosaic GPU forward kernel too


@pytest.mark.parametrize(
    "B, T, H, D, max_doc, slots, block, layout", CASES.values(), ids=CASES.keys()
)
def test_gradients_equal_triton_pair_and_reference(B, T, H, D, max_doc, slots, block, layout):
    interpreted = interpret_mode()
    if D == 128 and interpreted:
        pytest.skip("head dim 128 runs compiled, on a GPU; its lowering is tested on the CPU")
    q, k, v, seg, pos, w = _case(B, T, H, D, max_doc, seed=len(layout) + slots)
    if layout == "packed":
        attend = functools.partial(packed_attention, segment_ids_BT=seg, positions_BT=pos)
    else:
        attend = functools.partial(fa.flash_attention, segment_ids_BT=seg, positions_BT=pos)
        attend = (lambda f: lambda **kw: functools.partial(f, **kw))(attend)
    tuning = fa.Tuning(fwd_kernel="mgpu", bwd_kernel="mgpu", mgpu_slots=slots, mgpu_block=block)
    got = _value_and_grads(attend(tuning=tuning), q, k, v, w, seg)
    triton = _value_and_grads(attend(tuning=fa.Tuning(bwd_kernel="triton")), q, k, v, w, seg)
    # the same arithmetic: interpreted with the Triton kernels' 64-row blocks, float32
    # rounding apart; 128-row blocks round the running softmax to bfloat16 at other points,
    # and compiled, each backend's approximate exp2 and product order differ
    tol = 1e-5 if block == 64 and interpreted else 1e-2
    _assert_equal_on_real_queries(got, triton, seg, rtol=tol, atol=tol)
    want = _value_and_grads(
        _reference(seg, pos), *(x.astype(jnp.float32) for x in (q, k, v)), w, seg
    )
    _assert_equal_on_real_queries(got, want, seg, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate"])
def test_lowers_for_cuda(D, packed):
    """The three kernels lower to Mosaic GPU's MLIR (what the device compiles), at the
    training shapes' head dims."""
    B, T, H = 2, 384, 2
    x = jnp.zeros((B, T, H, 3 if packed else 1, D), jnp.bfloat16)
    ids = jnp.ones((B, T), jnp.int32), jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    out = jnp.zeros((B, T, H, 1, D), jnp.bfloat16)
    settings = dict(slots=3, packed=packed, block=64, interpret=False)

    def run(x, seg, pos, d_out):
        out, lse = fm.forward(x, x, x, seg, pos, **settings)
        return fm.backward(x, x, x, seg, pos, out, lse, d_out, **settings)

    lowered = lower_for_cuda(jax.jit(run), x, *ids, out)
    assert lowered.as_text().count("mosaic_gpu") >= 3  # forward, dq, dk/dv


def test_auto_picks_the_mosaic_backward_at_head_dim_128_on_hopper(monkeypatch):
    """The backward's "auto" (the default): the Mosaic GPU pair where it was measured
    faster (head_dim 128 on a Hopper GPU, a jax it ran on), the Triton pair elsewhere; the
    forward stays Triton's unless asked for."""
    tuning = fa.Tuning()
    assert tuning.bwd_kernel == "auto" and tuning.fwd_kernel == "triton"
    monkeypatch.setattr(fa, "on_hopper", lambda: True)
    monkeypatch.setattr(fm, "run_on_this_jax", lambda: True)
    bf16 = jnp.bfloat16
    assert tuning.kernel("bwd", 16, 16, 128, bf16, interpret=False) == "mgpu"
    assert tuning.kernel("fwd", 16, 16, 128, bf16, interpret=False) == "triton"
    assert tuning.kernel("bwd", 12, 12, 64, bf16, interpret=False) == "triton"
    assert tuning.kernel("bwd", 16, 4, 128, bf16, interpret=False) == "triton"  # grouped
    assert tuning.kernel("bwd", 16, 16, 128, jnp.float32, interpret=False) == "triton"
    assert tuning.kernel("bwd", 16, 16, 128, bf16, interpret=True) == "triton"  # CPU
    monkeypatch.setattr(fm, "run_on_this_jax", lambda: False)  # a jax never run compiled
    assert tuning.kernel("bwd", 16, 16, 128, bf16, interpret=False) == "triton"
    monkeypatch.setattr(fm, "run_on_this_jax", lambda: True)
    monkeypatch.setattr(fa, "on_hopper", lambda: False)
    assert tuning.kernel("bwd", 16, 16, 128, bf16, interpret=False) == "triton"
    assert BOTH_MGPU.kernel("fwd", 16, 16, 128, bf16, interpret=True) == "mgpu"


def test_unsupported_shapes_use_the_triton_pair():
    """Grouped-query heads, head_dim 32 and float32 are not the pair's: `supported` says
    so, and `flash_attention` asked for them lowers no Mosaic GPU kernel there."""
    assert fm.supported(4, 4, 64, jnp.bfloat16) and fm.supported(2, 2, 128, jnp.float16)
    assert not fm.supported(4, 2, 64, jnp.bfloat16)
    assert not fm.supported(4, 4, 32, jnp.bfloat16)
    assert not fm.supported(4, 4, 64, jnp.float32)
    B, T, H, G, D = 1, 128, 4, 2, 64
    q = jnp.zeros((B, T, H, D), jnp.bfloat16)
    kv = jnp.zeros((B, T, G, D), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))

    def loss(q, k, v):
        out = fa.flash_attention(q, k, v, None, pos, tuning=BOTH_MGPU, interpret=False)
        return out.astype(jnp.float32).sum()

    text = lower_for_cuda(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, kv, kv).as_text()
    assert "mosaic_gpu" not in text
    assert "flash_attention_fwd" in text and "flash_attention_dq" in text
