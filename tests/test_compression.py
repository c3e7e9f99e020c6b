"""The compressor baselines the report sets beside the model's bits per byte."""

import lzma
import zlib

import pytest

from data.compression import compressor_bits_per_byte


def test_bits_per_byte_are_summed_over_documents_compressed_one_by_one():
    texts = ["def f(x):\n    return x + 1\n" * 20, "héllo wörld " * 50]
    got = compressor_bits_per_byte(texts)
    raw = sum(len(t.encode()) for t in texts)
    zl = sum(len(zlib.compress(t.encode(), 9)) for t in texts)
    lz = sum(len(lzma.compress(t.encode(), preset=9)) for t in texts)
    assert got["zlib_9"] == pytest.approx(8 * zl / raw) and got["lzma_9"] == pytest.approx(
        8 * lz / raw
    )
    assert got["docs"] == 2 and got["bytes"] == raw
    assert got["zlib_9"] < 8  # repetitive text compresses


def test_no_text_is_an_error():
    with pytest.raises(ValueError, match="no held-out text"):
        compressor_bits_per_byte([])
