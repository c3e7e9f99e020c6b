"""Data pipeline benchmark: curation MB/s and loader tokens/s on this machine.

python -m data.bench [--out=/tmp/bench_stdlib] [--seq_len=1024] [--batch=64]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/bench_stdlib")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    for workers in (1, 2):
        print("curation", bench_curation(workers))
    start = time.perf_counter()
    ensure_prepared("stdlib", args.out, vocab_size=8192, progress=False)
    print(f"prepare stdlib (vocab 8192, or reused): {time.perf_counter() - start:.1f} s")
    print("loader", bench_loader(args.out, args.seq_len, args.batch, args.batches))


if __name__ == "__main__":
    main()
