"""text:PATH:val_tail=F: the val split is the contiguous tail of the text, as nanoGPT
splits its corpora; disjoint from train, the same on every run."""

import numpy as np
import pytest

from data import store
from data.prepare import load_prepared_tokenizer, prepare
from data.sources import CorpusError, iter_documents, parse_spec, tail_cut
from tests.test_data_prepare import write_corpus


def line_corpus(folder, n: int, repeat: int = 1):
    """write_corpus's prose with one sentence a line, each file `repeat` times over."""
    write_corpus(folder, n=n)
    for path in folder.iterdir():
        path.write_text(path.read_text().replace(". ", ".\n") * repeat)
    return folder


def joined(folder) -> str:
    return "".join(p.read_text() for p in sorted(folder.iterdir()))


def split_texts(docs) -> dict[str, str]:
    """Each split's document texts joined in source order."""
    out = {"train": "", "val": ""}
    for doc in docs:
        out[doc.split] += doc.text
    return out


def test_spec_round_trips_and_refuses_bad_fractions():
    spec = parse_spec("text:/a/b.txt:val_tail=0.1")
    assert (spec.path, spec.val_tail) == ("/a/b.txt", 0.1)
    assert str(spec) == "text:/a/b.txt:val_tail=0.1" and parse_spec(str(spec)) == spec
    assert parse_spec("text:/a/b.txt").val_tail == 0.0
    bad_specs = (
        "text:/a:val_tail=0",
        "text:/a:val_tail=1",
        "text:/a:val_tail=x",
        "text::val_tail=.5",
    )
    for bad in bad_specs:
        with pytest.raises(CorpusError, match="val_tail"):
            parse_spec(bad)


def test_tail_cut_lands_on_a_line_start():
    text = "aaaa\nbbbb\ncccc\ndddd\n"
    cut = tail_cut(text, 0.3)  # 30% of 20 chars: 14, inside "cccc" -> the next line
    assert text[cut:] == "dddd\n"
    assert tail_cut("abc\ndef\n", 0.5) == 4  # already a line start: kept


@pytest.mark.parametrize("n_files", [1, 5])
def test_tail_split_is_the_contiguous_end(tmp_path, n_files):
    # one file long enough to be cut into prose pieces, or several files
    folder = line_corpus(tmp_path / "texts", n_files, repeat=12 if n_files == 1 else 1)
    text = joined(folder)
    docs = list(iter_documents(f"text:{folder}:val_tail=0.1"))
    splits = split_texts(docs)
    cut = tail_cut(text, 0.1)
    assert splits["train"] == text[:cut] and splits["val"] == text[cut:]
    longest_line = max(map(len, text.splitlines(keepends=True)))
    assert 0.1 * len(text) - longest_line < len(splits["val"]) <= 0.1 * len(text)
    # train documents all come before val documents: one cut, no interleaving
    order = [d.split for d in docs]
    assert order == sorted(order)  # "train" < "val"
    assert len({d.name for d in docs}) == len(docs)
    again = list(iter_documents(f"text:{folder}:val_tail=0.1"))
    assert [(d.name, d.text, d.split) for d in again] == [(d.name, d.text, d.split) for d in docs]


def test_prepare_keeps_the_tail_as_val(tmp_path):
    folder = line_corpus(tmp_path / "texts", 6)
    # one line over and over: the quality rules would drop it, the tail split keeps it
    (folder / "doc99.txt").write_text("The same line of the play, said again.\n" * 80)
    text = joined(folder)
    out = tmp_path / "prepared"
    options = dict(tokenizer="char", vocab_size=128, num_workers=1, progress=False)
    meta = prepare(f"text:{folder}:val_tail=0.2", out, **options)
    assert meta["corpus"] == f"text:{folder}:val_tail=0.2"
    tok = load_prepared_tokenizer(out)
    texts = {}
    for s in ("train", "val"):  # the token arrays keep document order (the text records do not)
        split = store.TokenizedSplit.open(out / s, np.dtype(meta["token_dtype"]))
        docs = [split.document(i)[1:-1].tolist() for i in range(split.num_docs)]  # no bos/eos
        texts[s] = "".join(tok.decode(ids) for ids in docs)
    cut = tail_cut(text, 0.2)
    assert texts["val"] == text[cut:] and texts["train"] == text[:cut]
    # deterministic: a second preparation writes the same tokens
    again = prepare(f"text:{folder}:val_tail=0.2", tmp_path / "again", **options)
    assert again["splits"] == meta["splits"]
    for split in ("train", "val"):
        assert (out / split).is_dir()
        for f in (out / split).iterdir():
            assert f.read_bytes() == (tmp_path / "again" / split / f.name).read_bytes()


def test_tail_cut_falls_back_to_the_last_line_start_and_never_leaves_val_empty():
    # no newline after the cut point: the last line start before it, not the end of the text
    assert tail_cut("abc\ndef\nghi", 0.1) == 8
    assert tail_cut("abc\r\ndef\r\nghi", 0.1) == 10
    assert tail_cut("abc\ndef\n", 0.01) == 4  # the final newline starts no line
    assert tail_cut("one line only", 0.5) is None and tail_cut("a\n", 0.01) is None


def test_val_tail_of_a_last_line_without_newline_is_that_line(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("line one\nline two\nline three\n")
    (folder / "b.txt").write_text("b1 text\nb2 text\nlast line no newline")
    splits = split_texts(iter_documents(f"text:{folder}:val_tail=0.1"))
    assert splits["val"] == "last line no newline"
    assert splits["train"] + splits["val"] == joined(folder)


def test_val_tail_of_one_line_is_refused_in_one_line(tmp_path):
    (tmp_path / "one.txt").write_text("a single line of text without any line break")
    with pytest.raises(CorpusError, match="is one line, so it has no line start") as refused:
        list(iter_documents(f"text:{tmp_path}:val_tail=0.1"))
    assert "\n" not in str(refused.value)


def test_max_docs_with_val_tail_is_refused_before_anything_is_written(tmp_path):
    folder = line_corpus(tmp_path / "texts", 3)
    with pytest.raises(CorpusError, match="max_docs cannot be used with .*val_tail") as refused:
        prepare(f"text:{folder}:val_tail=0.2", tmp_path / "out", max_docs=2, progress=False)
    assert "\n" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["texts"]


def test_a_val_tail_split_left_empty_by_curation_is_refused():
    from data.curate import CuratedDocument
    from data.prepare import _assign_splits

    train = CuratedDocument("a.txt@train", "prose", "some text\n", 10, "train")
    with pytest.raises(CorpusError, match="val split of the val_tail cut has no text left"):
        _assign_splits([train], val_fraction=0.05)
    val = CuratedDocument("a.txt@val", "prose", "the tail\n", 9, "val")
    assert _assign_splits([train, val], 0.05) == {"train": [train], "val": [val]}
