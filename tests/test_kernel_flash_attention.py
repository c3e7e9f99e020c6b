"""The Pallas flash-attention kernel equals the hand-written reference attention on
packed rows: values and gradients, grouped-query and multi-head, sharded, inside the
model; its block skipping never drops a visible block; and it lowers to Triton IR.

On CPU the kernel runs in Pallas' interpreter (compiling it takes most of each test).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention as attention_module
from model.attention import choose_backend, reference_attention
from model.config import get_preset
from model.kernels import flash_attention as fa
from model.kernels.block_visibility import block_visibility, loop_bounds
from model.masking import attention_mask
from model.transformer import LanguageModel
from tests.helpers import (
    SMALL_FLASH_BLOCKS,
    mesh_of,
    random_lm_batch,
    triton_kernels,
    verify_triton_ir,
)
from train import sharding

SMALL = SMALL_FLASH_BLOCKS


def _packed_rows(rng, batch: int, length: int, max_doc: int = 30):
    """Rows packed like data.pipeline's: documents of random length, segment ids 1, 2, ...,
    positions restarting at 0, a few padding tokens at the end; the last row all padding."""
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    for b in range(batch - 1):
        t, s, end = 0, 1, length - int(rng.integers(0, 6))
        while t < end:
            n = min(int(rng.integers(1, max_doc)), end - t)
            seg[b, t : t + n], pos[b, t : t + n] = s, np.arange(n)
            t, s = t + n, s + 1
    return jnp.asarray(seg), jnp.asarray(pos)


def _case(B, T, H, G, D, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, w = (jnp.asarray(rng.normal(size=(B, T, heads, D)), dtype) for heads in (H, G, G, H))
    seg, pos = _packed_rows(rng, B, T)
    return q, k, v, seg, pos, w


def _run(fn, *args):
    """fn(*args), jitted. XLA's backend optimisations are skipped: they double the compile
    time of interpreted kernels, and these programs run in milliseconds either way."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def _value_and_grads(attend, q, k, v, w, seg):
    """(out, dq, dk, dv) of sum(out * w) over the non-padding queries (the rows a loss
    reads: a padding query's output is the one place the two may differ)."""
    real = (seg != 0)[:, :, None, None]

    def loss(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(jnp.where(real, out.astype(jnp.float32) * w.astype(jnp.float32), 0)), out

    def run(q, k, v):
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return (out, *grads)

    return _run(run, q, k, v)


def _assert_equal_on_real_queries(got, want, seg, **tol):
    real = np.asarray(seg != 0)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert np.isfinite(np.float32(a)).all(), name  # padding queries included
        if name == "out":
            a, b = a[real], b[real]
        np.testing.assert_allclose(np.float32(a), np.float32(b), **tol, err_msg=name)


def _reference(seg, pos):
    mask = attention_mask(pos, pos, seg, seg)
    return lambda q, k, v: reference_attention(q, k, v, mask)


CASES = {  # (B, T, H, G, D, dtype, packed)
    "gqa-packed-f32": (3, 70, 4, 2, 16, "float32", True),
    "mha-whole-rows-f32": (2, 48, 2, 2, 32, "float32", False),
    "mha-packed-bf16": (2, 64, 2, 2, 16, "bfloat16", True),
}


@pytest.mark.parametrize("B, T, H, G, D, dtype, packed", CASES.values(), ids=CASES.keys())
def test_values_and_gradients_equal_reference(B, T, H, G, D, dtype, packed):
    """Packed rows end in a few padding tokens and the last row is all padding."""
    q, k, v, seg, pos, w = _case(B, T, H, G, D, dtype)
    if not packed:  # segment ids absent: one document per row, plain causal attention
        seg, pos = jnp.ones((B, T), jnp.int32), jnp.broadcast_to(jnp.arange(T), (B, T))
    kernel = functools.partial(
        fa.flash_attention, segment_ids_BT=seg if packed else None, positions_BT=pos, tuning=SMALL
    )
    got = _value_and_grads(kernel, q, k, v, w, seg)
    want = _value_and_grads(
        _reference(seg, pos), *(x.astype(jnp.float32) for x in (q, k, v)), w, seg
    )
    assert all(x.dtype == jnp.dtype(dtype) for x in got)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=3e-2, atol=3e-2)
    _assert_equal_on_real_queries(got, want, seg, **tol)
    np.testing.assert_array_equal(got[0][np.asarray(seg == 0)], 0.0)  # padding queries: 0


