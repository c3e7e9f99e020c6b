"""Raw corpus -> curated, split, tokenized dataset with a tokenizer and a curation report.

    python -m data.prepare --corpus=stdlib --out=/tmp/stdlib --vocab_size=8192
    python -m data.prepare --corpus=python --out=/tmp/python --vocab_size=8192
    python -m data.prepare --corpus=text:DOCS --out=/tmp/docs --tokenizer=IMPORTED/tokenizer

`--tokenizer` is bpe, unigram or char (train one on the corpus), or the path of an
existing tokenizer (a file, or a directory such as an imported model's DIR/tokenizer):
the corpus is tokenized with it as it is and none is trained (continued pretraining).

Writes, into DIR:
  curation_report.json   what was read, kept and dropped (by reason, with examples;
                         per licence and package for the python corpus)
  tokenizer.model        sentencepiece model (tokenizer.json for --tokenizer=char; a copy
                         of the files of an existing tokenizer, names kept)
  text/                  curated documents, TFDS array_record dataset (splits train, val)
  train/, val/           token arrays for the loader (see data.store)
  meta.json              spec, options, split statistics, the list of every file above
                         (`contents`); written last, marks DIR complete

Everything is built in a sibling temporary folder, `.DIR.partial-PID`, and moved into place
only when it is complete, so a failing run (missing path, nothing left after curation, ...)
leaves an earlier DIR untouched. prepare() replaces only a folder it wrote itself: DIR must
be absent, empty, or hold nothing but what its meta.json lists; anything else is refused,
and nothing is deleted. The temporary folder of a run killed before it could clean up
(SIGTERM, SIGKILL) is removed by the next run on DIR (see data/output_folder.py).

Bad input that shows without reading the corpus (a corpus spec, path or TFDS name, a
vocab_size no corpus fits, a folder not ours to replace) fails before anything is read or
written; a vocab_size too small for this corpus's characters fails right after curation.
The command ends with one line for each (exit statuses: data/cli.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from absl import flags

from data import cli, output_folder, store
from data.curate import CuratedDocument, curate
from data.sources import (
    CorpusError,
    check_spec,
    held_out_documents,
    iter_documents,
    parse_spec,
)
from data.tokenizer import (
    MODEL_TYPES,
    AnyTokenizer,
    check_vocab_size,
    load_tokenizer,
    tokenizer_files,
    tokenizer_identity,
    train_tokenizer,
)

FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Options that change the prepared data; ensure_prepared() compares these.
_DATA_OPTIONS = ("vocab_size", "tokenizer", "val_fraction", "seed", "max_docs")


def split_of(text: str, val_fraction: float) -> str:
    """Split by a hash of the document: stable across runs, machines and corpus order."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return "val" if h / 2**64 < val_fraction else "train"


def _assign_splits(docs: list[CuratedDocument], val_fraction: float) -> dict[str, list]:
    """Each document's split: the one its source fixed (a text corpus's val_tail), else
    by `split_of` with `val_fraction`."""
    splits: dict[str, list[CuratedDocument]] = {"train": [], "val": []}
    for doc in docs:
        splits[doc.split or split_of(doc.text, val_fraction)].append(doc)
    if any(doc.split for doc in docs):  # the cut is the user's: never move text across it
        for name in SPLITS:
            if not splits[name]:
                raise CorpusError(
                    f"the {name} split of the val_tail cut has no text left after curation "
                    "(only blank lines); choose another val_tail"
                )
        return splits
    # Tiny corpora: make sure both splits exist (moves whole documents, so still disjoint).
    if not splits["val"] and val_fraction > 0:
        splits["val"].append(splits["train"].pop())
    if not splits["train"]:
        splits["train"].append(splits["val"].pop())
    return splits


def check_options(
    vocab_size: int,
    tokenizer: str,
    val_fraction: float,
    max_docs: int | None,
    num_workers: int | None,
) -> None:
    """Refuses options no corpus can satisfy, before anything is read or written."""
    if is_existing(tokenizer):
        _existing_files(tokenizer)
    else:
        check_vocab_size(vocab_size, tokenizer)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if max_docs is not None and max_docs < 2:
        raise ValueError(
            f"max_docs must be at least 2 (a train and a val document), got {max_docs}"
        )
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")


