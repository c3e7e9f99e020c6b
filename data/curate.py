"""Curation: normalise, filter and deduplicate documents, with a full account of every drop.

Every input document gets exactly one decision. Reasons, in the order they are tested:
read errors (empty, binary, invalid_utf8, jsonl_invalid_json, jsonl_missing_field),
`empty` after normalisation, `held_out_copy` (the same text as a held-out document),
`exact_duplicate`, the quality rules of `data.quality`, `held_out_near_copy` (a near
duplicate of a held-out document), then `near_duplicate`. The report's counts and bytes
add up: kept + dropped = input.

Held-out documents (`held_out=`, e.g. the standard-library files post-training evaluates
on) are never kept; they are only compared against, so that a copy of one vendored into
another package does not leak into pretraining either.

The per-document work (normalisation, quality rules, MinHash) runs in worker processes;
the order-dependent part (which copy of a duplicate is kept) runs in this process in input
order, so the result is the same for any number of workers.

Documents whose split the source fixed (`text:PATH:val_tail=F`, data/sources.py) are kept
whole: normalised, dropped only when unreadable or empty, never by the quality rules or
as duplicates, so that train and val are exactly the text before and after the cut.

Workers are forked, and only where that is safe: a fork copies the locks that other
threads hold, and the child can deadlock on them. JAX's runtime is multithreaded once it
has started, so a process that imported JAX, or runs any Python thread besides the main
one, curates in-process instead. (NumPy's OpenBLAS threads are safe: OpenBLAS quiesces
them around a fork.) Spawned workers would be safe everywhere but re-import the caller's
main module: under `python -m experiments.pretrain` that costs more than the workers save
on the stdlib corpus (BENCHMARKS.md, "Data pipeline").
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing
import os
import sys
import threading
import time
import unicodedata
from collections.abc import Iterable, Iterator

import numpy as np

from data import dedup, quality
from data.sources import RawDocument

MAX_EXAMPLES = 3  # example document names kept per drop reason in the report


@dataclasses.dataclass
class CuratedDocument:
    name: str
    kind: str
    text: str  # normalised
    nbytes: int  # bytes as read, as counted in the report
    split: str | None = None  # the split the source fixed (data.sources val_tail), else None


def normalize(text: str) -> str:
    """Unicode NFC and \\n line endings, so equal texts hash equally and tokenize alike."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", text)


_PERM: tuple[np.ndarray, np.ndarray] | None = None


def _init_worker(seed: int) -> None:
    global _PERM
    _PERM = dedup.permutation_params(seed)


def _analyse(doc: RawDocument) -> tuple[str | None, str | None, bytes | None, np.ndarray | None]:
    """(drop reason, normalised text, content hash, MinHash signature) of one document."""
    if doc.error:
        return doc.error, None, None, None
    text = normalize(doc.text)
    if not text.strip():
        return "empty", None, None, None
    digest = dedup.content_hash(text)
    # A document whose split the source fixed (a text corpus's val_tail) is the text as
    # the user cut it: the quality rules would leave holes in the contiguous split.
    reason = None if doc.split else quality.drop_reason(text, doc.kind)
    sig = None if reason else dedup.minhash_signature(text, *_PERM)
    # Most texts are already normalised: send None back rather than pickling a copy.
    return reason, (None if text == doc.text else text), digest, sig


DUPLICATE_REASONS = ("exact_duplicate", "near_duplicate", "held_out_copy", "held_out_near_copy")


def _count(table: dict, key: str, nbytes: int) -> None:
    entry = table.setdefault(key, {"docs": 0, "bytes": 0})
    entry["docs"] += 1
    entry["bytes"] += nbytes


