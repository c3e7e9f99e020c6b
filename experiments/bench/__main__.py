"""python -m experiments.bench [--suite SUITE] [--only BENCHES] [--match STR] [--tag T]

SUITE: gpu | cpu (tiny presets) | scale | scale-cpu (multi-device meshes, issue 17).
BENCHES: a comma-separated subset of ceilings,attention,kernels,train,decode,posttrain
(the default), and memory (per-device memory planned on fake CPU devices; not in the
default set: it compiles in CPU subprocesses and takes minutes).

`--match STR` keeps only the variants whose name contains STR (kernel checks: whose
kernel's name, e.g. flash_attention, contains STR or is contained in it); several
STRs are separated by commas outside brackets, so a whole variant name such as
gpt2-124m/T1024/b64/packed[attention_backend=auto,activation_impl=xla] is one STR; an
STR starting with "=" keeps only the variant of exactly that name. It
prints one table at the end and appends every row (with profiles) to
OUT/bench.jsonl. Each benchmark is one function; a failure (e.g. out of
memory) becomes an "error" row and the run goes on.
"""

from __future__ import annotations

import os

# Before JAX starts: let XLA's allocator take most of the GPU (default 75%).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402

from experiments.bench import (  # noqa: E402
    attention_check,
    ceilings,
    decode,
    kernel_check,
    memory,
    posttrain,
    suites,
    train_step,
)
from experiments.bench.report import table  # noqa: E402
from experiments.bench.timing import device_name, peak_flops  # noqa: E402

ALL = ("ceilings", "attention", "kernels", "train", "decode", "posttrain")
CHOICES = (*ALL, "memory")


def match_terms(arg: str) -> list[str]:
    """--match's substrings: split at the commas that are not inside [...]."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(arg + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            terms.append(arg[start:i])
            start = i + 1
    return [t for t in terms if t]


def matches(name: str, terms: list[str]) -> bool:
    """Whether a variant named `name` is kept by --match's `terms` (no terms: all)."""
    return not terms or any(name == t[1:] if t.startswith("=") else t in name for t in terms)


