"""Ground truth for the code-writing task, independent of the reward model.

Generated code is only parsed (`ast.parse`), never executed: the checks are
whether it is valid Python and whether it defines the requested function, and,
given the held-out references, every component of `rlhf.verifier`. Each rate
comes with its 95% confidence interval (Wilson score interval), so that two
models can be told apart or not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rlhf import verifier

Z95 = 1.959964  # standard normal quantile for a two-sided 95% interval
# rate key in ground_truth's output -> verifier component
VERIFIER_RATES = {
    "signature_rate": "signature",
    "no_undefined_names_rate": "no_undefined_names",
    "nontrivial_rate": "nontrivial",
}


def parses(code: str) -> bool:
    """Whether the code is non-blank valid Python (a blank answer parses, but answers nothing)."""
    return verifier.parse(code) is not None


def defines_function(code: str, name: str) -> bool:
    """Whether the code parses and defines a function (or method) called `name`."""
    return verifier.find_function(verifier.parse(code), name) is not None


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (Wilson 1927); (0, 1) when n == 0.
    Unlike the normal approximation it stays inside [0, 1] and is sound at 0 and n."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if successes <= 0 else max(0.0, center - half)  # exact ends, no rounding residue
    high = 1.0 if successes >= n else min(1.0, center + half)
    return low, high


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Normal-approximation interval of a mean: mean +- z * sample std / sqrt(n)."""
    n = len(values)
    if n < 2:
        return (float(values[0]),) * 2 if n else (0.0, 0.0)
    mean = float(np.mean(values))
    half = z * float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean - half, mean + half


def _add_rate(out: dict, key: str, flags: Sequence[float]) -> None:
    out[key] = float(np.mean(flags)) if len(flags) else 0.0
    out[f"{key}_ci95"] = list(wilson_interval(float(np.sum(flags)), len(flags)))


def _add_mean(out: dict, key: str, values: Sequence[float]) -> None:
    out[key] = float(np.mean(values)) if len(values) else 0.0
    out[f"{key}_ci95"] = list(mean_interval(values))


def ground_truth(
    answers: Sequence[str],
    names: Sequence[str],
    scores: Sequence[float] | None = None,
    references: Sequence[verifier.Reference] | None = None,
    weights: verifier.RewardWeights = verifier.RewardWeights(),
    stopped: Sequence[bool] | None = None,
) -> dict:
    """{"parse_rate", "defines_name_rate", "reward_mean" (if scores), "n"}, each rate and
    mean with a "<key>_ci95" [low, high]; with `references`, also the verifier's
    signature, no-undefined-names and non-trivial rates, the mean similarity to the
    reference body and the mean verifiable reward; with `stopped` (whether each answer
    ended with its stop token rather than at the length limit), "stopped_rate": an answer
    cut off by the limit rarely parses, so this tells a model that loops from one that
    writes wrong code."""
    if len(answers) != len(names):
        raise ValueError(f"{len(answers)} answers but {len(names)} names")
    if references is not None and len(references) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    out: dict = {}
    _add_rate(out, "parse_rate", [parses(a) for a in answers])
    _add_rate(out, "defines_name_rate", [defines_function(a, n) for a, n in zip(answers, names)])
    if references is not None:
        checks = [verifier.check_answer(a, r) for a, r in zip(answers, references)]
        for key, component in VERIFIER_RATES.items():
            _add_rate(out, key, [c[component] for c in checks])
        _add_mean(out, "similarity_mean", [c["similarity"] for c in checks])
        rewards = [verifier.reward_from_checks(c, weights) for c in checks]
        _add_mean(out, "verifiable_reward_mean", rewards)
    if stopped is not None:
        _add_rate(out, "stopped_rate", [bool(x) for x in stopped])
    out["n"] = len(answers)
    if scores is not None:
        _add_mean(out, "reward_mean", [float(s) for s in scores])
    return out


COLUMNS = (
    "parse_rate",
    "defines_name_rate",
    *VERIFIER_RATES,
    "similarity_mean",
    "verifiable_reward_mean",
    "stopped_rate",
    "reward_mean",
    "n",
)


def _cell(metrics: dict, column: str) -> str:
    value = metrics.get(column)
    if not isinstance(value, float):
        return "" if value is None else str(value)
    interval = metrics.get(f"{column}_ci95")
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def comparison_table(rows: dict[str, dict]) -> str:
    """Markdown table, one row per model (e.g. {"sft": ..., "ppo": ...}), each rate shown
    with its 95% interval; columns no row has are left out."""
    columns = [c for c in COLUMNS if any(c in metrics for metrics in rows.values())]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, metrics in rows.items():
        lines.append(f"| {model} | " + " | ".join(_cell(metrics, c) for c in columns) + " |")
    return "\n".join(lines)
