"""Where metrics go: WORKDIR/metrics.jsonl, TensorBoard event files, a loss-curve PNG.

Only process 0 writes; on other processes every method is a no-op.
TensorBoard files are written by tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax


class MetricsWriter:
    """Appends to WORKDIR/metrics.jsonl. A run resumed from step `resume_step` passes it:
    the records of later steps are dropped first, since the run logs those steps again."""

    def __init__(
        self, workdir: str | Path, enabled: bool | None = None, resume_step: int | None = None
    ):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        if self.enabled:
            if resume_step is not None:
                _drop_after(self.workdir / "metrics.jsonl", resume_step)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            self._jsonl = open(self.workdir / "metrics.jsonl", "a")  # noqa: SIM115

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _json_number(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in metrics.items():
            self._tb.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _drop_after(path: Path, step: int) -> None:
    """Keeps the records of steps <= `step`, and drops a line cut short by a crash
    (atomically: a crash now leaves the old file or the new one)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _step_of(line) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # not a record: dropped


def _json_number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN


def read_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl records in step order (a resumed run's writer has already dropped the
    records of the steps it logs again)."""
    lines = Path(path).read_text().splitlines()
    return sorted((json.loads(line) for line in lines if line.strip()), key=lambda r: r["step"])


def best_eval_step(metrics_path: str | Path, steps: list[int]) -> int | None:
    """The step among `steps` (the checkpoints kept) with the lowest logged eval loss, or
    None when none of them was evaluated."""
    path = Path(metrics_path)
    if not path.exists():
        return None
    kept = set(steps)
    losses = {
        r["step"]: r["eval/loss"]
        for r in read_metrics(path)
        if r.get("eval/loss") is not None and r["step"] in kept
    }
    return min(losses, key=losses.__getitem__) if losses else None


def keep_history(workdir: Path) -> Path | None:
    """Moves an earlier metrics.jsonl aside (metrics.before-TIME.jsonl) when a run starts
    from scratch in a workdir that has one, so no history is lost; returns where it went."""
    path = Path(workdir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists() or not path.read_text().strip():
        return None
    import time

    target = path.with_name(f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    os.replace(path, target)
    return target


def plot_loss_curves(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """train/loss and eval/loss against step, as a PNG; None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    series = {
        name: [(r["step"], r[name]) for r in records if r.get(name) is not None]
        for name in ("train/loss", "eval/loss")
    }
    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in series.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, marker="o" if name == "eval/loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
