"""A sweep's table: each point's status, metrics only for the points done, a stopped point
stopping the sweep; an earlier complete sweep's results are never replaced by partial ones.
No training here: the function that runs one point is replaced."""

from __future__ import annotations

import csv
import json

import pytest
from absl.testing import flagsaver

from experiments import cli, sweep
from train.loop import Interrupted

TWO_POINTS = ["--sweep.optim.lr=0.1,0.2"]


def _sweep(root, monkeypatch, run_point, *args: str, commands=None) -> list[list[str]]:
    """Runs the sweep command's main with `run_point(command)` for each point; the commands
    (appended to `commands` as they run, if given)."""
    commands = [] if commands is None else commands

    def fake(command, signals):
        commands.append(command)
        return run_point(command)

    monkeypatch.setattr(sweep, "run_point", fake)
    with flagsaver.flagsaver():
        sweep._parse(["sweep", f"--root={root}", *(args or TWO_POINTS)])
        sweep.main([])
    return commands


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _workdir(command: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in command if a.startswith("--workdir="))


def _data_dir(command: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in command if a.startswith("--config.data.dir="))


def test_a_failed_sweep_keeps_the_previous_results(tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    _sweep(root, monkeypatch, lambda command: "done")
    complete = {p.name: p.read_bytes() for p in root.iterdir()}
    assert set(complete) == {"sweep_results.csv", "sweep.png"}
    rows = _rows(root / "sweep_results.csv")
    assert [(r["optim.lr"], r["status"]) for r in rows] == [("0.1", "done"), ("0.2", "done")]

    with pytest.raises(SystemExit, match="2 point.*failed.*earlier .*sweep_results.csv is kept"):
        _sweep(root, monkeypatch, lambda command: "failed: boom")
    for name, content in complete.items():
        assert (root / name).read_bytes() == content
    assert (root / "sweep_results.partial.csv").exists() and (root / "sweep.partial.png").exists()
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]

    _sweep(root, monkeypatch, lambda command: "done")  # complete: the partial files go
    assert {p.name for p in root.iterdir()} == {"sweep_results.csv", "sweep.png"}


def test_a_failed_point_shows_no_metrics_of_an_earlier_run(tmp_path, monkeypatch):
    """The metrics.jsonl an earlier run left in a failed point's workdir is not its result."""
    root = tmp_path / "sweep"
    for lr, loss in (("0.1", 1.5), ("0.2", 2.5)):
        (root / f"lr={lr}").mkdir(parents=True)
        record = {"step": 3, "train/loss": loss, "eval/loss": loss, "eval/bits_per_byte": 1.0}
        (root / f"lr={lr}" / "metrics.jsonl").write_text(json.dumps(record) + "\n")

    def run_point(command):
        return "done" if _workdir(command).endswith("0.1") else "failed: bad luck"

    with pytest.raises(SystemExit, match="1 point.*failed: lr=0.2"):
        _sweep(root, monkeypatch, run_point)
    done, failed = _rows(root / "sweep_results.partial.csv")
    assert (done["status"], done["eval/loss"]) == ("done", "1.5")
    assert failed["status"] == "failed: bad luck"
    assert [failed[m] for m in sweep.FINAL_METRICS] == ["", "", ""]


def test_a_stopped_point_stops_the_sweep_and_the_same_command_resumes(
    tmp_path, monkeypatch, capsys
):
    root = tmp_path / "sweep"
    three = ["--sweep.optim.lr=0.1,0.2,0.3"]

    def stop_at_the_second(command):
        if _workdir(command).endswith("0.2"):
            raise Interrupted("pretrain stopped by SIGTERM after step 2")
        return "done"

    first = []
    with pytest.raises(SystemExit) as stopped:
        _sweep(root, monkeypatch, stop_at_the_second, *three, commands=first)
    assert stopped.value.code == cli.EXIT_INTERRUPTED
    assert [_workdir(c)[-3:] for c in first] == ["0.1", "0.2"]  # the third never started
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: the sweep stopped at lr=0.2")
    assert "1 point(s) not started: run the same command to resume" in error[0]
    rows = _rows(root / "sweep_results.partial.csv")
    assert [r["status"] for r in rows] == ["done", "stopped", "not run"]
    assert [r["eval/loss"] for r in rows] == ["", "", ""]
    assert not (root / "sweep_results.csv").exists()

    again = _sweep(root, monkeypatch, lambda command: "done", *three)  # the same command
    assert again[:2] == first  # each point resumes in its own workdir
    assert [r["status"] for r in _rows(root / "sweep_results.csv")] == ["done"] * 3
    assert not (root / "sweep_results.partial.csv").exists()


def test_each_data_section_gets_its_own_prepared_data(tmp_path, monkeypatch):
    """Swept data fields: one folder per distinct data section, shared by the points with
    the same; without them, ROOT/data as before."""
    root = tmp_path / "sweep"
    grid = ["--sweep.data.vocab_size=128,200", "--sweep.optim.lr=0.1,0.2"]
    commands = _sweep(root, monkeypatch, lambda command: "done", *grid)
    dirs = [_data_dir(c) for c in commands]
    assert dirs[0] == dirs[1] != dirs[2] == dirs[3]
    assert dirs[0] == str(root / "data_vocab_size=128")
    assert dirs[2] == str(root / "data_vocab_size=200")

    commands = _sweep(tmp_path / "other", monkeypatch, lambda command: "done")
    assert {_data_dir(c) for c in commands} == {str(tmp_path / "other" / "data")}


@pytest.mark.parametrize(
    "args, fragment",
    [
        # a placeholder field (unset: None) has a type that override_problem cannot see
        (["--sweep.model.n_kv_heads=2,four"], "--config.model.n_kv_heads=four"),
        (["--sweep.optim.lr=0.1", "--config.model.d_head=wide"], "--config.model.d_head=wide"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_before_any_point_runs(
    tmp_path, monkeypatch, capsys, args, fragment
):
    root = tmp_path / "sweep"
    with pytest.raises(SystemExit) as refused:
        _sweep(root, monkeypatch, lambda command: pytest.fail("a point ran"), *args)
    assert refused.value.code == cli.EXIT_BAD_INPUT
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and fragment in error[0]
    assert not root.exists()