def is_existing(tokenizer: str) -> bool:
    """Whether the tokenizer option names an existing tokenizer rather than a kind to train."""
    return tokenizer not in MODEL_TYPES


def _existing_files(tokenizer: str) -> list[Path]:
    """The files of the existing tokenizer at path `tokenizer`, checked to load."""
    path = Path(tokenizer).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--tokenizer (data.tokenizer) {tokenizer!r} is neither one of "
            f"{', '.join(MODEL_TYPES)} (to train) nor the path of an existing tokenizer"
        )
    files = tokenizer_files(path)
    load_tokenizer(files[0])  # its errors (a missing tokenizer_config.json, ...) now
    return files


def _prepared_tokenizer_files(out: Path, meta: dict) -> list[Path]:
    names = meta["tokenizer"].get("files") or [meta["tokenizer"]["file"]]
    return [out / name for name in names]


def _read_meta(out: Path) -> dict | None:
    """DIR's meta.json if it is one prepare() wrote (a format_version, options), else None."""
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    ours = isinstance(meta, dict) and "format_version" in meta
    return meta if ours and isinstance(meta.get("options"), dict) else None


def _contents(folder: Path) -> dict[str, int | str]:
    return output_folder.listing(folder, leave_out=("meta.json",))


def _check_replaceable(out: Path) -> None:
    """FileExistsError unless DIR is absent, empty, or holds only what its meta.json lists."""
    written = (_read_meta(out) or {}).get("contents")
    found = _contents(out) if out.is_dir() else {}
    output_folder.check_replaceable(
        out, found, written if isinstance(written, dict) else None, record="meta.json"
    )


