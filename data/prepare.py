"""Raw corpus -> curated, split, tokenized dataset with a tokenizer and a curation report.

    python -m data.prepare --corpus=stdlib --out=/tmp/stdlib --vocab_size=8192
    python -m data.prepare --corpus=python --out=/tmp/python --vocab_size=8192

Writes, into DIR:
  curation_report.json   what was read, kept and dropped (by reason, with examples;
                         per licence and package for the python corpus)
  tokenizer.model        sentencepiece model (tokenizer.json for --tokenizer=char)
  text/                  curated documents, TFDS array_record dataset (splits train, val)
  train/, val/           token arrays for the loader (see data.store)
  meta.json              spec, options, split statistics; written last, marks DIR complete

Everything is built in a sibling temporary folder and moved into place only when it is
complete, so a failing run (missing path, nothing left after curation, ...) leaves an
earlier DIR untouched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from data import store
from data.curate import CuratedDocument, curate
from data.sources import (
    CorpusError,
    check_spec,
    held_out_documents,
    iter_documents,
    parse_spec,
)
from data.tokenizer import load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Options that change the prepared data; ensure_prepared() compares these.
_DATA_OPTIONS = ("vocab_size", "tokenizer", "val_fraction", "seed", "max_docs")


def split_of(text: str, val_fraction: float) -> str:
    """Split by a hash of the document: stable across runs, machines and corpus order."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return "val" if h / 2**64 < val_fraction else "train"


def _assign_splits(docs: list[CuratedDocument], val_fraction: float) -> dict[str, list]:
    splits: dict[str, list[CuratedDocument]] = {"train": [], "val": []}
    for doc in docs:
        splits[split_of(doc.text, val_fraction)].append(doc)
    # Tiny corpora: make sure both splits exist (moves whole documents, so still disjoint).
    if not splits["val"] and val_fraction > 0:
        splits["val"].append(splits["train"].pop())
    if not splits["train"]:
        splits["train"].append(splits["val"].pop())
    return splits


def _commit(tmp: Path, out: Path) -> None:
    """Swaps the finished tmp folder in; the old DIR is removed only after the swap."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


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
    spec = parse_spec(corpus_spec)
    check_spec(spec)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").exists():
        raise CorpusError(f"refusing to overwrite {out}: it exists and is not a prepared dataset")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = _build(
            spec,
            tmp,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            max_docs=max_docs,
            tfds_data_dir=tfds_data_dir,
            progress=progress,
        )
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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

    tok_file = tmp / ("tokenizer.json" if tokenizer == "char" else "tokenizer.model")
    _log(progress, f"training {tokenizer} tokenizer, vocab {vocab_size}")
    # A character set is not a statistic to hold out: build it from every kept document,
    # so val has no unknown characters. Subword models learn from train only.
    train_texts = [d.text for d in (kept if tokenizer == "char" else splits["train"])]
    tok = train_tokenizer(
        train_texts,
        tok_file,
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
            "file": tok_file.name,
            "type": tokenizer,
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
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks completeness
    return meta


def _encode_all(tok, texts: list[str], progress: bool, split: str) -> list[list[int]]:
    chunk = 256
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(texts), desc=f"tokenizing {split}", unit=" docs")
    encoded: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        encoded += tok.encode_batch(texts[i : i + chunk], num_threads=min(2, os.cpu_count() or 1))
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
    return json.loads(path.read_text())


def load_prepared_tokenizer(prepared_dir: str | os.PathLike):
    meta = load_meta(prepared_dir)
    return load_tokenizer(Path(prepared_dir) / meta["tokenizer"]["file"])


def ensure_prepared(corpus_spec: str, out_dir: str | os.PathLike, **options) -> dict:
    """Reuses a complete DIR prepared from the same spec and options, else prepares it.

    Refuses (ValueError) when DIR holds data prepared from another spec or options, rather
    than silently training on the wrong data or deleting it.
    """
    out = Path(out_dir)
    if (out / "meta.json").exists():
        meta = load_meta(out)
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
        if meta.get("corpus") != wanted or asked != have:
            raise ValueError(
                f"{out} was prepared from corpus {meta.get('corpus')!r} with {have}, but "
                f"{wanted!r} with {asked} was asked for; use another directory or delete it"
            )
        if meta.get("complete") and meta.get("format_version") == FORMAT_VERSION:
            return meta
    return prepare(corpus_spec, out, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--corpus",
        default="stdlib",
        help="stdlib[:holdout=F] | python[:holdout=F] | text:PATH | jsonl:PATH:FIELD"
        " | tfds:NAME[:FIELD]",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--tokenizer", choices=("bpe", "unigram", "char"), default="bpe")
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_workers", type=int, default=None)
    parser.add_argument("--max_docs", type=int, default=None)
    parser.add_argument("--tfds_data_dir", default=None)
    args = parser.parse_args(argv)
    try:
        prepare(
            args.corpus,
            args.out,
            vocab_size=args.vocab_size,
            tokenizer=args.tokenizer,
            val_fraction=args.val_fraction,
            seed=args.seed,
            num_workers=args.num_workers,
            max_docs=args.max_docs,
            tfds_data_dir=args.tfds_data_dir,
        )
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
