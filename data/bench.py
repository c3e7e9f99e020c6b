"""Data pipeline benchmark: curation MB/s and loader tokens/s on this machine.

python -m data.bench [--out=/tmp/bench_stdlib] [--seq_len=1024] [--batch=64]
"""

from __future__ import annotations

import os
import platform
import time

from absl import flags

from data import cli
from data.curate import curate
from data.pipeline import PackedBatchIterator
from data.prepare import ensure_prepared
from data.sources import iter_documents


def bench_curation(num_workers: int) -> dict:
    docs = list(iter_documents("stdlib"))  # read first: measure curation, not disk
    start = time.perf_counter()
    _, report = curate(docs, num_workers=num_workers)
    seconds = time.perf_counter() - start
    mb = report["input"]["bytes"] / 1e6
    return {
        "workers": num_workers,
        "mb": round(mb, 2),
        "seconds": round(seconds, 2),
        "mb_per_s": round(mb / seconds, 2),
    }


def bench_loader(prepared_dir: str, seq_len: int, batch: int, n_batches: int) -> dict:
    it = PackedBatchIterator(prepared_dir, "train", seq_len, batch, seed=0)
    next(it)  # epoch layout
    start = time.perf_counter()
    tokens = 0
    for _ in range(n_batches):
        tokens += next(it)["inputs"].size
    seconds = time.perf_counter() - start
    return {
        "seq_len": seq_len,
        "batch": batch,
        "batches": n_batches,
        "tokens_per_s": round(tokens / seconds),
    }


def _define_flags() -> None:
    flags.DEFINE_string("out", "/tmp/bench_stdlib", "prepared stdlib data (made if absent)")
    flags.DEFINE_integer("seq_len", 1024, "loader row length")
    flags.DEFINE_integer("batch", 64, "loader global batch size")
    flags.DEFINE_integer("batches", 200, "loader batches to time")


def main() -> None:
    f = flags.FLAGS
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    for workers in (1, 2):
        print("curation", bench_curation(workers))
    start = time.perf_counter()
    ensure_prepared("stdlib", f.out, vocab_size=8192, progress=False)
    print(f"prepare stdlib (vocab 8192, or reused): {time.perf_counter() - start:.1f} s")
    print("loader", bench_loader(f.out, f.seq_len, f.batch, f.batches))


if __name__ == "__main__":
    _define_flags()  # only for this command, as in data.prepare
    cli.run(main)
