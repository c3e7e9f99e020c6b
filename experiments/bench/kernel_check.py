"""The Pallas kernels against their plain-JAX definitions, at real sizes: error and time.

Random bf16 inputs; each kernel and its definition run the same computation
many times inside one jitted loop (the result feeds the next call, so nothing
is hoisted), so microsecond kernels are timed without dispatch overhead.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from experiments.bench import packed_rows
from experiments.bench.timing import median, time_calls
from model.attention import fused_attention, reference_attention
from model.config import ModelConfig
from model.kernels import bias_gelu, cross_entropy, flash_attention, layer_norm
from model.kernels.decode_attention import decode_attention
from model.layers import Norm
from model.masking import attention_mask
from train import losses

# One sequence, as the sampler decodes it on a GPU (its transposed form, model/sampling.py),
# with a cache of 128 + 256 slots.
DECODE_SHAPES = {"gpt-1.3b": (1, 384, 16, 16, 128), "llama-1b": (1, 384, 32, 8, 64)}
# Kernel settings tried: (formulation, cache slots per block, programs per head, warps,
# who combines the programs' partial results).
DECODE_KERNELS = [
    ("dot", 64, None, 4, "xla"),
    ("dot", 64, None, 4, "kernel"),
    ("dot", 128, None, 4, "kernel"),  # half the programs, each a longer run
    ("dot", 32, None, 4, "xla"),
    ("reduce", 64, None, 4, "xla"),
]
LOOP = 240  # kernel calls per timed program (10 tokens x 24 layers)


def _rel_err(x: jax.Array, ref: jax.Array) -> float:
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def _reference_decode(q_BHD, k, v, q_pos, q_seg, kv_pos, kv_seg):
    mask_BQK = attention_mask(q_pos[:, None], kv_pos, q_seg[:, None], kv_seg)
    return reference_attention(q_BHD[:, None], k, v, mask_BQK)[:, 0]


def _time_loop(fn, carry, *rest, iters: int) -> float:
    """Seconds per call of fn(carry, *rest), its output fed back as the next carry."""

    @jax.jit
    def loop(carry, *rest):
        return jax.lax.fori_loop(0, LOOP, lambda i, c: fn(c, *rest), carry)

    return median(time_calls(lambda: loop(carry, *rest), 2, iters)) / LOOP


def check_decode_attention(iters: int) -> Iterator[dict]:
    for seed, (name, (B, S, H, G, D)) in enumerate(DECODE_SHAPES.items()):
        keys = jax.random.split(jax.random.key(seed), 3)
        q = jax.random.normal(keys[0], (B, H, D), jnp.bfloat16)
        k = jax.random.normal(keys[1], (B, S, G, D), jnp.bfloat16)
        v = jax.random.normal(keys[2], (B, S, G, D), jnp.bfloat16)
        filled = S * 2 // 3  # slots written so far; the rest are empty
        kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        kv_pos = jnp.where(kv_pos < filled, kv_pos, jnp.iinfo(jnp.int32).max)
        kv_seg = jnp.ones((B, S), jnp.int32)
        q_pos = jnp.full((B,), filled - 1, jnp.int32)
        q_seg = jnp.ones((B,), jnp.int32)
        rest = (k, v, q_pos, q_seg, kv_pos, kv_seg)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        want = _reference_decode(*f32, q_pos, q_seg, kv_pos, kv_seg)
        # the carry: (query, the kernel's arrival counts), as a decoding cache carries them
        carry = (q, jnp.zeros((B, G), jnp.int32))
        candidates = {"reference": lambda c, *rest: (_reference_decode(c[0], *rest), c[1])}
        for formulation, block, splits, warps, combine in DECODE_KERNELS:
            impl = f"pallas-{formulation}-k{block}-s{splits or 'all'}-w{warps}-{combine}"
            kernel = functools.partial(
                decode_attention,
                formulation=formulation,
                block=block,
                splits=splits,
                num_warps=warps,
                combine=combine,
            )
            candidates[impl] = lambda c, *rest, kernel=kernel: kernel(c[0], *rest, c[1])
        for impl, fn in candidates.items():
            row = {"bench": "kernels", "variant": f"decode_attention/{name}/{impl}"}
            try:
                row["out_err"] = _rel_err(jax.jit(fn)(carry, *rest)[0], want)
                row["us_per_call"] = _time_loop(fn, carry, *rest, iters=iters) * 1e6
                row["cache_GBps"] = 2 * B * S * G * D * 2 / (row["us_per_call"] * 1e3)
            except Exception as e:  # noqa: BLE001 - report and keep going
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            yield row


# GPT-2 124M at batch 64 x 1024: every norm's input.
NORM_SHAPE = (64, 1024, 768)
NORM_TUNINGS = {
    "default": layer_norm.DEFAULT_TUNING,
    "small-blocks": layer_norm.Tuning(fwd_elems=1024, bwd_elems=1024),
    "large-blocks": layer_norm.Tuning(fwd_elems=8192, bwd_elems=4096, bwd_programs_per_sm=6),
}


def _xla_norm_keep_input(x, scale, bias):
    """The `Norm` module (model/layers.py) with XLA's norms, as (x, y)."""
    cfg = ModelConfig(d_model=x.shape[-1], use_bias=True, dtype=str(x.dtype))
    return Norm(cfg).apply({"params": {"scale": scale, "bias": bias}}, x, keep_input=True)


