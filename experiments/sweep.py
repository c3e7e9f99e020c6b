"""Hyperparameter sweeps over a grid.

  python -m experiments.sweep --config=experiments/configs/stdlib_tiny.py --root=runs/sweep \\
      --sweep.optim.lr=1e-3,3e-3 --sweep.model.n_layers=2,4 [--config.train.num_steps=200]

runs every point of the grid one after another (each in its own workdir
under --root, resumable), or with --print_only prints one command per point
for a cluster scheduler. Then it writes ROOT/sweep_results.csv, prints a
table of each point's status ("done", "failed: ERROR", "stopped", "not run")
and final metrics (blank unless done), and plots ROOT/sweep.png. Unless
every point is done, the results go to ROOT/sweep_results.partial.csv and
sweep.partial.png instead: the results of an earlier complete sweep are
never replaced by partial ones. Every file is written under a temporary
name and renamed into place.

The points share the prepared data in ROOT/data; where swept values change
the config's data section (`--sweep.data.vocab_size=...`), each distinct data
section gets its own folder, ROOT/data_FIELD=VALUE..., shared by the points
that have it.

SIGTERM or SIGINT (Ctrl-C) goes on to the point running, which saves a
checkpoint and stops; the sweep starts no further point, writes the partial
table and ends with 4: the same command resumes it (finished points return at
once, the stopped one resumes from its checkpoint).

Exit status: 0 every point finished; 1 some point failed (its own `error:` line is above
the table); 2 bad input, found before any point runs: a flag, the config file, or a sweep
or override field the config lacks or a value of the wrong type; 4 stopped by a signal.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from data.cli import fail, parse_flags
from experiments import cli, configs
from train import loop
from train.loop import Interrupted
from train.metrics_writer import read_metrics

flags.DEFINE_string("config", "experiments/configs/stdlib_tiny.py", "experiment config file")
flags.DEFINE_string("root", "runs/sweep", "parent directory of the points' workdirs")
flags.DEFINE_bool("print_only", False, "print one command per point instead of running them")
FLAGS = flags.FLAGS

_SWEEP: dict = {}  # the grid and overrides, parsed before absl sees the flags
FINAL_METRICS = ("train/loss", "eval/loss", "eval/bits_per_byte")
DONE, STOPPED, NOT_RUN = "done", "stopped", "not run"


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


def point_args(point: dict[str, str], overrides: list[str]) -> list[str]:
    """The point's --config.* arguments: every point's overrides, then its grid values."""
    return [*overrides, *(f"--config.{field}={value}" for field, value in point.items())]


def point_command(
    point: dict[str, str], overrides: list[str], root: Path, data_dir: Path
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.pretrain",
        f"--config={FLAGS.config}",
        f"--workdir={root / point_name(point)}",
        f"--config.data.dir={data_dir}",  # before the user's: a --config.data.dir of theirs wins
        *point_args(point, overrides),
    ]


def data_dirs(point_configs: list[ConfigDict], root: Path) -> list[Path]:
    """Each point's prepared-data folder: ROOT/data when the points' data sections are the
    same, else one folder per distinct data section (the points with the same share it),
    named by the data fields that differ."""
    sections = [{k: v for k, v in c.data.to_dict().items() if k != "dir"} for c in point_configs]
    differing = [k for k in sections[0] if len({repr(s.get(k)) for s in sections}) > 1]
    if not differing:
        return [root / "data"] * len(sections)
    return [
        root / ("data_" + "_".join(f"{k}={quote(str(s[k]), safe='')}" for k in differing))
        for s in sections
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
            writer = csv.DictWriter(f, fieldnames=[*grid, "status", *FINAL_METRICS])
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


def check_points(
    config_path: str, grid: dict[str, list[str]], overrides: list[str]
) -> list[ConfigDict]:
    """Each point's config, as its run will read it; raises ValueError naming the first grid
    value or override the config cannot take, so that a typo fails before the first point
    runs rather than in every point."""
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
    # The overrides applied as the run applies them: this also checks the fields that
    # override_problem cannot (an unset placeholder's type, say).
    return [_point_config(config_path, point, overrides) for point in grid_points(grid)]


def _point_config(config_path: str, point: dict[str, str], overrides: list[str]) -> ConfigDict:
    values = flags.FlagValues()
    argv = ["sweep", f"--config={config_path}", *point_args(point, overrides)]
    config_flags.DEFINE_config_file("config", config_path, flag_values=values, sys_argv=argv)
    try:
        values(argv)
    except flags.Error as error:
        raise ValueError(
            f"{error} (point {point_name(point)}): give the field a value of its type"
        ) from error
    return values.config


class PointSignals(loop.StopSignals):
    """The loop's SIGTERM/SIGINT handling, for the sweep: a signal goes on to the point
    running (a process group of its own, so that Ctrl-C reaches it once, from here), which
    saves and stops; the sweep starts no further point."""

    def __init__(self):
        self.point: subprocess.Popen | None = None
        super().__init__()

    def _handle(self, signum, frame):
        if self.point is not None and self.point.poll() is None:
            self.point.send_signal(signum)
            self.received = self.received or signal.Signals(signum).name
        else:
            super()._handle(signum, frame)


def run_point(command: list[str], signals: PointSignals) -> str:
    """Runs one point (its stderr passed on); its status: "done" or "failed: ITS ERROR".
    Raises Interrupted if it stopped on a signal after saving (exit status 4)."""
    # a session of its own (Python 3.10 has no process_group=): Ctrl-C reaches it from here
    point = subprocess.Popen(command, stderr=subprocess.PIPE, start_new_session=True)
    signals.point = point
    decode, tail = codecs.getincrementaldecoder("utf-8")(errors="replace").decode, ""
    try:
        while chunk := point.stderr.read1(1 << 16):
            text = decode(chunk)
            sys.stderr.write(text)
            sys.stderr.flush()
            tail = (tail + text)[-4000:]
        status = point.wait()
    finally:
        signals.point = None
    errors = [line for line in tail.splitlines() if line.startswith("error: ")]
    message = errors[-1][len("error: ") :] if errors else f"exit status {status}"
    if status == cli.EXIT_INTERRUPTED:
        raise Interrupted(message)
    return DONE if status == 0 else f"failed: {message}"


def sweep(config_path: str, grid: dict[str, list[str]], overrides: list[str], root: Path) -> None:
    if not grid:
        raise ValueError("nothing to sweep: give at least one --sweep.FIELD=v1,v2")
    point_configs = check_points(config_path, grid, overrides)
    points = grid_points(grid)
    commands = [
        point_command(point, overrides, root, data_dir)
        for point, data_dir in zip(points, data_dirs(point_configs, root))
    ]
    if FLAGS.print_only:
        for command in commands:
            print(shlex.join(command))
        return
    root.mkdir(parents=True, exist_ok=True)
    rows = [{**point, "status": NOT_RUN, **dict.fromkeys(FINAL_METRICS)} for point in points]
    stopped = _run_points(points, commands, rows, root)
    _print_table(rows, grid)
    table, figure = write_results(rows, grid, root, complete=all(r["status"] == DONE for r in rows))
    print(f"results: {table}, plot: {figure}")
    if stopped:
        later = sum(r["status"] == NOT_RUN for r in rows)
        raise Interrupted(
            f"the sweep {stopped}; {later} point(s) not started: run the same command to resume"
        )
    failed = [point_name(p) for p, r in zip(points, rows) if r["status"] != DONE]
    if failed:
        kept = root / "sweep_results.csv"
        earlier = f"; the earlier {kept} is kept" if kept.exists() else ""
        sys.exit(f"error: {len(failed)} point(s) failed: {', '.join(failed)}{earlier}")


def _run_points(
    points: list[dict], commands: list[list[str]], rows: list[dict], root: Path
) -> str | None:
    """Runs the points in turn, filling in their rows; None, or what stopped the sweep."""
    signals = PointSignals()
    try:
        for i, (point, command, row) in enumerate(zip(points, commands, rows), 1):
            name = point_name(point)
            if signals.received:
                return f"was stopped by {signals.received} before {name}"
            print(f"[{i}/{len(points)}] {name}", flush=True)
            try:
                row["status"] = run_point(command, signals)
            except Interrupted:
                row["status"] = STOPPED
            if row["status"] == DONE:
                row.update(final_metrics(root / name))
            elif signals.received:
                row["status"] = STOPPED  # however it ended (a second Ctrl-C ends it at once)
            if row["status"] == STOPPED:
                return f"stopped at {name} (its checkpoints are kept)"
            if signals.received:
                return f"was stopped by {signals.received} after {name} finished"
        return None
    finally:
        signals.restore()


def _print_table(rows: list[dict], grid: dict[str, list[str]]) -> None:
    header = [*grid, "status", *FINAL_METRICS]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        cells = [_fmt(row[h]) if h in FINAL_METRICS else row[h] for h in header]
        print("| " + " | ".join(cells) + " |")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv: list[str]) -> None:
    """Runs the sweep; an error a user can act on ends with its one line and status."""
    del argv
    root = Path(FLAGS.root).absolute()
    cli.run_mapped(lambda: sweep(FLAGS.config, _SWEEP["grid"], _SWEEP["overrides"], root))


def _parse(argv: list[str]) -> list[str]:
    try:
        grid, overrides, rest = split_sweep_args(argv[1:])
    except ValueError as error:
        fail(f"{error} (see --help)", cli.EXIT_BAD_INPUT)
    _SWEEP.update(grid=grid, overrides=overrides)
    return parse_flags(argv[:1] + rest)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
