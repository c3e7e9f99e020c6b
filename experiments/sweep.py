"""Hyperparameter sweeps over a grid.

  python -m experiments.sweep --config=experiments/configs/stdlib_tiny.py --root=runs/sweep \\
      --sweep.optim.lr=1e-3,3e-3 --sweep.model.n_layers=2,4 [--config.train.num_steps=200]

runs every point of the grid one after another (each in its own workdir
under --root, resumable), or with --print_only prints one command per point
for a cluster scheduler. Then it writes ROOT/sweep_results.csv, prints a
table of the final metrics, and plots ROOT/sweep.png. If a point failed, the
results go to ROOT/sweep_results.partial.csv and sweep.partial.png instead:
the results of an earlier complete sweep are never replaced by partial ones.
Every file is written under a temporary name and renamed into place.

Exit status: 0 every point finished; 1 some point failed (its own `error:` line is above
the table); 2 bad input, found before any point runs: a flag, the config file, or a sweep
or override field the config lacks or a value of the wrong type.
"""

from __future__ import annotations

import csv
import itertools
import os
import shlex
import subprocess
import sys
from pathlib import Path

from absl import app, flags

from data.cli import BAD_INPUT, fail, parse_flags
from experiments import configs
from train.metrics_writer import read_metrics

flags.DEFINE_string("config", "experiments/configs/stdlib_tiny.py", "experiment config file")
flags.DEFINE_string("root", "runs/sweep", "parent directory of the points' workdirs")
flags.DEFINE_bool("print_only", False, "print one command per point instead of running them")
FLAGS = flags.FLAGS

_SWEEP: dict = {}  # the grid and overrides, parsed before absl sees the flags
FINAL_METRICS = ("train/loss", "eval/loss", "eval/bits_per_byte")


def split_sweep_args(argv: list[str]) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """(--sweep.FIELD=v1,v2 grid, --config.* overrides passed to every point, other args)."""
    grid, overrides, rest = {}, [], []
    for arg in argv:
        if arg.startswith("--sweep."):
            field, _, values = arg[len("--sweep.") :].partition("=")
            if not values:
                raise ValueError(f"{arg}: give values as --sweep.FIELD=v1,v2")
            grid[field] = values.split(",")
        elif arg.startswith("--config."):
            overrides.append(arg)
        else:
            rest.append(arg)
    return grid, overrides, rest


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    fields = list(grid)
    return [dict(zip(fields, values)) for values in itertools.product(*grid.values())]


def point_name(point: dict[str, str]) -> str:
    return "_".join(f"{field.split('.')[-1]}={value}" for field, value in point.items())


def point_command(point: dict[str, str], overrides: list[str], root: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.pretrain",
        f"--config={FLAGS.config}",
        f"--workdir={root / point_name(point)}",
        f"--config.data.dir={root / 'data'}",
        *overrides,
        *(f"--config.{field}={value}" for field, value in point.items()),
    ]


def final_metrics(workdir: Path) -> dict[str, float | None]:
    path = workdir / "metrics.jsonl"
    records = read_metrics(path) if path.exists() else []
    out = {}
    for name in FINAL_METRICS:
        values = [r[name] for r in records if r.get(name) is not None]
        out[name] = values[-1] if values else None
    return out


def _replace_atomically(path: Path, write) -> None:
    """write(temporary path) then rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_results(
    rows: list[dict], grid: dict[str, list[str]], root: Path, complete: bool
) -> tuple[Path, Path]:
    """(csv, png) paths written: sweep_results.csv and sweep.png for a complete sweep,
    else the .partial ones, which leaves an earlier complete sweep's files as they were."""
    suffix = "" if complete else ".partial"
    table, figure = root / f"sweep_results{suffix}.csv", root / f"sweep{suffix}.png"

    def write_table(path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*grid, *FINAL_METRICS])
            writer.writeheader()
            writer.writerows(rows)

    _replace_atomically(table, write_table)
    _replace_atomically(figure, lambda path: plot(rows, grid, path))
    if complete:  # older partial results are superseded
        for stale in (root / "sweep_results.partial.csv", root / "sweep.partial.png"):
            stale.unlink(missing_ok=True)
    return table, figure


def plot(rows: list[dict], grid: dict[str, list[str]], out_path: Path) -> None:
    """Final eval loss against the first swept field, one line per setting of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_field, *other_fields = list(grid)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for others in itertools.product(*(grid[f] for f in other_fields)):
        chosen = [r for r in rows if all(r[f] == v for f, v in zip(other_fields, others))]
        points = [(r[x_field], r["eval/loss"]) for r in chosen if r["eval/loss"] is not None]
        if points:
            label = ", ".join(f"{f}={v}" for f, v in zip(other_fields, others)) or "eval/loss"
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel(x_field)
    ax.set_ylabel("final eval loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, format="png")
    plt.close(fig)


def check_points(config_path: str, grid: dict[str, list[str]], overrides: list[str]) -> None:
    """Raises ValueError naming the first grid value or override the config cannot take, so
    that a typo fails before the first point runs rather than in every point."""
    if not Path(config_path.partition(":")[0]).is_file():
        raise ValueError(
            f"the config file {config_path!r} does not exist; see experiments/configs/"
        )
    try:
        config = configs.load(config_path)
    except Exception as error:  # noqa: BLE001 - the user's config file
        raise ValueError(f"cannot load the config file {config_path!r}: {error}") from error
    pairs = [o[len("--config.") :].partition("=")[::2] for o in overrides]
    pairs += [(field, value) for field, values in grid.items() for value in values]
    for field, value in pairs:
        problem = configs.override_problem(config, field, value)
        if problem:
            raise ValueError(problem)


def main(argv: list[str]) -> None:
    del argv
    grid, overrides = _SWEEP["grid"], _SWEEP["overrides"]
    if not grid:
        fail("nothing to sweep: give at least one --sweep.FIELD=v1,v2", BAD_INPUT)
    try:
        check_points(FLAGS.config, grid, overrides)
    except ValueError as error:
        fail(str(error), BAD_INPUT)
    root = Path(FLAGS.root).absolute()
    points = grid_points(grid)
    if FLAGS.print_only:
        for point in points:
            print(shlex.join(point_command(point, overrides, root)))
        return
    root.mkdir(parents=True, exist_ok=True)
    failed = []
    for i, point in enumerate(points, 1):
        print(f"[{i}/{len(points)}] {point_name(point)}", flush=True)
        if subprocess.run(point_command(point, overrides, root)).returncode != 0:
            failed.append(point_name(point))
    rows = [{**point, **final_metrics(root / point_name(point))} for point in points]
    header = [*grid, *FINAL_METRICS]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        cells = [row[h] if h in grid else _fmt(row[h]) for h in header]
        print("| " + " | ".join(cells) + " |")
    table, figure = write_results(rows, grid, root, complete=not failed)
    print(f"results: {table}, plot: {figure}")
    if failed:
        kept = root / "sweep_results.csv"
        earlier = f"; the earlier {kept} is kept" if kept.exists() else ""
        sys.exit(f"error: {len(failed)} point(s) failed: {', '.join(failed)}{earlier}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _parse(argv: list[str]) -> list[str]:
    try:
        grid, overrides, rest = split_sweep_args(argv[1:])
    except ValueError as error:
        fail(f"{error} (see --help)", BAD_INPUT)
    _SWEEP.update(grid=grid, overrides=overrides)
    return parse_flags(argv[:1] + rest)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
