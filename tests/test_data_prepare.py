"""prepare(): end to end, split disjointness, reuse, bad input, TFDS loading with mock data;
it replaces only what it wrote, and cleans up after killed runs."""

import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import tensorflow_datasets as tfds

from data import store
from data.prepare import ensure_prepared, prepare
from data.sources import CorpusError, iter_documents
from data.tokenizer import load_tokenizer
from tests.run_helpers import REPO

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


def run_cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """python -m data.prepare ARGS, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    command = [sys.executable, "-m", "data.prepare", *args]
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a refused command ends with; exit status 2, no traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def test_prepare_end_to_end(tmp_path, corpus, capfd):
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
    printed = capfd.readouterr()
    assert "Downloading" not in printed.out + printed.err  # nothing is; TFDS said so
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
    assert "left after curation" in error_line(
        run_cli(f"--corpus=jsonl:{jsonl}:text", f"--out={out}", "--vocab_size=400")
    )
    assert _snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, corpus):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match=f"refusing to replace {foreign}"):
        prepare(f"text:{corpus}", foreign, num_workers=1, progress=False)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_a_file_named_meta_json_does_not_make_a_folder_replaceable(tmp_path, corpus):
    mine = tmp_path / "mine"
    (mine / "chapters").mkdir(parents=True)
    (mine / "meta.json").write_text('{"format_version": 1, "complete": true}')
    (mine / "thesis.tex").write_text("precious")
    (mine / "chapters" / "one.tex").write_text("also precious")
    before = _snapshot(mine)
    line = error_line(run_cli(f"--corpus=text:{corpus}", f"--out={mine}", "--vocab_size=400"))
    assert f"refusing to replace {mine}" in line
    assert _snapshot(mine) == before and (mine / "chapters").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary folder left


def test_replaces_only_a_folder_it_wrote(tmp_path, corpus):
    out = tmp_path / "out"
    prepare(f"text:{corpus}", out, vocab_size=400, num_workers=1, progress=False)
    (out / "train" / "notes.txt").write_text("mine")
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="holds train/notes.txt, which was not written there"):
        prepare(f"text:{corpus}", out, vocab_size=500, num_workers=1, progress=False)
    assert _snapshot(out) == before
    (out / "train" / "notes.txt").unlink()
    meta = prepare(f"text:{corpus}", out, vocab_size=500, num_workers=1, progress=False)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["options"]["vocab_size"] == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_run_is_cleaned_up_by_the_next_one(tmp_path, corpus):
    out = tmp_path / "out"

    def leftovers():
        return sorted(
            p.name for p in tmp_path.iterdir() if re.fullmatch(r"\.out\.partial-\d+", p.name)
        )

    killed = subprocess.Popen(
        [sys.executable, "-m", "data.prepare", "--corpus=stdlib", f"--out={out}"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not leftovers():  # it curates the standard library for seconds after this
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    killed.send_signal(signal.SIGTERM)
    assert killed.wait(timeout=60) == -signal.SIGTERM
    assert len(leftovers()) == 1
    # A run still at work (its folder locked), and a folder of another naming, stay.
    running = tmp_path / ".out.partial-1"
    running.mkdir()
    held = os.open(running, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    (tmp_path / ".out.partial-notes").mkdir()
    try:
        prepare(f"text:{corpus}", out, vocab_size=400, num_workers=1, progress=False)
    finally:
        os.close(held)
    assert leftovers() == [".out.partial-1"]
    assert (tmp_path / ".out.partial-notes").is_dir() and (out / "meta.json").exists()


def test_reuse_rebuilds_a_damaged_folder(tmp_path, corpus):
    out = tmp_path / "out"
    options = dict(vocab_size=400, num_workers=1, progress=False)
    ensure_prepared(f"text:{corpus}", out, **options)
    tokens = (out / "val" / "tokens.bin").read_bytes()
    (out / "val" / "tokens.bin").write_bytes(tokens[:2])  # cut short, as by a full disk
    ensure_prepared(f"text:{corpus}", out, **options)
    assert (out / "val" / "tokens.bin").read_bytes() == tokens


def _no_curation(monkeypatch):
    def curate(*args, **kwargs):
        raise AssertionError("curation started")

    monkeypatch.setattr("data.prepare.curate", curate)


@pytest.mark.parametrize("tokenizer,vocab_size", [("bpe", 0), ("unigram", 264)])
def test_a_vocab_size_no_corpus_fits_is_refused_before_curation(
    tmp_path, corpus, monkeypatch, tokenizer, vocab_size
):
    _no_curation(monkeypatch)
    with pytest.raises(ValueError, match=f"vocab_size {vocab_size} is too small.* more than 264"):
        prepare(f"text:{corpus}", tmp_path / "out", vocab_size=vocab_size, tokenizer=tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_a_vocab_size_too_small_for_the_corpus_names_the_size_it_needs(tmp_path, corpus):
    options = dict(val_fraction=0.3, num_workers=1, progress=False)
    with pytest.raises(ValueError, match=r"too small for this corpus") as refused:
        prepare(f"text:{corpus}", tmp_path / "out", vocab_size=270, **options)
    needed = int(re.search(r"use --vocab_size=(\d+) or more", str(refused.value))[1])
    meta = prepare(f"text:{corpus}", tmp_path / "out", vocab_size=needed, **options)
    assert meta["tokenizer"]["vocab_size"] == needed


def test_cli_bad_flags_are_one_line(tmp_path):
    for args, expected in [
        (["--vocab_size=0"], "vocab_size 0 is too small"),
        (["--tokenizer=wordpiece"], "--tokenizer"),
        (["--vocab_size=many"], "--vocab_size"),
        ([], "--out"),
        (["--val_fraction=1"], "val_fraction"),
    ]:
        out = [f"--out={tmp_path / 'out'}"] if args != [] else []
        result = run_cli("--corpus=stdlib", *out, *args)
        assert expected in error_line(result) and len(result.stderr.strip().splitlines()) == 1
    verbose = run_cli("--corpus=stdlib", f"--out={tmp_path / 'out'}", "--vocab_size=0", "--verbose")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
    assert list(tmp_path.iterdir()) == []


def test_tfds_names_that_do_not_exist_or_are_not_prepared_fail_fast(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "TFDS_DATA_DIR": ""}
    started = time.monotonic()
    unknown = error_line(run_cli("--corpus=tfds:no_such_dataset", f"--out={tmp_path / 'a'}"))
    assert "no TFDS dataset named 'no_such_dataset'" in unknown and "list_builders" in unknown
    absent = run_cli("--corpus=tfds:lm1b", f"--out={tmp_path / 'b'}", env=env)
    assert "tfds:lm1b is not prepared in" in error_line(absent)
    assert len(absent.stderr.strip().splitlines()) == 1  # no library warnings either
    assert time.monotonic() - started < 60  # no download attempts, no retries
    assert [p.name for p in tmp_path.iterdir()] == ["home"] and list(home.iterdir()) == []


def test_tfds_source_with_mock_data(tmp_path, monkeypatch):
    # mock_data fakes the records, not the prepared files that data.sources looks for first
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
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


def test_special_token_text_in_a_document_is_tokenized_as_text(tmp_path):
    import numpy as np

    folder = write_corpus(tmp_path / "texts", n=4)
    for path in folder.iterdir():  # every document, so both splits have one
        path.write_text(path.read_text() + "A chat log writes <|user|> and <|end|> here.\n")
    options = dict(tokenizer="char", val_fraction=0.5, num_workers=1, progress=False)
    meta = prepare(f"text:{folder}", tmp_path / "out", **options)
    tok = load_tokenizer(tmp_path / "out" / meta["tokenizer"]["file"])
    specials = {tok.special_id("<|user|>"), tok.special_id("<|end|>")}
    texts = sorted(p.read_text() for p in folder.iterdir())
    decoded = []
    for split in ("train", "val"):
        tokens = store.TokenizedSplit.open(tmp_path / "out" / split, np.dtype(meta["token_dtype"]))
        docs = [tokens.document(i).tolist() for i in range(tokens.num_docs)]
        assert not specials & {i for doc in docs for i in doc}
        decoded += [tok.decode(doc) for doc in docs]
    assert sorted(decoded) == texts
