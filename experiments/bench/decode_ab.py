"""Two trees' decoding speed, measured in processes that alternate on one device.

    git archive HEAD model | tar -x -C /tmp/baseline    # a tree: a directory with model/
    python -m experiments.bench.decode_ab --baseline /tmp/baseline --rounds 3
    python -m experiments.bench.decode_ab --baseline . --candidate /tmp/a --candidate /tmp/b

Each process imports `model` from one tree (the candidate defaults to this checkout; several
candidates may be given),
measures the copy ceiling (`ceilings.py`), then the sampler's time per token
(`decode.run_sampler`, greedy, no EOS), and prints one row. The processes alternate between
the trees because the copy bandwidth, and the decoding time with it, moves by a few per cent
from one process to the next on the same GPU (BENCHMARKS.md, "Speed round thirty-two"):
each tree's median over its processes is compared, as a fraction of the median ceiling of
all processes. `--profile` adds, per tree, the kernels of one sampled sequence (its prefill
too) in microseconds per token, on a GPU. Exit status 1 when a process fails (its error is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path

ROW = "decode_ab row: "
REPO = Path(__file__).resolve().parents[2]


def measure(args: argparse.Namespace) -> dict:
    """One process's row: this tree's sampler against this process's ceiling."""
    import jax
    import jax.numpy as jnp

    from experiments.bench import ceilings, decode, profile
    from model.sampling import SamplingConfig, sample

    on_gpu = jax.default_backend() == "gpu"  # elsewhere a quick ceiling: tests, a CPU try
    ceiling = ceilings.measure(*((2048, 8192) if on_gpu else (64, 512)))
    variant = decode.DecodeVariant(
        args.preset, args.batch, args.prompt_len, args.new_tokens, loop="sampler"
    )
    row = decode.run_sampler(variant, ceiling["copy_GBps"], args.iters)
    out = {
        "label": args.child,
        "step_ms": row["step_ms"],
        "copy_GBps": ceiling["copy_GBps"],
        "bytes_per_step_GB": row["bytes_per_step_GB"],
        "greedy_agree": row["greedy_agree"],
    }
    if args.profile:
        _, model, params, prompt = decode._setup(variant)
        lengths = jnp.full((args.batch,), variant.prompt_len, jnp.int32)
        greedy = SamplingConfig(max_new_tokens=args.profile_tokens, temperature=0)
        sampler = jax.jit(partial(sample, model, cfg=greedy))
        compiled = sampler.lower(params, prompt, lengths, jax.random.key(2)).compile()
        traced = profile.trace(
            lambda: compiled(params, prompt, lengths, jax.random.key(2)),
            1,
            f"/tmp/decode_ab_{os.getpid()}",
            compiled.as_text(),
        )
        per_token = 1e3 / args.profile_tokens  # ms per sequence -> us per token
        out["kernels_us_per_token"] = [
            (name[:60], round(ms * per_token, 2), origin[-60:])
            for name, ms, origin in traced.get("top_kernels_ms_per_step", [])[:25]
        ]
    return out


def _run_child(label: str, tree: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(tree), str(REPO), env.get("PYTHONPATH", "")) if p
    )
    flags = ["--child", label, "--preset", args.preset, "--batch", str(args.batch)]
    flags += ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    flags += ["--iters", str(args.iters)]
    flags += ["--profile-tokens", str(args.profile_tokens)] + ["--profile"] * args.profile
    done = subprocess.run(
        [sys.executable, "-m", "experiments.bench.decode_ab", *flags],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
    )
    for line in done.stdout.splitlines():
        if line.startswith(ROW):
            return json.loads(line[len(ROW) :])
    lines = (done.stderr + done.stdout).strip().splitlines()
    errors = [line for line in lines if "Error" in line.split(":")[0]] or lines[-1:] or ["-"]
    return {"label": label, "error": f"exit {done.returncode}: {errors[-1][:300]}"}


def compare(rows: list[dict]) -> list[str]:
    """The table: per tree its times, median, and the median's share of the ceilings."""
    good = [r for r in rows if "error" not in r]
    if not good:
        return ["no process measured anything"]
    ceiling = statistics.median(r["copy_GBps"] for r in good)
    lines = [f"median copy ceiling {ceiling:,.0f} GB/s over {len(good)} processes"]
    lines.append(f"{'tree':<10} {'ms/token, each process':<44} {'median':>8} {'% ceiling':>10}")
    for label in dict.fromkeys(r["label"] for r in good):
        mine = [r for r in good if r["label"] == label]
        median_ms = statistics.median(r["step_ms"] for r in mine)
        share = mine[0]["bytes_per_step_GB"] / ceiling / (median_ms / 1e3)
        each = ", ".join(f"{r['step_ms']:.4f}" for r in mine)
        lines.append(f"{label:<10} {each:<44} {median_ms:>8.4f} {100 * share:>9.1f}%")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench.decode_ab", description=__doc__)
    ap.add_argument("--baseline", type=Path, help="a directory holding a model/ package")
    ap.add_argument(
        "--candidate",
        type=Path,
        action="append",
        help="a directory holding a model/ package (default this checkout); repeat it for "
        "several, each labelled by its directory's name",
    )
    ap.add_argument("--rounds", type=int, default=3, help="processes per tree")
    ap.add_argument("--preset", default="gpt-1.3b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-tokens", type=int, default=64)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(ROW + json.dumps(measure(args)), flush=True)
        return 0
    candidates = [c.resolve() for c in args.candidate or [REPO]]
    if len(candidates) == 1:
        trees = {"candidate": candidates[0]}
    else:
        trees = {c.name: c for c in candidates}
        if len(trees) < len(candidates):
            print("decode_ab: candidates need directories of distinct names", file=sys.stderr)
            return 2
    if args.baseline is not None:
        trees = {"baseline": args.baseline.resolve(), **trees}
    for label, tree in trees.items():
        if not (tree / "model" / "__init__.py").is_file():
            print(f"decode_ab: {label} {tree} holds no model/ package", file=sys.stderr)
            return 2
    rows = []
    for round_ in range(args.rounds):
        for label, tree in trees.items():
            rows.append(_run_child(label, tree, args))
            row = rows[-1]
            shown = row.get("error") or f"{row['step_ms']:.4f} ms/token"
            print(f"round {round_} {label}: {shown}", flush=True)
            for kernel in row.get("kernels_us_per_token", []) if round_ == 0 else []:
                print("   ", *kernel)
    print("\n".join(compare(rows)))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
