"""The Mosaic GPU backward pair (`model/kernels/flash_attention_mgpu.py`) against the
Triton one on a Hopper GPU, on rows packed like the stdlib corpus: gradient error, then
time, by streamed block and pipeline depth. Prints one table.

    python -m experiments.bench.flash_mgpu_check [--iters 20] [--sizes gpt2,gpt-1.3b]
    python -m experiments.bench.flash_mgpu_check --step triton-triton,triton-mgpu-64-3

--step times the gpt2-124m recipe's training step on packed rows instead (the
`experiments.bench` train variant) with each setting in turn, `--rounds` times; a
setting is forward-backward[-block-slots], e.g. mgpu-mgpu-64-3.
"""

from __future__ import annotations

import argparse
import functools
import traceback

import jax
import jax.numpy as jnp

from experiments.bench import packed_rows
from experiments.bench.__main__ import main as bench_main
from experiments.bench.timing import median, time_calls
from model.kernels import flash_attention as fa

# name: (batch, length, heads, head_dim) of the training shapes
SIZES = {"gpt2": (64, 1024, 12, 64), "gpt-1.3b": (16, 2048, 16, 128), "small": (2, 384, 2, 64)}
STEP = "=gpt2-124m/T1024/b64/packed[attention_backend=auto,scan_layers=True,scan_unroll=0]"
VARIANTS = [  # (forward, backward, streamed block, slots)
    ("triton", "triton", 64, 3),
    ("triton", "mgpu", 64, 2),
    ("triton", "mgpu", 64, 3),
    ("triton", "mgpu", 64, 4),
    ("mgpu", "triton", 64, 2),
    ("mgpu", "triton", 64, 3),
    ("mgpu", "triton", 128, 2),
    ("mgpu", "mgpu", 64, 3),
]


def _inputs(B, T, H, D, seed=0):
    batch = packed_rows.packed_batch(50_304, B, T, seed=seed)
    seg = jnp.asarray(batch["segment_ids"], jnp.int32)
    pos = jnp.asarray(batch["positions"], jnp.int32)
    keys = jax.random.split(jax.random.key(seed), 2)
    qkv = jax.random.normal(keys[0], (B, T, H, 3, D), jnp.bfloat16)
    d_out = jax.random.normal(keys[1], (B, T, H, 1, D), jnp.bfloat16)
    return qkv, seg, pos, d_out


def _backward_fn(tuning: fa.Tuning):
    @jax.jit
    def run(qkv, seg, pos, d_out):
        out, lse = fa._forward(qkv, qkv, qkv, seg, pos, tuning=tuning, interpret=False, packed=True)
        return fa._backward(
            qkv, qkv, qkv, seg, pos, out, lse, d_out, tuning=tuning, interpret=False, packed=True
        )[0]

    return run


def _forward_fn(tuning: fa.Tuning):
    @jax.jit
    def run(qkv, seg, pos, d_out):
        del d_out
        return fa._forward(qkv, qkv, qkv, seg, pos, tuning=tuning, interpret=False, packed=True)

    return run


def _tuning(fwd="triton", bwd="triton", block=64, slots=3) -> fa.Tuning:
    return fa.Tuning(fwd_kernel=fwd, bwd_kernel=bwd, mgpu_block=int(block), mgpu_slots=int(slots))


def _rel_err(x, ref) -> float:
    x, ref = x.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sizes", default="small,gpt2,gpt-1.3b")
    parser.add_argument(
        "--variants", default="", help="forward-backward-block-slots,... (default: VARIANTS)"
    )
    parser.add_argument("--step", default="")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--step-variant", default=STEP, help="the train variant --step times")
    args = parser.parse_args()
    if args.step:
        for _ in range(args.rounds):
            for setting in args.step.split(","):
                fa.DEFAULT_TUNING = _tuning(*setting.split("-"))
                flags = ["--iters", str(args.iters), "--warmup", "3", "--only", "train"]
                flags += ["--no-profile", "--match", args.step_variant, "--tag", setting]
                bench_main(flags)
        return
    rows = []
    for name in args.sizes.split(","):
        B, T, H, D = SIZES[name]
        inputs = _inputs(B, T, H, D)
        ref = None
        variants = [v.split("-") for v in args.variants.split(",")] if args.variants else VARIANTS
        for fwd, kernel, block, slots in variants:
            tuning = _tuning(fwd, kernel, block, slots)
            fn = _backward_fn(tuning)
            setting = (name, fwd, kernel, block, slots)
            try:
                grad = jax.block_until_ready(fn(*inputs))
            except Exception as e:  # noqa: BLE001  (report and go on: this is a probe)
                traceback.print_exc()
                rows.append((*setting, f"FAILED {type(e).__name__}: {str(e)[:300]}"))
                print(rows[-1], flush=True)
                continue
            if ref is None:
                ref = grad
            err = [_rel_err(grad[:, :, :, i], ref[:, :, :, i]) for i in range(3)]
            finite = bool(jnp.isfinite(grad.astype(jnp.float32)).all())
            ms = median(time_calls(functools.partial(fn, *inputs), 2, args.iters)) * 1e3
            fwd_fn = functools.partial(_forward_fn(tuning), *inputs)
            fwd_ms = median(time_calls(fwd_fn, 2, args.iters)) * 1e3
            errors = "/".join(f"{e:.1e}" for e in err)
            result = f"{ms:.3f} ms fwd+bwd ({fwd_ms:.3f} fwd), rel err dk/dv/dq {errors}"
            rows.append((*setting, f"{result}, finite {finite}"))
            print(rows[-1], flush=True)
    print("\nsize | forward | backward | block | slots | result")
    for row in rows:
        print(" | ".join(str(c) for c in row))


if __name__ == "__main__":
    main()
