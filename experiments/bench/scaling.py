"""Weak-scaling table from train rows: tokens/s per device against one device.

`python -m experiments.bench.scaling FILE.jsonl ...` prints, for every tag (one set of
XLA flags) and every model, context and rows per device, each mesh's tokens/s per device,
its efficiency against the one-device row of the same tag, MFU and memory per device.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence

_NAME = re.compile(
    r"^(?P<preset>[^/]+)/T(?P<seq>\d+)/b(?P<batch>\d+)(?P<mb>/mb\d+)?"
    r"/(?P<mesh>data\d+\.fsdp\d+\.tensor\d+)(?P<extra>\[.*\])?$"
)


def _key(row: dict) -> tuple | None:
    """(tag, preset, seq_len, rows per device, model overrides) or None if not a mesh row."""
    m = _NAME.match(row.get("variant", ""))
    if row.get("bench") != "train" or not m or "error" in row:
        return None
    per_device = int(m["batch"]) // row["devices"]
    return row.get("tag", ""), m["preset"], int(m["seq"]), per_device, m["extra"] or ""


def weak_scaling(rows: Sequence[dict]) -> list[dict]:
    """One entry per mesh row, with `efficiency` = tokens/s per device / the one-device row's
    (None where that tag has no one-device row for the same model, context and rows)."""
    keyed = [(k, r) for r in rows if (k := _key(r)) is not None]
    base = {k: r["tokens_per_s_per_device"] for k, r in keyed if r["devices"] == 1}
    out = []
    for k, r in keyed:
        one = base.get(k)
        out.append(
            {
                "tag": k[0],
                "model": f"{k[1]} T={k[2]} {k[3]}/device {k[4]}".strip(),
                "devices": r["devices"],
                "mesh": _NAME.match(r["variant"])["mesh"],
                "step_ms": r["step_ms"],
                "tokens_per_s_per_device": r["tokens_per_s_per_device"],
                "efficiency": r["tokens_per_s_per_device"] / one if one else None,
                "mfu": r.get("mfu"),
                "mem_GiB": r.get("mem_GiB"),
            }
        )
    return sorted(out, key=lambda e: (e["model"], e["tag"], e["devices"], e["mesh"]))


def markdown(entries: Sequence[dict]) -> str:
    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        "| model | XLA flags (tag) | GPUs | mesh | step ms | tokens/s per GPU | weak-scaling "
        "efficiency | MFU | mem GiB per GPU |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in entries:
        lines.append(
            f"| {e['model']} | {e['tag'] or '–'} | {e['devices']} | {e['mesh']} | "
            f"{e['step_ms']:.1f} | {e['tokens_per_s_per_device']:,.0f} | "
            f"{pct(e['efficiency'])} | {pct(e['mfu'])} | {e['mem_GiB'] or 0:.1f} |"
        )
    return "\n".join(lines)


def main(paths: Sequence[str]) -> int:
    if not paths:
        print("usage: python -m experiments.bench.scaling FILE.jsonl ...", file=sys.stderr)
        return 2
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        print(f"no such file: {', '.join(missing)}; pass the bench.jsonl of a run", file=sys.stderr)
        return 2
    rows = [json.loads(line) for path in paths for line in open(path) if line.strip()]
    print(markdown(weak_scaling(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