def check_layer_norm(iters: int) -> Iterator[dict]:
    """Forward + backward of one pre-norm LayerNorm (keep-input form) at GPT-2 size."""
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], NORM_SHAPE, jnp.bfloat16)
    scale = 1 + 0.1 * jax.random.normal(keys[1], NORM_SHAPE[-1:], jnp.float32)
    bias = 0.1 * jax.random.normal(keys[2], NORM_SHAPE[-1:], jnp.float32)
    d_res = jax.random.normal(keys[3], NORM_SHAPE, jnp.bfloat16)
    d_y = jax.random.normal(keys[4], NORM_SHAPE, jnp.bfloat16)
    candidates = {"xla": _xla_norm_keep_input}
    for tag, tuning in NORM_TUNINGS.items():
        candidates[f"pallas-{tag}"] = functools.partial(
            layer_norm.norm_keep_input, eps=1e-5, rms=False, out_dtype=jnp.bfloat16, tuning=tuning
        )

    def fwd_bwd(fn):
        def run(x, scale, bias):
            out, vjp = jax.vjp(fn, x, scale, bias)
            return out[1], *vjp((d_res.astype(out[0].dtype), d_y.astype(out[1].dtype)))

        return jax.jit(run)

    want = fwd_bwd(_xla_norm_keep_input)(x.astype(jnp.float32), scale, bias)
    for impl, fn in candidates.items():
        row = {"bench": "kernels", "variant": f"layer_norm/gpt2-124m-b64/{impl}"}
        try:
            run = fwd_bwd(fn)
            got = run(x, scale, bias)
            row["y_err"] = _rel_err(got[0], want[0])
            row["grad_err"] = max(_rel_err(g, w) for g, w in zip(got[1:], want[1:], strict=True))
            row["fwd_bwd_ms"] = median(time_calls(lambda r=run: r(x, scale, bias), 3, iters)) * 1e3
            # floor: forward reads x, writes y; backward reads x, dy, dres and writes dx
            row["GBps"] = 6 * x.size * 2 / (row["fwd_bwd_ms"] * 1e6)
        except Exception as e:  # noqa: BLE001 - report and keep going
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        yield row


# GPT-2 124M at batch 64 x 1024: the MLP's hidden activations [B * T, d_ff].
GELU_SHAPE = (64 * 1024, 3072)
GELU_TUNINGS = {
    "default": bias_gelu.DEFAULT_TUNING,
    "r4-c1024": bias_gelu.Tuning(rows=4),
    "r16-c1024": bias_gelu.Tuning(rows=16),
    "r8-c2048": bias_gelu.Tuning(cols=2048),
    "pps4": bias_gelu.Tuning(programs_per_sm=4),
    "r8-c512-w4": bias_gelu.Tuning(cols=512, warps=4),
}


def _xla_bias_gelu(h, b):
    """The MLP's XLA path (model/layers.py): bias added in h's dtype, then GELU."""
    return jax.nn.gelu(h + b.astype(h.dtype), approximate=True)


def check_bias_gelu(iters: int) -> Iterator[dict]:
    """Forward + backward (bias gradient included) of the MLP's bias + GELU at GPT-2 size."""
    keys = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(keys[0], GELU_SHAPE, jnp.bfloat16)
    b = 0.1 * jax.random.normal(keys[1], GELU_SHAPE[-1:], jnp.float32)
    d_y = jax.random.normal(keys[2], GELU_SHAPE, jnp.bfloat16)
    candidates = {"xla": _xla_bias_gelu}
    for tag, tuning in GELU_TUNINGS.items():
        candidates[f"pallas-{tag}"] = functools.partial(bias_gelu.bias_gelu, tuning=tuning)

    def fwd_bwd(fn):
        def run(h, b):
            y, vjp = jax.vjp(fn, h, b)
            return y, *vjp(d_y.astype(y.dtype))

        return jax.jit(run)

    want = fwd_bwd(lambda h, b: jax.nn.gelu(h + b, approximate=True))(h.astype(jnp.float32), b)
    for impl, fn in candidates.items():
        row = {"bench": "kernels", "variant": f"bias_gelu/gpt2-124m-b64/{impl}"}
        try:
            run = fwd_bwd(fn)
            got = run(h, b)
            row["out_err"] = _rel_err(got[0], want[0])
            row["grad_err"] = max(_rel_err(g, w) for g, w in zip(got[1:], want[1:], strict=True))
            row["fwd_bwd_ms"] = median(time_calls(lambda r=run: r(h, b), 3, iters)) * 1e3
            row["fwd_ms"] = median(time_calls(lambda f=jax.jit(fn): f(h, b), 3, iters)) * 1e3
            # floor: forward reads h, writes y; backward reads h and dy, writes dh
            row["GBps"] = 5 * h.size * 2 / (row["fwd_bwd_ms"] * 1e6)
        except Exception as e:  # noqa: BLE001 - report and keep going
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        yield row


