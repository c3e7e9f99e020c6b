"""A sweep with a failed point never replaces an earlier complete sweep's results."""

from __future__ import annotations

import csv
import types

import pytest
from absl.testing import flagsaver

from experiments import sweep


def _sweep(root, monkeypatch, returncode: int) -> None:
    """Runs the sweep command's main over a 2-point grid whose points exit `returncode`
    (no training: the point commands are not started)."""
    monkeypatch.setattr(
        sweep.subprocess, "run", lambda command: types.SimpleNamespace(returncode=returncode)
    )
    with flagsaver.flagsaver():
        sweep._parse(["sweep", f"--root={root}", "--sweep.optim.lr=0.1,0.2"])
        sweep.main([])


def test_a_failed_sweep_keeps_the_previous_results(tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    _sweep(root, monkeypatch, returncode=0)
    complete = {p.name: p.read_bytes() for p in root.iterdir()}
    assert set(complete) == {"sweep_results.csv", "sweep.png"}
    with open(root / "sweep_results.csv") as f:
        assert [r["optim.lr"] for r in csv.DictReader(f)] == ["0.1", "0.2"]

    with pytest.raises(SystemExit, match="2 point.*failed.*earlier .*sweep_results.csv is kept"):
        _sweep(root, monkeypatch, returncode=1)
    for name, content in complete.items():
        assert (root / name).read_bytes() == content
    assert (root / "sweep_results.partial.csv").exists() and (root / "sweep.partial.png").exists()
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]

    _sweep(root, monkeypatch, returncode=0)  # complete again: the partial files are superseded
    assert {p.name for p in root.iterdir()} == {"sweep_results.csv", "sweep.png"}
