"""The guide's figures regenerate from a real pretraining run (docs/figures.py), and a run
that lacks an input changes none of the committed files."""

from __future__ import annotations

import json
import shutil

import pytest

from docs import figures, plotting

PRETRAIN_OUTPUTS = {
    "pretrain_loss.png",
    "pretrain_table.md",
    "curation.png",
    "curation_table.md",
    "packed_mask.png",
    "attention_patterns.png",
    "tokenizer_table.md",
}


@pytest.fixture
def figures_dir(tmp_path, monkeypatch):
    folder = tmp_path / "figures"
    folder.mkdir()
    monkeypatch.setattr(figures, "FIGURES", folder)
    return folder


def test_every_pretraining_figure_comes_from_the_run(trained_run, figures_dir):
    provenance = figures.generate(trained_run.workdir, None)
    assert PRETRAIN_OUTPUTS <= set(provenance) <= {p.name for p in figures_dir.iterdir()}
    for name in PRETRAIN_OUTPUTS:
        assert provenance[name]["source"] == f"pretraining workdir {trained_run.workdir}"
        assert (figures_dir / name).stat().st_size > 100
    table = (figures_dir / "pretrain_table.md").read_text()
    last_eval = [r for r in plotting.read_jsonl(trained_run.workdir / "metrics.jsonl")
                 if "eval/loss" in r][-1]  # fmt: skip
    assert f"eval loss at step {last_eval['step']} | {last_eval['eval/loss']:.3f}" in table
    assert json.loads((figures_dir / "provenance.json").read_text()) == provenance
    assert not [p for p in figures_dir.iterdir() if p.name.startswith(".staging")]


def test_a_failed_generator_changes_no_committed_file(trained_run, figures_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.workdir, run)
    shutil.rmtree(run / "checkpoints")  # the attention patterns need the trained model
    (figures_dir / "pretrain_loss.png").write_bytes(b"the committed one")
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        figures.generate(run, None)
    assert [p.name for p in figures_dir.iterdir()] == ["pretrain_loss.png"]
    assert (figures_dir / "pretrain_loss.png").read_bytes() == b"the committed one"