class CurationReport:
    """Counts and bytes per decision; `to_dict()` is what lands in curation_report.json.

    Documents that carry a package and licence (the python corpus) are also counted,
    when kept, per licence and per package."""

    def __init__(self) -> None:
        self.input = {"docs": 0, "bytes": 0}
        self.kept = {"docs": 0, "bytes": 0}
        self.dropped: dict[str, dict] = {}
        self.kept_by_license: dict[str, dict] = {}
        self.kept_by_package: dict[str, dict] = {}

    def add(self, doc: RawDocument, reason: str | None) -> None:
        self.input["docs"] += 1
        self.input["bytes"] += doc.nbytes
        if reason is None:
            self.kept["docs"] += 1
            self.kept["bytes"] += doc.nbytes
            if doc.license is not None:
                _count(self.kept_by_license, doc.license, doc.nbytes)
            if doc.package is not None:
                _count(self.kept_by_package, doc.package, doc.nbytes)
            return
        entry = self.dropped.setdefault(reason, {"docs": 0, "bytes": 0, "examples": []})
        entry["docs"] += 1
        entry["bytes"] += doc.nbytes
        if len(entry["examples"]) < MAX_EXAMPLES:
            entry["examples"].append(doc.name)

    def to_dict(self) -> dict:
        by_reason = {k: self.dropped[k] for k in sorted(self.dropped)}
        out = {
            "input": dict(self.input),
            "kept": dict(self.kept),
            "dropped": {
                "docs": sum(v["docs"] for v in by_reason.values()),
                "bytes": sum(v["bytes"] for v in by_reason.values()),
                "by_reason": by_reason,
            },
            # The dedup account at a glance (the same numbers as in by_reason).
            "duplicates": {
                reason: by_reason.get(reason, {"docs": 0})["docs"] for reason in DUPLICATE_REASONS
            },
        }
        if self.kept_by_license or self.kept_by_package:
            by_bytes = lambda table: dict(  # noqa: E731
                sorted(table.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))
            )
            out["kept_by_license"] = by_bytes(self.kept_by_license)
            out["kept_by_package"] = by_bytes(self.kept_by_package)
        return out


def thresholds() -> dict:
    """Every threshold in force, recorded in the report so a run documents itself."""
    consts = {k: v for k, v in vars(quality).items() if k.isupper() and k[:1] != "_"}
    consts = {k: sorted(v) if isinstance(v, frozenset) else v for k, v in consts.items()}
    consts["GOPHER_MAX_TOP_NGRAM_CHARS"] = {
        str(k): v for k, v in quality.GOPHER_MAX_TOP_NGRAM_CHARS.items()
    }
    consts["GOPHER_MAX_DUP_NGRAM_CHARS"] = {
        str(k): v for k, v in quality.GOPHER_MAX_DUP_NGRAM_CHARS.items()
    }
    consts.update(
        MINHASH_SHINGLE_WORDS=dedup.SHINGLE_WORDS,
        MINHASH_BANDS=dedup.BANDS,
        MINHASH_ROWS=dedup.ROWS,
        NEAR_DUP_THRESHOLD=dedup.NEAR_DUP_THRESHOLD,
    )
    return consts


def fork_is_safe() -> bool:
    """No JAX in this process and no Python thread but this one (see the module doc)."""
    return (
        "jax" not in sys.modules
        and threading.active_count() == 1
        and "fork" in multiprocessing.get_all_start_methods()
    )


def _fork_pool(num_workers: int, seed: int):
    """A pool of forked workers, or None where forking is not safe (see the module doc)."""
    if num_workers <= 1 or not fork_is_safe():
        return None
    ctx = multiprocessing.get_context("fork")
    return ctx.Pool(num_workers, initializer=_init_worker, initargs=(seed,))


def _analysed(docs: Iterable[RawDocument], seed: int, pool) -> Iterator[tuple[RawDocument, tuple]]:
    if pool is None:
        _init_worker(seed)
        for doc in docs:
            yield doc, _analyse(doc)
        return
    pending: collections.deque[RawDocument] = collections.deque()

    def tagged():
        for doc in docs:
            pending.append(doc)
            yield doc

    # imap keeps input order, which keeps dedup decisions deterministic.
    for result in pool.imap(_analyse, tagged(), chunksize=4):
        yield pending.popleft(), result


