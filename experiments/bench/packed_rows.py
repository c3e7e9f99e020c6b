"""Training rows packed like real pretraining data, without a prepared dataset.

Real pretraining rows come from `data.pipeline`: documents concatenated and cut into rows,
so every row carries segment ids and per-document positions, which change the attention
path (the synthetic rows of `train_step.synthetic_batch` have none). Here the documents
have the lengths of the standard-library corpus (each .py file's size over the corpus'
bytes per token) and random tokens, and `data.pipeline` packs them exactly as it packs
the prepared corpus.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from data import store
from data.pipeline import PackedBatchIterator
from data.prepare import FORMAT_VERSION
from data.sources import stdlib_files

# Bytes per token of the prepared stdlib corpus under the 50k BPE of the GPT-2 configs:
# `python -m data.prepare --vocab_size 49999` (Python 3.11) gave a train split of 635
# documents, 9,722,818 bytes in 2,573,646 tokens. Its document lengths (quantiles 10/50/90%:
# 236, 1805, 10192 tokens) match the raw files' sizes over this ratio (236, 2071, 9716).
STDLIB_BYTES_PER_TOKEN = 3.78
_BOS, _EOS, _PAD = 2, 3, 0


def stdlib_document_lengths(bytes_per_token: float = STDLIB_BYTES_PER_TOKEN) -> np.ndarray:
    """Token counts of the standard library's .py files (the `stdlib` corpus' documents)."""
    sizes = np.asarray([p.stat().st_size for p in stdlib_files()], np.float64)
    return np.maximum(1, np.round(sizes / bytes_per_token)).astype(np.int64)


def packed_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch {inputs, targets, weights, positions, segment_ids} [batch, seq_len] packed by
    `data.pipeline` from random-token documents with the stdlib corpus' lengths."""
    lengths = stdlib_document_lengths()
    rng = np.random.default_rng(seed)
    dtype = store.token_dtype(vocab)
    with tempfile.TemporaryDirectory() as root:
        docs = (rng.integers(_EOS + 1, vocab, n) for n in lengths)
        store.write_tokens(Path(root, "train"), docs, _BOS, _EOS, dtype)
        meta = {
            "format_version": FORMAT_VERSION,
            "options": {},
            "token_dtype": dtype.name,
            "tokenizer": {"pad_id": _PAD},
        }
        Path(root, "meta.json").write_text(json.dumps(meta))
        return next(PackedBatchIterator(root, "train", seq_len, batch, seed=seed))


def describe(segment_ids: np.ndarray) -> dict:
    """Documents per row and padding share: what the attention kernel sees."""
    segment_ids = np.asarray(segment_ids)
    return {
        "docs_per_row": float(segment_ids.max(axis=1).mean()),
        "padding_frac": float((segment_ids == 0).mean()),
    }
