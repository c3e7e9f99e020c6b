"""prepare(): end to end, split disjointness, reuse, bad input, TFDS loading with mock data."""

import json
import os
import random

import pytest
import tensorflow_datasets as tfds

from data import store
from data.prepare import ensure_prepared, main, prepare
from data.sources import CorpusError, iter_documents
from data.tokenizer import load_tokenizer

WORDS = (
    "the of and to in that with have be harbour town sailor coast people built ships sheds "
    "traded fish salt inland farms winter storms hard boats behind great stone wall children "
    "learned mend nets before could read sky railway came changed market water stayed same "
    "visitors still walk along quay see eat inns story history lighthouse chapel museum garden "
    "mill bridge school festival square morning evening river mountain forest village road"
).split()


def write_corpus(root, n=12):
    """Seeded random English-like prose: passes the quality rules, no duplicates."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = random.Random(i)
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."
            for _ in range(rng.randint(20, 40))
        ]
        (root / f"doc{i:02d}.txt").write_text(" ".join(sentences) + "\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "texts")


def test_prepare_end_to_end(tmp_path, corpus):
    (corpus / "junk.bin").write_bytes(b"\x00\x01binary")
    try:
        meta = prepare(
            f"text:{corpus}",
            tmp_path / "out",
            vocab_size=400,
            val_fraction=0.3,
            num_workers=1,
            progress=False,
        )
    finally:
        (corpus / "junk.bin").unlink()
    out = tmp_path / "out"
    report = json.loads((out / "curation_report.json").read_text())
    for key in ("input", "kept", "dropped"):
        assert {"docs", "bytes"} <= set(report[key])
    assert report["kept"]["docs"] + report["dropped"]["docs"] == report["input"]["docs"]
    assert report["kept"]["bytes"] + report["dropped"]["bytes"] == report["input"]["bytes"]
    assert report["dropped"]["by_reason"]["binary"]["docs"] == 1
    assert (out / "tokenizer.model").exists() and meta["complete"]
    # the curated text is a TFDS array_record dataset; no document is in both splits
    texts = {
        s: [r["text"] for r in store.read_text_dataset(out / "text", s)] for s in ("train", "val")
    }
    assert texts["train"] and texts["val"] and not set(texts["train"]) & set(texts["val"])
    assert len(texts["train"]) + len(texts["val"]) == report["kept"]["docs"]
    assert meta["splits"]["val"]["docs"] == len(texts["val"])
    assert meta["tokenizer"]["heldout_bytes_per_token"] > 1


def test_same_input_same_output(tmp_path, corpus):
    for name in ("a", "b"):
        prepare(f"text:{corpus}", tmp_path / name, vocab_size=400, num_workers=1, progress=False)
    for rel in ("train/tokens.bin", "val/tokens.bin", "curation_report.json"):
        a, b = (tmp_path / "a" / rel).read_bytes(), (tmp_path / "b" / rel).read_bytes()
        if rel.endswith(".json"):  # timings differ
            a, b = ({k: v for k, v in json.loads(x).items() if k != "throughput"} for x in (a, b))
        assert a == b
    # the .model files differ only in the temporary paths recorded in their trainer spec
    pieces = [
        [t.sp.id_to_piece(i) for i in range(t.vocab_size)]
        for t in (load_tokenizer(tmp_path / n / "tokenizer.model") for n in ("a", "b"))
    ]
    assert pieces[0] == pieces[1]


def test_ensure_prepared_reuses_and_refuses(tmp_path, corpus):
    out = tmp_path / "out"
    ensure_prepared(f"text:{corpus}", out, vocab_size=400, num_workers=1, progress=False)
    stamp = os.stat(out / "meta.json").st_mtime_ns
    ensure_prepared(f"text:{corpus}", out, vocab_size=400, num_workers=1, progress=False)
    assert os.stat(out / "meta.json").st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(ValueError, match="was prepared from corpus"):
        ensure_prepared("stdlib", out, vocab_size=400)
    with pytest.raises(ValueError, match="vocab_size"):
        ensure_prepared(f"text:{corpus}", out, vocab_size=600)


def _snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_failures_name_the_file_and_keep_earlier_output(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    prepare(f"text:{corpus}", out, vocab_size=400, num_workers=1, progress=False)
    before = _snapshot(out)
    missing = tmp_path / "missing.txt"
    with pytest.raises(CorpusError, match=str(missing)):
        prepare(f"text:{missing}", out, num_workers=1, progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_bytes(b"")
    (bad / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (bad / "short.txt").write_text("too short")
    with pytest.raises(CorpusError, match=rf"text:{bad}.*left after curation"):
        prepare(f"text:{bad}", out, num_workers=1, progress=False)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": 1}\nnot json\n')
    assert main([f"--corpus=jsonl:{jsonl}:text", f"--out={out}"]) == 2
    assert "left after curation" in capsys.readouterr().err
    assert _snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, corpus):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(CorpusError, match="refusing to overwrite"):
        prepare(f"text:{corpus}", foreign, num_workers=1, progress=False)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_tfds_source_with_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=7):
        docs = list(iter_documents("tfds:lm1b", tfds_data_dir=str(tmp_path)))
        assert len(docs) == 7
        assert all(d.text and d.name.startswith("tfds:lm1b[") for d in docs)
        # mock text is random letters: curation drops all of it, and says so
        with pytest.raises(CorpusError, match="tfds:lm1b:text has 0 document"):
            prepare(
                "tfds:lm1b",
                tmp_path / "out",
                tfds_data_dir=str(tmp_path),
                num_workers=1,
                progress=False,
            )
    with tfds.testing.mock_data(num_examples=3):
        docs = list(iter_documents("tfds:lm1b:nofield", tfds_data_dir=str(tmp_path)))
        assert [d.error for d in docs] == ["tfds_missing_field"] * 3
