"""Post-training evaluation files never reach pretraining: one split rule, used twice."""

from pathlib import Path

import pytest

from data.sources import CorpusError, iter_documents, parse_spec, stdlib_root
from experiments.configs import posttrain_tiny
from rlhf import stdlib_tasks
from rlhf.datasets import check_held_out


def test_holdout_spec_round_trips_and_rejects_bad_fractions():
    spec = parse_spec("stdlib:holdout=0.1")
    assert (spec.kind, spec.holdout, str(spec)) == ("stdlib", 0.1, "stdlib:holdout=0.1")
    assert str(parse_spec("stdlib")) == "stdlib"
    for bad in ("stdlib:holdout=1.5", "stdlib:holdout=x", "stdlib:other"):
        with pytest.raises(CorpusError, match="stdlib"):
            parse_spec(bad)


def test_pretraining_corpus_excludes_exactly_the_eval_files():
    root = stdlib_root()
    relative = lambda doc: str(Path(doc.name).relative_to(root))  # noqa: E731
    everything = {relative(d) for d in iter_documents("stdlib")}
    kept = {relative(d) for d in iter_documents("stdlib:holdout=0.1")}
    held_out = everything - kept
    assert kept and held_out and kept < everything
    assert 0.05 < len(held_out) / len(everything) < 0.15
    # Every file the post-training evaluation mines from is among the held-out ones.
    eval_files = {
        str(p.relative_to(root))
        for p in stdlib_tasks.stdlib_files()
        if stdlib_tasks.split_of(str(p.relative_to(root)), 0.1) == "eval"
    }
    assert eval_files and eval_files <= held_out


def test_pipeline_refuses_a_pretraining_corpus_with_eval_files():
    config = posttrain_tiny.get_config()
    check_held_out(config)  # the default holds the eval files out
    config.pretrain.data.corpus = "stdlib"
    with pytest.raises(ValueError, match="stdlib:holdout=0.1"):
        check_held_out(config)
