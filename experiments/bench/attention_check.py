"""cuDNN / XLA attention against the hand-written reference: outputs, gradients, speed.

Random bf16 inputs; the reference runs on float32 copies, so the error is the
fused kernel's own rounding. Plain causal attention over full rows (the
training fast path: segment_ids=None).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.bench.timing import median, time_calls
from model.attention import fused_attention, reference_attention
from model.masking import attention_mask

# (B, L, H, G, D): GPT-2 124M, GPT-3 XL 1.3B, Llama-1B-like grouped-query heads.
SHAPES = {
    "gpt2-124m": (8, 1024, 12, 12, 64),
    "gpt-1.3b": (4, 2048, 16, 16, 128),
    "llama-1b": (4, 2048, 32, 8, 64),
}
TOLERANCE = 2e-2  # relative L2 error allowed for bf16 operands (METHOD.md: 1e-3..1e-2)


def _rel_err(x: jax.Array, ref: jax.Array) -> float:
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def _causal_reference(q, k, v):
    B, L = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))
    return reference_attention(q, k, v, attention_mask(pos, pos, None, None))


def check(
    implementations: tuple[str, ...], shapes: dict = SHAPES, time_it: bool = True
) -> list[dict]:
    rows = []
    for seed, (name, (B, L, H, G, D)) in enumerate(shapes.items()):
        keys = jax.random.split(jax.random.key(seed), 4)
        q = jax.random.normal(keys[0], (B, L, H, D), jnp.bfloat16)
        k = jax.random.normal(keys[1], (B, L, G, D), jnp.bfloat16)
        v = jax.random.normal(keys[2], (B, L, G, D), jnp.bfloat16)
        ct = jax.random.normal(keys[3], (B, L, H, D), jnp.bfloat16)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref_out, ref_vjp = jax.vjp(_causal_reference, *f32)
        ref_grads = ref_vjp(ct.astype(jnp.float32))
        candidates = {"reference": _causal_reference}
        for impl in implementations:
            candidates[impl] = lambda q, k, v, impl=impl: fused_attention(q, k, v, None, impl)
        for impl, fn in candidates.items():
            row = {"shape": name, "impl": impl}
            try:

                def fwd_bwd(q, k, v, ct, fn=fn):
                    out, vjp = jax.vjp(fn, q, k, v)
                    return (*vjp(ct), out)

                fwd_bwd = jax.jit(fwd_bwd)
                args = (q, k, v, ct)
                *grads, out = fwd_bwd(*args)
                row["out_err"] = _rel_err(out, ref_out)
                row["grad_err"] = max(_rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True))
                row["ok"] = bool(row["out_err"] < TOLERANCE and row["grad_err"] < TOLERANCE)
                if time_it:
                    t = median(time_calls(lambda f=fwd_bwd, a=args: f(*a), 3, 20))
                    # causal: half the square; fwd 4BLLHD/2, bwd 2.5x fwd (recompute of scores)
                    row["fwd_bwd_ms"] = t * 1e3
                    row["TFLOPs_causal"] = 3.5 * 4 * B * L * L * H * D / 2 / t / 1e12
            except Exception as e:  # noqa: BLE001 - report and keep going
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                row["ok"] = False
            rows.append(row)
    return rows