class _HeldOut:
    """Content hashes and MinHash signatures of the held-out documents."""

    def __init__(self, docs: Iterable[RawDocument], seed: int, threshold: float):
        perm = dedup.permutation_params(seed)
        self.hashes: set[bytes] = set()
        self.near = dedup.NearDuplicateIndex(threshold)
        self.docs = self.bytes = 0
        for doc in docs:
            if doc.error:
                continue  # unreadable: nothing to leak
            text = normalize(doc.text)
            self.hashes.add(dedup.content_hash(text))
            # Every one, near copies of each other included: a document can be a near copy
            # of one of them and not of another.
            self.near.add(dedup.minhash_signature(text, *perm))
            self.docs += 1
            self.bytes += doc.nbytes


def curate(
    docs: Iterable[RawDocument],
    *,
    held_out: Iterable[RawDocument] = (),
    seed: int = 0,
    num_workers: int | None = None,
    near_dup_threshold: float = dedup.NEAR_DUP_THRESHOLD,
    progress: bool = False,
) -> tuple[list[CuratedDocument], dict]:
    """Kept documents (input order) and the report dict, with throughput in MB/s and the
    number of worker processes that did the work (1: this process).

    No kept document is an exact or near copy of a `held_out` document."""
    num_workers = num_workers if num_workers is not None else min(2, os.cpu_count() or 1)
    start = time.perf_counter()
    # Before the progress bar: tqdm starts a monitor thread.
    pool = _fork_pool(num_workers, seed)
    if progress and num_workers > 1 and pool is None:
        print(
            "curating in this process: forking workers is not safe once JAX or threads run",
            file=sys.stderr,
        )
    held = _HeldOut(held_out, seed, near_dup_threshold)
    with pool or contextlib.nullcontext():
        kept, report = _decide(docs, held, seed, pool, near_dup_threshold, progress)
    seconds = time.perf_counter() - start
    result = report.to_dict()
    if held.docs:
        result["held_out_reference"] = {"docs": held.docs, "bytes": held.bytes}
    result["thresholds"] = thresholds()
    result["seed"] = seed
    result["throughput"] = {
        "seconds": round(seconds, 3),
        "input_mb_per_s": round(report.input["bytes"] / 1e6 / max(seconds, 1e-9), 3),
        "workers": num_workers if pool else 1,
    }
    return kept, result


def _decide(
    docs: Iterable[RawDocument],
    held: _HeldOut,
    seed: int,
    pool,
    near_dup_threshold: float,
    progress: bool,
) -> tuple[list[CuratedDocument], CurationReport]:
    """One decision per document, in input order."""
    report = CurationReport()
    seen_hashes: set[bytes] = set()
    near = dedup.NearDuplicateIndex(near_dup_threshold)
    kept: list[CuratedDocument] = []
    stream = _analysed(docs, seed, pool)
    if progress:
        from tqdm import tqdm

        stream = tqdm(stream, desc="curating", unit=" docs")
    for doc, (reason, text, digest, sig) in stream:
        verbatim = doc.split is not None  # as in _analyse: kept whole, like nanoGPT's splits
        if digest is not None and not verbatim:  # exact duplicates outrank quality reasons
            if digest in held.hashes:
                reason = "held_out_copy"
            elif digest in seen_hashes:
                reason = "exact_duplicate"
            else:
                seen_hashes.add(digest)
        if reason is None and held.near.find(sig) is not None:
            reason = "held_out_near_copy"
        if reason is None and not verbatim and near.add_if_new(sig) is not None:
            reason = "near_duplicate"
        report.add(doc, reason)
        if reason is None:
            kept.append(
                CuratedDocument(doc.name, doc.kind, text or doc.text, doc.nbytes, doc.split)
            )
    return kept, report
