"""The short report of a pipeline run: WORKDIR/report/report.md (and report.pdf).

    python -m docs.report WORKDIR

`write_report(workdir)` reads every stage's `WORKDIR/STAGE/metrics.jsonl` and the pipeline's
`WORKDIR/report/summary.json`, and writes into `WORKDIR/report/`: `report.md` (the held-out
ground-truth table and checks, each stage's last metrics), one PNG of curves per stage, and
`report.pdf` through the guide's toolchain (pandoc + Typst) when it is installed.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# Curves worth a panel, by the last part of the metric's name, in this order.
_PLOTTED = (
    "loss",
    "accuracy",
    "score_mean",
    "reward_mean",
    "kl",
    "beta",
    "bits_per_byte",
    "margin",
    "response_length",
    "parse_rate",
)
_MAX_PANELS = 4
# The pipeline's stages in their order; others follow alphabetically.
_STAGE_ORDER = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_values(records: list[dict]) -> dict[str, tuple[int, float]]:
    """metric -> (step, value) of its last finite record."""
    out: dict[str, tuple[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                out[key] = (int(record["step"]), float(value))
    return out


def _plotted_keys(records: list[dict]) -> list[str]:
    counts: dict[str, int] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                counts[key] = counts.get(key, 0) + 1
    keys = [k for k, n in counts.items() if n >= 2]
    chosen = []
    for name in _PLOTTED:
        chosen += [k for k in keys if k.split("/")[-1] == name and k not in chosen]
    return chosen[:_MAX_PANELS]


def _plot_stage(stage: str, records: list[dict], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _plotted_keys(records)
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        ax.plot(*zip(*rows), "o-" if len(rows) < 30 else "-", ms=2.5, lw=1.1)
        ax.set_title(key, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6.5)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"{stage}.png"
    fig.savefig(path, dpi=140)
    plt.close(fig)
    return path


def _format(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"


def ground_truth_by_metric(table: dict[str, dict]) -> str:
    """The ground truth with a row per metric and a column per policy (a page holds four
    policies side by side, not ten metrics); 95% intervals in brackets where recorded."""
    models = [m for m in _STAGE_ORDER if m in table] + sorted(set(table) - set(_STAGE_ORDER))
    metrics = sorted(
        {k for t in table.values() for k, v in t.items() if isinstance(v, int | float)},
        key=lambda k: (k == "n", k),
    )
    lines = ["| metric | " + " | ".join(models) + " |", "| :--- |" + " ---: |" * len(models)]
    for metric in metrics:
        cells = []
        for model in models:
            value, interval = table[model].get(metric), table[model].get(f"{metric}_ci95")
            if not isinstance(value, int | float):
                cells.append("")
            elif interval:
                cells.append(f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]")
            else:
                cells.append(f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append(f"| `{metric}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(
    workdir: Path, stages: dict[str, list[dict]], summary: dict | None, plots: dict[str, Path]
) -> str:
    """The report's Markdown (image paths relative to WORKDIR/report)."""
    lines = [f"# Run report: `{workdir.name}`", "", f"Workdir: `{workdir}`.", ""]
    if summary is None:
        lines += ["No `report/summary.json` in this workdir: the pipeline did not finish.", ""]
    else:
        lines += ["## Held-out ground truth", ""]
        if summary.get("ground_truth"):
            lines += [ground_truth_by_metric(summary["ground_truth"]), ""]
        elif summary.get("ground_truth_markdown"):
            lines += [summary["ground_truth_markdown"].strip(), ""]
        for name, value in summary.get("checks", {}).items():
            lines.append(f"- `{name}`: {value}")
        lines.append("")
    for stage, records in stages.items():
        lines += [f"## Stage `{stage}`", ""]
        values = last_values(records)
        if values:
            lines += ["| metric | last value | at step |", "| :--- | ---: | ---: |"]
            lines += [f"| `{k}` | {_format(v)} | {s} |" for k, (s, v) in sorted(values.items())]
            lines.append("")
        if stage in plots:
            lines += [f"![{stage}: curves from `{stage}/metrics.jsonl`]({plots[stage].name})", ""]
    return "\n".join(lines)


def write_report(workdir: str | Path) -> Path:
    """Writes WORKDIR/report/report.md (+ PNGs, + report.pdf when the toolchain is there);
    returns the Markdown file's path."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"run workdir {workdir} does not exist")
    paths = sorted(
        workdir.glob("*/metrics.jsonl"),
        key=lambda p: (
            (_STAGE_ORDER.index(p.parent.name), "")
            if p.parent.name in _STAGE_ORDER
            else (len(_STAGE_ORDER), p.parent.name)
        ),
    )
    stages = {path.parent.name: read_metrics(path) for path in paths}
    summary_file = workdir / "report" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    if not stages and summary is None:
        raise FileNotFoundError(
            f"{workdir} holds no STAGE/metrics.jsonl and no report/summary.json: not a run workdir"
        )
    out = workdir / "report"
    out.mkdir(exist_ok=True)
    plots = {s: p for s, r in stages.items() if (p := _plot_stage(s, r, out)) is not None}
    markdown = render_markdown(workdir, stages, summary, plots)
    md_path = out / "report.md"
    md_path.write_text(markdown + "\n", encoding="utf-8")

    from docs import build

    if build.toolchain_missing() is None:
        # Wide tables (the ground truth has a column per check) need widths by content.
        build.markdown_to_pdf(
            build.rewidth_tables(markdown),
            out / "report.pdf",
            root=out,
            variables={"report": "true"},
        )
    return md_path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        print(f"usage: python -m docs.report WORKDIR\n\n{__doc__}")
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m docs.report WORKDIR (a pipeline directory)", file=sys.stderr)
        return 2
    try:
        print(write_report(args[0]))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
