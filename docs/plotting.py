"""What the figure generators share: matplotlib off-screen at the guide's size, the metrics
readers, and where a figure is written (docs/figures/, or generate()'s staging folder)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from docs.build import FIGURES  # noqa: E402

DPI = 160
plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "figure.dpi": DPI})


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the stage that writes it first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    if not rows:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*rows)
    return np.asarray(steps), np.asarray(values, dtype=float)


staging: list[Path] = []  # where generate() has the generators write, until all succeed


def output(name: str) -> Path:
    return (staging[-1] if staging else FIGURES) / name


def save(fig: plt.Figure, name: str) -> Path:
    path = output(name)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path