def pack_qkv(q, k, v):
    """[B, T, G, R + 2, D]: per key/value head its key, its value, then its query heads."""
    B, T, H, D = q.shape
    G = k.shape[2]
    return jnp.concatenate([k[:, :, :, None], v[:, :, :, None], q.reshape(B, T, G, H // G, D)], 3)


def packed_attention(**kw):
    """The packed kernel behind the (q, k, v) interface, packing inside the differentiated
    function, so that its gradients are the packed gradient's slots."""
    return lambda q, k, v: fa.flash_attention_packed(pack_qkv(q, k, v), **kw)


@pytest.mark.parametrize("B, T, H, G, D, dtype, packed", CASES.values(), ids=CASES.keys())
def test_packed_qkv_equals_reference(B, T, H, G, D, dtype, packed):
    """The same cases through `flash_attention_packed`: q, k and v read from one array and
    dq, dk, dv written into one (the dk/dv kernel filling the dq kernel's array)."""
    q, k, v, seg, pos, w = _case(B, T, H, G, D, dtype, seed=1)
    if not packed:
        seg, pos = jnp.ones((B, T), jnp.int32), jnp.broadcast_to(jnp.arange(T), (B, T))
    kernel = packed_attention(
        segment_ids_BT=seg if packed else None, positions_BT=pos, tuning=SMALL
    )
    got = _value_and_grads(kernel, q, k, v, w, seg)
    want = _value_and_grads(
        _reference(seg, pos), *(x.astype(jnp.float32) for x in (q, k, v)), w, seg
    )
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=3e-2, atol=3e-2)
    _assert_equal_on_real_queries(got, want, seg, **tol)
    # the separate kernels' results, bit for bit: the same kernels, other index maps
    separate = functools.partial(
        fa.flash_attention, segment_ids_BT=seg if packed else None, positions_BT=pos, tuning=SMALL
    )
    for a, b in zip(got, _value_and_grads(separate, q, k, v, w, seg), strict=True):
        np.testing.assert_array_equal(np.float32(a), np.float32(b))


def test_default_blocks_at_head_dim_128_equal_reference():
    """The default launch settings at head_dim 128 (128-row forward blocks, rows padded to
    a multiple of 128: 150 -> 256) against the reference, values and gradients."""
    q, k, v, seg, pos, w = _case(2, 150, 2, 1, 128, "float32", seed=5)
    kernel = functools.partial(fa.flash_attention, segment_ids_BT=seg, positions_BT=pos)
    got = _value_and_grads(kernel, q, k, v, w, seg)
    want = _value_and_grads(_reference(seg, pos), q, k, v, w, seg)
    _assert_equal_on_real_queries(got, want, seg, rtol=1e-5, atol=1e-5)


def test_unstructured_ids_and_positions_equal_reference():
    """The mask rule decides, not the order along the row: random segment ids (0 too)
    and positions, which packing never makes."""
    q, k, v, _, _, w = _case(2, 32, 4, 2, 16, "float32", seed=3)
    rng = np.random.default_rng(3)
    seg = jnp.asarray(rng.integers(0, 3, (2, 32)), jnp.int32)
    pos = jnp.asarray(rng.integers(0, 40, (2, 32)), jnp.int32)
    kernel = functools.partial(fa.flash_attention, segment_ids_BT=seg, positions_BT=pos)
    got = _value_and_grads(functools.partial(kernel, tuning=SMALL), q, k, v, w, seg)
    want = _value_and_grads(_reference(seg, pos), q, k, v, w, seg)
    _assert_equal_on_real_queries(got, want, seg, rtol=1e-5, atol=1e-5)


def _exact_block_visibility(seg, pos, bq, bk):
    """(any pair visible, every pair visible) per (query block, key block)."""
    B, T = seg.shape
    mask = attention_mask(pos, pos, seg, seg).reshape(B, T // bq, bq, T // bk, bk)
    return mask.any(axis=(2, 4)), mask.all(axis=(2, 4))


def test_block_skipping_is_exact_on_packed_rows_and_safe_on_any():
    """Skipped blocks hold no visible pair, unmasked blocks only visible ones; on packed
    rows exactly the blocks with a visible pair are computed."""
    rng = np.random.default_rng(2)
    packed = _packed_rows(rng, 6, 128, max_doc=150)
    unstructured = (  # ids and positions that packing never makes
        jnp.asarray(rng.integers(0, 4, (6, 128)), jnp.int32),
        jnp.asarray(rng.integers(0, 200, (6, 128)), jnp.int32),
    )
    for bq, bk in [(16, 16), (32, 16), (16, 64)]:
        visibility = jax.jit(functools.partial(block_visibility, block_q=bq, block_k=bk))
        exact = jax.jit(functools.partial(_exact_block_visibility, bq=bq, bk=bk))
        for rows in (packed, unstructured):
            (may_see, sees_all), (some, every) = visibility(*rows), exact(*rows)
            assert bool(jnp.all(may_see | ~some)) and bool(jnp.all(sees_all == every))
            bounds = np.asarray(loop_bounds(may_see, sees_all))
            lo, full_lo, full_hi, hi = np.moveaxis(bounds, -1, 0)
            assert (lo <= full_lo).all() and (full_lo <= full_hi).all() and (full_hi <= hi).all()
            idx = np.arange(may_see.shape[-1])
            inside = (idx >= lo[..., None]) & (idx < hi[..., None])
            unmasked = (idx >= full_lo[..., None]) & (idx < full_hi[..., None])
            assert not np.any(np.asarray(may_see) & ~inside)  # every candidate is looped over
            assert not np.any(unmasked & ~np.asarray(every))  # no mask only where all visible
        np.testing.assert_array_equal(visibility(*packed)[0], exact(*packed)[0])
        assert bool(visibility(*packed)[1].any())  # the unmasked path is exercised


def test_sharded_equals_reference():
    """Rows over data x fsdp, query and key/value heads over tensor (whole groups each)."""
    q, k, v, seg, pos, w = _case(4, 40, 4, 2, 16, "float32", seed=4)
    want = _value_and_grads(_reference(seg, pos), q, k, v, w, seg)
    kernel = functools.partial(
        fa.flash_attention, segment_ids_BT=seg, positions_BT=pos, tuning=SMALL
    )
    mesh = mesh_of(dict(data=2, fsdp=2, tensor=2))
    with sharding.mesh_context(mesh):
        got = _value_and_grads(kernel, q, k, v, w, seg)
        assert "shard_map" in str(jax.make_jaxpr(kernel)(q, k, v))
    _assert_equal_on_real_queries(got, want, seg, rtol=1e-5, atol=1e-5)


def test_packed_sharded_equals_reference():
    q, k, v, seg, pos, w = _case(4, 40, 4, 2, 16, "float32", seed=4)
    want = _value_and_grads(_reference(seg, pos), q, k, v, w, seg)
    kernel = packed_attention(segment_ids_BT=seg, positions_BT=pos, tuning=SMALL)
    mesh = mesh_of(dict(data=2, fsdp=2, tensor=2))
    with sharding.mesh_context(mesh):
        got = _value_and_grads(kernel, q, k, v, w, seg)
    _assert_equal_on_real_queries(got, want, seg, rtol=1e-5, atol=1e-5)


def _random_params(shapes):
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


LM_CASES = {
    "tiny-llama (grouped-query heads, RoPE: separate q, k, v)": ("tiny-llama", {}),
    "gpt2-like (learned positions, biases: packed q/k/v)": ("tiny", {"use_bias": True}),
    "gpt2-like, grouped-query heads (packed, two query heads a group)": (
        "tiny",
        {"use_bias": True, "n_kv_heads": 2},
    ),
}


@pytest.mark.parametrize("preset, overrides", LM_CASES.values(), ids=LM_CASES.keys())
def test_language_model_pallas_equals_reference_on_packed_batch(preset, overrides, monkeypatch):
    """Loss and every parameter's gradient (the stacked q/k/v weights' included)."""
    packed_calls = []
    packed = fa.flash_attention_packed
    monkeypatch.setattr(
        fa, "flash_attention_packed", lambda *a, **k: packed_calls.append(1) or packed(*a, **k)
    )
    cfg = get_preset(preset, n_layers=1, **overrides)
    batch = {k: jnp.asarray(v) for k, v in random_lm_batch(0, 2, 40, cfg.vocab_size).items()}
    reference = LanguageModel(cfg.replace(attention_backend="reference"))
    shapes = jax.eval_shape(reference.init, jax.random.key(0), batch["inputs"])["params"]
    params = _random_params(nn.meta.unbox(shapes))  # XLA's CPU compile of init takes seconds

    def loss_and_grads(backend):
        model = LanguageModel(cfg.replace(attention_backend=backend))

        def loss(p):
            logits = model.apply(
                {"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"]
            )
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
            return jnp.sum(nll * batch["weights"]) / jnp.sum(batch["weights"])

        return _run(jax.value_and_grad(loss), params)

    loss_p, grads_p = loss_and_grads("pallas")
    assert len(packed_calls) == (cfg.positional != "rope")  # RoPE rotates q and k apart
    loss_r, grads_r = loss_and_grads("reference")
    np.testing.assert_allclose(loss_p, loss_r, rtol=1e-6)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(grads_p), jax.tree.leaves(grads_r), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_auto_backend_choice(monkeypatch):
    cfg = get_preset("gpt2-124m")
    assert cfg.attention_backend == "auto"
    monkeypatch.setattr(attention_module.jax, "default_backend", lambda: "cpu")
    assert choose_backend(cfg, packed=True) == "reference"  # off the GPU
    monkeypatch.setattr(attention_module.jax, "default_backend", lambda: "gpu")
    assert choose_backend(cfg, packed=True) == "pallas"
    assert choose_backend(cfg, packed=False) == "cudnn"
    assert choose_backend(cfg.replace(dtype="float32"), packed=False) == "pallas"
    # head_dim 24: not a power of two (no Pallas kernel), but cuDNN takes it
    assert choose_backend(cfg.replace(d_model=288), packed=True) == "cudnn"
    assert choose_backend(cfg.replace(attention_backend="xla"), packed=True) == "xla"


def test_bad_shapes_fail_clearly():
    q = jnp.zeros((1, 16, 4, 24))
    with pytest.raises(ValueError, match="power-of-two head_dim >= 16"):
        fa.flash_attention(q, q, q, None, jnp.zeros((1, 16), jnp.int32))
    q = jnp.zeros((1, 16, 4, 16))
    with pytest.raises(ValueError, match=r"positions must be \[B, T\]"):
        fa.flash_attention(q, q, q, None, jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="share one dtype"):
        fa.flash_attention(q, q.astype(jnp.bfloat16), q, None, jnp.zeros((1, 16), jnp.int32))
    with pytest.raises(ValueError, match=r"\[B, T, G, R \+ 2, D\] with R >= 1"):
        fa.flash_attention_packed(jnp.zeros((1, 16, 2, 2, 16)), None, jnp.zeros((1, 16), jnp.int32))


# ----------------------------------------------------------------------------
# Lowering for the GPU without one (as in test_kernel_layer_norm): what the interpreter
# accepts but Triton does not (tensor shapes, dtypes) fails here rather than on the H200.


def _triton_kernels(B, T, H, G, D, packed=False):
    # the Triton pair asked for: "auto" picks the Mosaic GPU backward at head_dim 128 on Hopper
    settings = dict(interpret=False, tuning=fa.Tuning(bwd_kernel="triton"))

    def loss(q, k, v, seg, pos):
        if packed:
            out = fa.flash_attention_packed(pack_qkv(q, k, v), seg, pos, **settings)
        else:
            out = fa.flash_attention(q, k, v, seg, pos, **settings)
        return jnp.sum(out.astype(jnp.float32))

    spec = jax.ShapeDtypeStruct
    args = [spec((B, T, h, D), jnp.bfloat16) for h in (H, G, G)]
    args += [spec((B, T), jnp.int32)] * 2
    return triton_kernels(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), *args)


@pytest.mark.parametrize(
    "shape, packed",
    [
        ((8, 1024, 12, 12, 64), False),
        ((8, 1024, 12, 12, 64), True),
        ((2, 2048, 32, 8, 64), False),
        ((2, 2048, 32, 8, 64), True),
        ((2, 512, 16, 16, 128), False),
    ],
)
def test_lowers_to_verified_triton_ir(shape, packed):
    kernels = _triton_kernels(*shape, packed=packed)
    names = sorted(k.name for k in kernels)
    assert names == ["flash_attention_dkv", "flash_attention_dq", "flash_attention_fwd"]
    verify_triton_ir(kernels)


def test_launch_settings_follow_the_head_dim():
    """Three stages of key/value loads for head_dim <= 64, two above; 64 query rows a
    forward program, 128 at head_dim 128 (all measured on an H200); rows
    padded to the largest block; an explicit setting wins."""
    assert (fa.DEFAULT_TUNING.stages(64), fa.DEFAULT_TUNING.stages(128)) == (3, 2)
    assert fa.Tuning(num_stages=2).stages(64) == 2
    assert [fa.DEFAULT_TUNING.fwd_q(d) for d in (64, 128, 256)] == [64, 128, 64]
    assert (fa.DEFAULT_TUNING.row_multiple(64), fa.DEFAULT_TUNING.row_multiple(128)) == (64, 128)
    assert fa.Tuning(fwd_block_q=32).fwd_q(128) == 32
