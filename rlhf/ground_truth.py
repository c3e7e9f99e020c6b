"""Ground truth for the code-writing task, independent of the reward model.

Generated code is only parsed (`ast.parse`), never executed: the checks are
whether it is valid Python and whether it defines the requested function.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

import numpy as np


def parses(code: str) -> bool:
    """Whether the code is non-blank valid Python (a blank answer parses, but answers nothing)."""
    if not code.strip():
        return False
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return False


def defines_function(code: str, name: str) -> bool:
    """Whether the code parses and defines a function (or method) called `name`."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
        for node in ast.walk(tree)
    )


def ground_truth(
    answers: Sequence[str], names: Sequence[str], scores: Sequence[float] | None = None
) -> dict[str, float]:
    """{"parse_rate", "defines_name_rate", "reward_mean" (if scores), "n"}."""
    if len(answers) != len(names):
        raise ValueError(f"{len(answers)} answers but {len(names)} names")
    out = {
        "parse_rate": float(np.mean([parses(a) for a in answers])) if answers else 0.0,
        "defines_name_rate": float(
            np.mean([defines_function(a, n) for a, n in zip(answers, names)])
        )
        if answers
        else 0.0,
        "n": len(answers),
    }
    if scores is not None:
        out["reward_mean"] = float(np.mean(scores))
    return out


def comparison_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table, one row per model (e.g. {"sft": ..., "ppo": ...})."""
    columns = ["parse_rate", "defines_name_rate", "reward_mean", "n"]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, metrics in rows.items():
        cells = [
            f"{metrics[c]:.3f}" if isinstance(metrics.get(c), float) else str(metrics.get(c, ""))
            for c in columns
        ]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