def _is_intact(out: Path, meta: dict) -> bool:
    """Every file meta.json lists is there, with its size (older metas list none)."""
    found = _contents(out)
    return all(found.get(rel) == entry for rel, entry in meta.get("contents", {}).items())


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def prepare(
    corpus_spec: str,
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 8192,
    tokenizer: str = "bpe",
    val_fraction: float = 0.05,
    seed: int = 0,
    num_workers: int | None = None,
    max_docs: int | None = None,
    tfds_data_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Builds DIR from a corpus spec (see data.sources) and returns its meta.json dict."""
    check_options(vocab_size, tokenizer, val_fraction, max_docs, num_workers)
    spec = parse_spec(corpus_spec)
    check_spec(spec, tfds_data_dir, max_docs)
    out = Path(out_dir).resolve()  # a link to a folder: write in the folder
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in output_folder.remove_abandoned(out):
        _log(progress, f"removed {path}, left by an earlier run that was killed")
    with output_folder.work_folder(out) as work:
        new = work / "new"
        new.mkdir()
        meta = _build(
            spec,
            new,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            max_docs=max_docs,
            tfds_data_dir=tfds_data_dir,
            progress=progress,
        )
        _check_replaceable(out)  # again: files may have been put there while we worked
        output_folder.swap_in(new, out, work)
    _log(progress, f"prepared {out}: {json.dumps(meta['splits'])}")
    return meta


def _build(
    spec,
    tmp: Path,
    *,
    vocab_size,
    tokenizer,
    val_fraction,
    seed,
    num_workers,
    max_docs,
    tfds_data_dir,
    progress,
) -> dict:
    started = time.perf_counter()
    docs = iter_documents(spec, max_docs=max_docs, tfds_data_dir=tfds_data_dir)
    kept, report = curate(
        docs,
        held_out=held_out_documents(spec),
        seed=seed,
        num_workers=num_workers,
        progress=progress,
    )
    report["corpus"] = str(spec)
    (tmp / "curation_report.json").write_text(json.dumps(report, indent=1))
    if len(kept) < 2:
        reasons = {k: v["docs"] for k, v in report["dropped"]["by_reason"].items()}
        raise CorpusError(
            f"corpus {spec} has {len(kept)} document(s) left after curation (need 2, for a "
            f"train and a val split) out of {report['input']['docs']} read; dropped: {reasons}"
        )
    splits = _assign_splits(kept, val_fraction)
    store.write_text_dataset(
        tmp / "text",
        {s: [{"name": d.name, "text": d.text} for d in splits[s]] for s in SPLITS},
    )

    if is_existing(tokenizer):
        files = _existing_files(tokenizer)
        _log(progress, f"tokenizing with the existing tokenizer {files[0]} (none is trained)")
        for file in files:
            shutil.copyfile(file, tmp / file.name)
        tok_files = [tmp / file.name for file in files]
        tok = load_tokenizer(tok_files[0])
    else:
        tok_files = [tmp / ("tokenizer.json" if tokenizer == "char" else "tokenizer.model")]
        _log(progress, f"training {tokenizer} tokenizer, vocab {vocab_size}")
        # A character set is not a statistic to hold out: build it from every kept document,
        # so val has no unknown characters. Subword models learn from train only.
        train_texts = [d.text for d in (kept if tokenizer == "char" else splits["train"])]
        tok = train_tokenizer(
            train_texts,
            tok_files[0],
            vocab_size=vocab_size,
            model_type=tokenizer,
            seed=seed,
            verbose=progress,
        )
    dtype = store.token_dtype(tok.vocab_size)

    split_stats = {}
    for name in SPLITS:
        texts = [d.text for d in splits[name]]
        encoded = _encode_all(tok, texts, progress, name)
        counts = store.write_tokens(tmp / name, encoded, tok.bos_id, tok.eos_id, dtype)
        text_tokens = sum(map(len, encoded))
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        split_stats[name] = {
            **counts,
            "text_tokens": text_tokens,
            "bytes": n_bytes,
            # loss-bearing targets: every text token plus each document's eos
            "target_tokens": text_tokens + counts["docs"],
        }
    val = split_stats["val"]
    heldout_bpt = val["bytes"] / max(val["text_tokens"], 1)
    _log(progress, f"held-out bytes per token: {heldout_bpt:.3f}")
    report["splits"] = {s: {"docs": v["docs"], "bytes": v["bytes"]} for s, v in split_stats.items()}
    (tmp / "curation_report.json").write_text(json.dumps(report, indent=1))
    meta = {
        "format_version": FORMAT_VERSION,
        "corpus": str(spec),
        "options": {
            "vocab_size": vocab_size,
            "tokenizer": tokenizer,
            "val_fraction": val_fraction,
            "seed": seed,
            "max_docs": max_docs,
        },
        "tokenizer": {
            "file": tok_files[0].name,
            "files": [f.name for f in tok_files],
            "sha256": tokenizer_identity(tok_files)["sha256"],
            "type": "existing" if is_existing(tokenizer) else tokenizer,
            "vocab_size": tok.vocab_size,
            "pad_id": tok.pad_id,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "heldout_bytes_per_token": round(heldout_bpt, 4),
        },
        "token_dtype": dtype.name,
        "splits": split_stats,
        "curation": {k: report[k] for k in ("input", "kept")},
        "seconds": round(time.perf_counter() - started, 2),
        "complete": True,
        "contents": _contents(tmp),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks completeness
    return meta


def _encode_all(tok, texts: list[str], progress: bool, split: str) -> list[list[int]]:
    # Encoding is the same on any number of threads, so use every core (on a 16-core GPU
    # host two threads tokenized 270 MB of code in 55 s, BENCHMARKS.md).
    threads = os.cpu_count() or 1
    chunk = 64 * threads
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(texts), desc=f"tokenizing {split}", unit=" docs")
    encoded: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        # Corpus text is only text: "<|endoftext|>" written in a document is not eos.
        encoded += tok.encode_batch(texts[i : i + chunk], num_threads=threads, match_special=False)
        if bar:
            bar.update(len(texts[i : i + chunk]))
    if bar:
        bar.close()
    return encoded


def load_meta(prepared_dir: str | os.PathLike) -> dict:
    path = Path(prepared_dir) / "meta.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{prepared_dir} is not a prepared dataset (no meta.json); run python -m data.prepare"
        )
    meta = _read_meta(Path(prepared_dir))
    if meta is None:
        raise ValueError(f"{path} is not the meta.json of a prepared dataset; run data.prepare")
    return meta


def load_prepared_tokenizer(prepared_dir: str | os.PathLike) -> AnyTokenizer:
    meta = load_meta(prepared_dir)
    return load_tokenizer(Path(prepared_dir) / meta["tokenizer"]["file"])


def prepared_tokenizer_files(prepared_dir: str | os.PathLike) -> list[Path]:
    """The prepared dataset's tokenizer files (what a checkpoint records the identity of)."""
    return _prepared_tokenizer_files(Path(prepared_dir), load_meta(prepared_dir))


def ensure_prepared(corpus_spec: str, out_dir: str | os.PathLike, **options) -> dict:
    """Reuses a complete DIR prepared from the same spec and options, else prepares it.

    Refuses (ValueError) when DIR holds data prepared from another spec or options, rather
    than silently training on the wrong data or deleting it.
    """
    out = Path(out_dir)
    meta = _read_meta(out)
    if meta is not None:
        wanted = str(parse_spec(corpus_spec))
        defaults = {
            "vocab_size": 8192,
            "tokenizer": "bpe",
            "val_fraction": 0.05,
            "seed": 0,
            "max_docs": None,
        }
        asked = {k: options.get(k, defaults[k]) for k in _DATA_OPTIONS}
        have = {k: meta["options"].get(k) for k in _DATA_OPTIONS}
        if is_existing(asked["tokenizer"]):
            # An existing tokenizer is compared by content (its vocab_size is its own):
            # data prepared with a trained tokenizer whose files are these is the same data.
            _check_same_tokenizer(out, meta, _existing_files(asked["tokenizer"]))
            asked, have = _without_tokenizer(asked), _without_tokenizer(have)
        if meta.get("corpus") != wanted or asked != have:
            raise ValueError(
                f"{out} was prepared from corpus {meta.get('corpus')!r} with {have}, but "
                f"{wanted!r} with {asked} was asked for; use another directory or delete it"
            )
        complete = meta.get("complete") and meta.get("format_version") == FORMAT_VERSION
        if complete and _is_intact(out, meta):
            output_folder.remove_abandoned(out)  # of a killed run that was replacing it
            return meta
    return prepare(corpus_spec, out, **options)  # refuses a DIR it did not write


def _check_same_tokenizer(out: Path, meta: dict, files: list[Path]) -> None:
    asked = tokenizer_identity(files)["sha256"]
    prepared = _prepared_tokenizer_files(out, meta)
    have = tokenizer_identity(prepared)["sha256"] if all(p.exists() for p in prepared) else None
    if asked != have:
        raise ValueError(
            f"{out} was tokenized with another tokenizer (sha256 {str(have)[:12]}) than "
            f"{files[0].parent} (sha256 {asked[:12]}); use another data directory, or delete it"
        )


def _without_tokenizer(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in ("tokenizer", "vocab_size")}


def _define_flags() -> None:
    flags.DEFINE_string(
        "corpus",
        "stdlib",
        "stdlib[:holdout=F] | python[:holdout=F] | text:PATH[:val_tail=F] | jsonl:PATH:FIELD | "
        "tfds:NAME",
    )
    flags.DEFINE_string("out", None, "the folder to write (see above)", required=True)
    flags.DEFINE_integer("vocab_size", 8192, "tokenizer vocabulary size")
    flags.DEFINE_string(
        "tokenizer",
        "bpe",
        f"{' | '.join(MODEL_TYPES)}: train one; or the path of an existing tokenizer (file or "
        "directory, e.g. an imported model's DIR/tokenizer): use it, train none",
    )
    flags.DEFINE_float(
        "val_fraction", 0.05, "fraction of documents in the val split (unless val_tail sets it)"
    )
    flags.DEFINE_integer("seed", 0, "seed of sampling in curation and tokenizer training")
    flags.DEFINE_integer("num_workers", None, "curation processes (default: one per core, 2 max)")
    flags.DEFINE_integer(
        "max_docs",
        None,
        "read at most this many documents (not with text:PATH:val_tail=F: it would cut off the "
        "tail that is the val split)",
    )
    flags.DEFINE_string(
        "tfds_data_dir",
        None,
        "where a tfds: corpus is already prepared (default: $TFDS_DATA_DIR or "
        "~/tensorflow_datasets); never downloaded, never written",
    )


def main() -> None:
    f = flags.FLAGS
    prepare(
        f.corpus,
        f.out,
        vocab_size=f.vocab_size,
        tokenizer=f.tokenizer,
        val_fraction=f.val_fraction,
        seed=f.seed,
        num_workers=f.num_workers,
        max_docs=f.max_docs,
        tfds_data_dir=f.tfds_data_dir,
    )


if __name__ == "__main__":
    # Flags are defined only for this command: library users of data.prepare (the training
    # commands) define flags of the same names.
    _define_flags()
    cli.run(main)