def _profile_with_graphs() -> None:
    """Profiles see the calls as they are timed, with their CUDA graphs (command buffers),
    which XLA otherwise leaves out under the profiler, running a call kernel by kernel.
    An XLA flag: it takes effect only if JAX's backend has not started yet."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "command_buffers_during_profiling" not in flags:
        flag = "--xla_enable_command_buffers_during_profiling=true"
        os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__)
    on_gpu = jax.default_backend() == "gpu"
    ap.add_argument("--suite", choices=sorted(suites.SUITES), default="gpu" if on_gpu else "cpu")
    ap.add_argument("--only", default=",".join(ALL), help=f"comma-separated subset of {CHOICES}")
    ap.add_argument("--match", default="", help="comma-separated substrings of variant names")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument(
        "--budget-s",
        type=float,
        default=float("inf"),
        help="skip what is left after this many seconds",
    )
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    ap.add_argument("--tag", default="", help="label stored with every row")
    args = ap.parse_args(argv)
    if not args.no_profile:
        _profile_with_graphs()
    only = set(args.only.split(","))
    if not only <= set(CHOICES):
        ap.error(f"--only takes {CHOICES}, got {sorted(only - set(CHOICES))}")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    train_variants, decode_variants, profiled = suites.SUITES[args.suite]
    wanted = match_terms(args.match)
    pick = lambda vs: [v for v in vs if matches(v.name, wanted)]  # noqa: E731
    peak_key, peak = peak_flops()
    header = {
        "device": device_name(),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "peak": peak_key,
        "peak_flops": peak,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "tag": args.tag,
    }
    print(json.dumps(header), flush=True)
    rows: list[dict] = []

    def record(row: dict) -> None:
        row = {**row, "tag": args.tag, "device": header["device"]}
        rows.append(row)
        with open(os.path.join(args.out, "bench.jsonl"), "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}, default=str), flush=True)
        if "profile" in row:
            print(json.dumps(row["profile"], default=str, indent=1), flush=True)

    def attempt(bench: str, name: str, fn) -> None:
        if time.perf_counter() - start > args.budget_s:
            record({"bench": bench, "variant": name, "error": "skipped: over --budget-s"})
            return
        try:
            t0 = time.perf_counter()
            row = fn()
            record({**row, "wall_s": time.perf_counter() - t0})
        except Exception as e:  # noqa: BLE001 - one failed variant must not end the run
            traceback.print_exc()
            error = f"{type(e).__name__}: {str(e)[:300]}"
            record({"bench": bench, "variant": name, "error": error})

    measured: dict = {}

    def run_ceilings() -> None:
        small = args.suite == "cpu"
        attempt(
            "ceilings",
            "copy+matmul",
            lambda: {
                "bench": "ceilings",
                "variant": "copy+matmul",
                **ceilings.measure(*((64, 512) if small else (2048, 8192))),
            },
        )
        measured["copy_GBps"] = rows[-1].get("copy_GBps")

    def run_attention() -> None:
        impls = ("xla", "cudnn") if jax.default_backend() == "gpu" else ("xla",)
        shapes = attention_check.SHAPES if args.suite == "gpu" else {"tiny": (2, 64, 4, 2, 16)}
        for r in attention_check.check(impls, shapes):
            record({"bench": "attention", "variant": f"{r.pop('shape')}/{r.pop('impl')}", **r})

    def run_kernels() -> None:
        iters = max(3, args.iters // 2)
        checks = {
            "decode_attention": kernel_check.check_decode_attention,
            "layer_norm": kernel_check.check_layer_norm,
            "bias_gelu": kernel_check.check_bias_gelu,
            "flash_attention": kernel_check.check_flash_attention,
        }
        for name, check in checks.items():
            if wanted and not any(m in name or name in m for m in wanted):
                continue
            try:
                for r in check(iters):  # recorded as they come: a timeout keeps earlier rows
                    record(r)
            except Exception as e:  # noqa: BLE001 - one failed check must not end the run
                traceback.print_exc()
                record({"bench": "kernels", "variant": check.__name__, "error": repr(e)[:300]})

    def run_train() -> None:
        for v in pick(train_variants):
            traced = not args.no_profile and v.name in profiled
            # traces stay local: too deep and too large to come back from the device
            pdir = os.path.join(tempfile.gettempdir(), "bench-trace") if traced else None
            attempt(
                "train",
                v.name,
                lambda v=v, d=pdir: train_step.run(v, peak, args.warmup, args.iters, d),
            )

    def run_decode() -> None:
        iters, copy_GBps = max(3, args.iters // 4), measured.get("copy_GBps")
        for v in pick(decode_variants):
            traced = not args.no_profile and v.name in profiled
            pdir = os.path.join(tempfile.gettempdir(), "bench-trace") if traced else None
            attempt("decode", v.name, lambda v=v, d=pdir: decode.run(v, copy_GBps, 1, iters, d))

    def run_posttrain() -> None:
        for v in pick(suites.POSTTRAIN.get(args.suite, [])):
            attempt(
                "posttrain", v.name, lambda v=v: posttrain.run(v, peak, args.warmup, args.iters)
            )

    def run_memory() -> None:
        for row in memory.plan_in_subprocesses(pick(suites.MEMORY.get(args.suite, []))):
            record(row)

    benches = {
        "ceilings": run_ceilings,
        "attention": run_attention,
        "kernels": run_kernels,
        "train": run_train,
        "decode": run_decode,
        "posttrain": run_posttrain,
        "memory": run_memory,
    }
    for name in args.only.split(","):  # in the order asked for
        benches[name]()
    total_s = time.perf_counter() - start
    print(
        f"\n{header['device']}  jax {header['jax']}  peak {peak_key}={peak}  "
        f"XLA_FLAGS={header['xla_flags']!r}  tag={args.tag!r}  total {total_s:.0f}s"
    )
    print(table(rows))
    if wanted and only - {"ceilings"} and all(r["bench"] == "ceilings" for r in rows):
        print(
            f"error: --match={args.match!r} names no variant of --only={args.only} in the "
            f"{args.suite!r} suite; the names are in experiments/bench/suites.py",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