# GPT-2 124M at batch 64 x 1024: the logits [B * T, padded vocabulary], 50,257 real columns.
CE_SHAPE, CE_VOCAB = (64 * 1024, 50304), 50257
CE_TUNINGS = {
    "default": cross_entropy.DEFAULT_TUNING,
    "fwd-lanes16": cross_entropy.Tuning(fwd_lanes=16),
    "fwd-lanes1024": cross_entropy.Tuning(fwd_lanes=1024),  # one max a row: cross-thread
    "fwd-lanes1": cross_entropy.Tuning(fwd_lanes=1),  # a max per column: two exp2 an element
    "fwd-r2": cross_entropy.Tuning(fwd_rows=2),
    "fwd-r8-w8": cross_entropy.Tuning(fwd_rows=8, fwd_warps=8),
    "fwd-c512": cross_entropy.Tuning(fwd_cols=512),
    "fwd-c2048-w8": cross_entropy.Tuning(fwd_cols=2048, fwd_warps=8),
    "fwd-stages2": cross_entropy.Tuning(fwd_stages=2),
    "fwd-stages4": cross_entropy.Tuning(fwd_stages=4),
    "bwd-r4-w4": cross_entropy.Tuning(bwd_rows=4, bwd_warps=4),
    "bwd-r16": cross_entropy.Tuning(bwd_rows=16),
    "bwd-c2048": cross_entropy.Tuning(bwd_cols=2048),
}


def check_cross_entropy(iters: int) -> Iterator[dict]:
    """Forward + backward of the loss's two statistics at GPT-2 size: XLA's fused passes
    after the model's mask of the padding columns (the previous default) against the
    kernels, which read the unmasked logits and leave the padding out themselves."""
    keys = jax.random.split(jax.random.key(0), 4)
    logits = 4 * jax.random.normal(keys[0], CE_SHAPE, jnp.bfloat16)
    targets = jax.random.randint(keys[1], CE_SHAPE[:1], 0, CE_VOCAB)
    g_target, g_log_z = (jax.random.normal(k, CE_SHAPE[:1]) for k in keys[2:])
    candidates = {"xla": functools.partial(losses.target_logit_and_log_z, impl="xla")}
    for tag, tuning in CE_TUNINGS.items():
        candidates[f"pallas-{tag}"] = functools.partial(
            cross_entropy.target_logit_and_log_z, tuning=tuning
        )

    def fwd_bwd(fn):
        def run(x):
            out, vjp = jax.vjp(lambda x: fn(x, targets, CE_VOCAB), x)
            return out, vjp((g_target, g_log_z))[0]

        return jax.jit(run)

    want = fwd_bwd(losses.reference_masked_statistics)(logits.astype(jnp.float32))
    for impl, fn in candidates.items():
        row = {"bench": "kernels", "variant": f"cross_entropy/gpt2-124m-b64/{impl}"}
        try:
            run = fwd_bwd(fn)
            got = run(logits)
            row["out_err"] = max(_rel_err(g, w) for g, w in zip(got[0], want[0], strict=True))
            row["grad_err"] = _rel_err(got[1], want[1])
            row["fwd_bwd_ms"] = median(time_calls(lambda r=run: r(logits), 3, iters)) * 1e3
            fwd = jax.jit(lambda x, f=fn: f(x, targets, CE_VOCAB))
            row["fwd_ms"] = median(time_calls(lambda f=fwd: f(logits), 3, iters)) * 1e3
            # floor: forward reads the logits, backward reads them and writes their gradient
            row["GBps"] = 3 * logits.size * 2 / (row["fwd_bwd_ms"] * 1e6)
        except Exception as e:  # noqa: BLE001 - report and keep going
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        yield row


