"""What general-purpose compressors achieve on the held-out text: the baseline a language
model's bits per byte is read against (a model that does not beat `lzma -9` has learned
little that a dictionary coder cannot)."""

from __future__ import annotations

import lzma
import os
import zlib
from collections.abc import Iterable
from pathlib import Path


def compressor_bits_per_byte(texts: Iterable[str]) -> dict[str, float]:
    """{"zlib_9", "lzma_9"}: compressed bits over UTF-8 bytes, each document compressed on its
    own (as the model sees them), summed over documents; plus "bytes" and "docs"."""
    raw = zl = lz = docs = 0
    for text in texts:
        data = text.encode("utf-8")
        raw += len(data)
        zl += len(zlib.compress(data, 9))
        lz += len(lzma.compress(data, preset=9))
        docs += 1
    if raw == 0:
        raise ValueError("no held-out text to compress")
    return {"zlib_9": 8 * zl / raw, "lzma_9": 8 * lz / raw, "bytes": raw, "docs": docs}


def held_out_baselines(prepared_dir: str | os.PathLike, split: str = "val") -> dict[str, float]:
    """The compressors' bits per byte on the curated documents of a prepared split."""
    from data.store import read_text_dataset

    source = read_text_dataset(Path(prepared_dir) / "text", split)
    return compressor_bits_per_byte(source[i]["text"].decode("utf-8") for i in range(len(source)))
