"""The short text table printed at the end of a run.

`python -m experiments.bench.report FILE.jsonl ...` prints it again from saved rows.
"""

from __future__ import annotations

import json
import sys

COLUMNS = {
    "ceilings": ("copy_GBps", "read_GBps", "matmul_TFLOPs"),
    "attention": ("ok", "out_err", "grad_err", "fwd_bwd_ms", "TFLOPs_causal"),
    "kernels": ("out_err", "grad_err", "fwd_bwd_ms", "fwd_ms", "us_per_call", "docs_per_row"),
    "train": ("step_ms", "tokens_per_s", "mfu", "TFLOPs", "mem_GiB", "compile_s", "spread"),
    "decode": (
        "step_ms",
        "tokens_per_s",
        "roofline_frac",
        "greedy_agree",
        "bytes_per_step_GB",
        "prefill_tokens_per_s",
        "mem_GiB",
        "compile_s",
    ),
    "posttrain": ("step_ms", "tokens_per_s", "mfu", "score_ms", "mem_GiB", "compile_s", "spread"),
    "memory": ("state_GiB", "argument_GiB", "temp_GiB", "total_GiB", "floor_GiB", "fits_h200"),
}


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def table(rows: list[dict]) -> str:
    lines = []
    for bench, cols in COLUMNS.items():
        mine = [r for r in rows if r.get("bench") == bench]
        if not mine:
            continue
        lines.append(f"\n[{bench}]  variant | " + " | ".join(cols))
        for r in mine:
            label = r["variant"] + (f" <{r['tag']}>" if r.get("tag") else "")
            cells = [label] + (
                [f"ERROR {r['error']}"] if "error" in r else [_fmt(r.get(c)) for c in cols]
            )
            lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(paths: list[str]) -> int:
    if not paths or any(p.startswith("-") for p in paths):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if paths in (["-h"], ["--help"]) else 2
    try:
        rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        print(f"error: {error}; give the bench.jsonl files of runs", file=sys.stderr)
        return 2
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