# (B, T, H, G, D): Llama-1B's grouped-query heads, GPT-2 124M and GPT-3 XL rows.
FLASH_SHAPES = {
    "llama-1b": (8, 2048, 32, 8, 64),
    "gpt2-124m": (8, 1024, 12, 12, 64),
    "gpt-1.3b": (8, 2048, 16, 16, 128),
}
# Launch settings tried besides the default (model/kernels/flash_attention.py: Tuning); an
# H200 run of five settings is in BENCHMARKS.md.
FLASH_TUNINGS = {
    "q64k64": flash_attention.Tuning(fwd_block_q=64),  # the default but at head_dim 128
    "q128k64": flash_attention.Tuning(fwd_block_q=128),  # the default at head_dim 128
    "q128k128-w8": flash_attention.Tuning(fwd_block_q=128, fwd_block_k=128, fwd_warps=8),
    "stages2": flash_attention.Tuning(num_stages=2),
    "stages3": flash_attention.Tuning(num_stages=3),
}


def _flash_candidates(seg, pos, mask) -> dict:
    """name -> fn(q, k, v) for one kind of rows (seg None: whole rows)."""
    candidates = {"reference": lambda q, k, v: reference_attention(q, k, v, mask)}
    if seg is None:
        candidates["cudnn-causal"] = lambda q, k, v: fused_attention(q, k, v, None, "cudnn")
    else:
        candidates["cudnn-dense-mask"] = lambda q, k, v: fused_attention(q, k, v, mask, "cudnn")
    tunings = {"default": flash_attention.DEFAULT_TUNING}
    tunings.update(FLASH_TUNINGS if seg is not None else {})
    for tag, tuning in tunings.items():
        candidates[f"pallas-{tag}"] = functools.partial(
            flash_attention.flash_attention, segment_ids_BT=seg, positions_BT=pos, tuning=tuning
        )
    return candidates


def _fwd_bwd(fn, real, d_out):
    """jit((q, k, v) -> (out, dq, dk, dv)), output and its cotangent zero on padding
    queries (the reference and the kernel differ there by design)."""

    def run(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return (jnp.where(real, out, 0), *vjp(jnp.where(real, d_out, 0).astype(out.dtype)))

    return jax.jit(run)


def _ms(fn, args, iters: int) -> float:
    return median(time_calls(lambda: fn(*args), 3, iters)) * 1e3


def check_flash_attention(iters: int) -> Iterator[dict]:
    """Forward + backward of the Pallas flash attention against cuDNN on the same rows:
    packed rows (stdlib document lengths; cuDNN then needs a dense mask) and whole rows
    (no segment ids; cuDNN's causal kernel). Errors against the float32 reference."""
    for seed, (name, (B, T, H, G, D)) in enumerate(FLASH_SHAPES.items()):
        keys = jax.random.split(jax.random.key(seed), 4)
        q = jax.random.normal(keys[0], (B, T, H, D), jnp.bfloat16)
        k = jax.random.normal(keys[1], (B, T, G, D), jnp.bfloat16)
        v = jax.random.normal(keys[2], (B, T, G, D), jnp.bfloat16)
        d_out = jax.random.normal(keys[3], (B, T, H, D), jnp.bfloat16)
        rows = packed_rows.packed_batch(256, B, T, seed=seed)
        packed = (jnp.asarray(rows["segment_ids"]), jnp.asarray(rows["positions"]))
        whole = (None, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))
        for layout, (seg, pos) in (("packed", packed), ("whole", whole)):
            mask = attention_mask(pos, pos, seg, seg)
            real = jnp.ones((B, T, 1, 1), bool) if seg is None else (seg != 0)[:, :, None, None]
            candidates = _flash_candidates(seg, pos, mask)
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            want = _fwd_bwd(candidates["reference"], real, d_out)(*f32)
            # visible (query, key) pairs: the work a kernel that skips all else does
            pairs = float(jnp.sum(mask))
            for impl, fn in candidates.items():
                row = {"bench": "kernels", "variant": f"flash_attention/{name}/{layout}/{impl}"}
                if seg is not None:
                    row.update(packed_rows.describe(seg))
                try:
                    run, fwd = _fwd_bwd(fn, real, d_out), jax.jit(fn)
                    got = run(q, k, v)
                    row["out_err"] = _rel_err(got[0], want[0])
                    row["grad_err"] = max(_rel_err(g, w) for g, w in zip(got[1:], want[1:]))
                    row["fwd_bwd_ms"] = _ms(run, (q, k, v), iters)
                    row["fwd_ms"] = _ms(fwd, (q, k, v), iters)
                    row["TFLOPs_visible"] = 3.5 * 4 * pairs * H * D / (row["fwd_bwd_ms"] * 1e9)
                except Exception as e:  # noqa: BLE001 - report and keep going
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                yield row
