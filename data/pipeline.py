"""Packed, shuffled, per-host-sharded, resumable batches from a prepared dataset.

Packing. An epoch is one stream: the split's documents ([bos] ids [eos] each) in a
seeded order, concatenated. Row r of the epoch holds stream tokens [r*L, r*L + L) as
inputs and [r*L + 1, r*L + L + 1) as targets, so every stream token after the first is
a target exactly once and no token is dropped by packing. A document longer than what
is left of a row continues at the start of the next row (as its own segment there).
Per row:
  segment_ids  1, 2, ... for the document pieces in the row, 0 on padding;
  positions    position within the piece, restarting at 0 at each segment, so positions
               stay below L (learned position tables of size L suffice);
  weights      1 where the target is the next token of the same document; 0 where it
               would be the next document's bos, and on padding.
Only the last row of an epoch has padding.

Shuffling. Document order and row order are both permutations seeded by (seed, epoch),
so one long document is spread over many batches. Rows are computed on demand from the
stream offset (binary search into the cumulative document lengths), so any batch can be
produced directly: this is what makes resumption exact and cheap.

Remainder. With drop_remainder (training), the rows of an epoch that do not fill a
whole global batch, fewer than `global_batch_size` rows, are not used in that epoch
(different rows each epoch, since rows are shuffled). Without it (evaluation), the last
batch is filled with all-padding rows.

Sharding. Process p of n gets rows [p*B/n, (p+1)*B/n) of each global batch: the slice
`jax.make_array_from_process_local_data` expects for a batch-sharded array.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data import store
from data.prepare import load_meta

STATE_VERSION = 1


class PackedBatchIterator:
    """Yields per-process batches {inputs, targets, weights, positions, segment_ids} [B, L].

    `get_state()` returns a small JSON-able dict; `set_state()` on an iterator built with
    the same arguments resumes exactly, on any process.
    """

    def __init__(
        self,
        prepared_dir: str | os.PathLike,
        split: str,
        seq_len: int,
        global_batch_size: int,
        *,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
        shuffle: bool = True,
        drop_remainder: bool = True,
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by {process_count} processes"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        meta = load_meta(prepared_dir)
        self.split = split
        self.data = store.TokenizedSplit.open(
            Path(prepared_dir, split), np.dtype(meta["token_dtype"])
        )
        self.pad_id = meta["tokenizer"]["pad_id"]
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.seed = seed
        self.num_epochs = num_epochs
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self._doc_lengths = np.diff(self.data.offsets)
        self._epoch = 0
        self._batch = 0
        self._cached_epoch: int | None = None
        stream_tokens = int(self.data.offsets[-1])
        # rows per epoch: targets are stream tokens 1..N-1, L per row
        self.rows_per_epoch = -(-(stream_tokens - 1) // seq_len)
        full, extra = divmod(self.rows_per_epoch, global_batch_size)
        self.batches_per_epoch = full + (0 if drop_remainder or not extra else 1)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"split {split!r} has {self.rows_per_epoch} rows of {seq_len} tokens, fewer than "
                f"one global batch of {global_batch_size}; use a smaller batch or seq_len"
            )

    # --- epoch layout ---
    def _layout(self, epoch: int) -> None:
        if self._cached_epoch == epoch:
            return
        rng = np.random.default_rng([self.seed, epoch])
        n_docs = self.data.num_docs
        doc_order = rng.permutation(n_docs) if self.shuffle else np.arange(n_docs)
        self._doc_order = doc_order
        self._doc_starts = np.zeros(n_docs + 1, dtype=np.int64)  # in this epoch's stream
        np.cumsum(self._doc_lengths[doc_order], out=self._doc_starts[1:])
        rows = self.rows_per_epoch
        self._row_order = rng.permutation(rows) if self.shuffle else np.arange(rows)
        self._cached_epoch = epoch

    def _rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Packs the given rows of the current epoch; a row index >= rows_per_epoch is padding."""
        L = self.seq_len
        stream_len = self._doc_starts[-1]
        p = rows[:, None].astype(np.int64) * L + np.arange(L + 1)  # [B, L+1] stream offsets
        valid = (p < stream_len) & (rows < self.rows_per_epoch)[:, None]
        p = np.minimum(p, stream_len - 1)
        doc = np.searchsorted(self._doc_starts, p, side="right") - 1  # index in epoch order
        offset = p - self._doc_starts[doc]  # position within the document
        tokens = self.data.tokens[self.data.offsets[self._doc_order[doc]] + offset]
        tokens = np.where(valid, tokens, self.pad_id).astype(np.int32)

        in_valid = valid[:, :L]
        same_doc = doc[:, 1:] == doc[:, :L]
        first = doc[:, :1]
        segment_ids = np.where(in_valid, doc[:, :L] - first + 1, 0).astype(np.int32)
        # a document continued from the previous row restarts at 0 in this row
        positions = np.where(doc[:, :L] == first, offset[:, :L] - offset[:, :1], offset[:, :L])
        positions = np.where(in_valid, positions, 0).astype(np.int32)
        weights = (in_valid & valid[:, 1:] & same_doc).astype(np.float32)
        return {
            "inputs": tokens[:, :L],
            "targets": tokens[:, 1:],
            "weights": weights,
            "positions": positions,
            "segment_ids": segment_ids,
        }

    def global_rows(self, epoch: int, batch: int) -> np.ndarray:
        """Row indices of global batch `batch` of `epoch` (padding rows >= rows_per_epoch)."""
        self._layout(epoch)
        start = batch * self.global_batch_size
        idx = np.arange(start, start + self.global_batch_size)
        return np.where(
            idx < self.rows_per_epoch,
            self._row_order[np.minimum(idx, self.rows_per_epoch - 1)],
            self.rows_per_epoch,
        )

    # --- iteration ---
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batch >= self.batches_per_epoch:
            self._epoch += 1
            self._batch = 0
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        rows = self.global_rows(self._epoch, self._batch)
        lo = self.process_index * self.local_batch_size
        batch = self._rows(rows[lo : lo + self.local_batch_size])
        self._batch += 1
        return batch

    # --- checkpointing ---
    def _config(self) -> dict:
        return {
            "split": self.split,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
            "num_docs": self.data.num_docs,
        }

    def get_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batch": self._batch,
            **self._config(),
        }

    def set_state(self, state: dict) -> None:
        mismatch = {k: (state.get(k), v) for k, v in self._config().items() if state.get(k) != v}
        if mismatch:
            raise ValueError(
                f"iterator state is for another configuration (saved, now): {mismatch}"
            )
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])

    @property
    def epoch(self) -> int:
        return self._epoch


def make_train_iterator(
    prepared_dir: str | os.PathLike,
    split: str,
    seq_len: int,
    global_batch_size: int,
    *,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
) -> PackedBatchIterator:
    """Shuffled, packed training batches; process index/count default to JAX's."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    return PackedBatchIterator(
        prepared_dir,
        split,
        seq_len,
        global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
    )


def make_eval_iterator(
    prepared_dir: str | os.PathLike,
    seq_len: int,
    global_batch_size: int,
    *,
    split: str = "val",
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The fixed evaluation set: one unshuffled pass, last batch padded, the same every call.

    Every token of the split is scored exactly once (up to `max_batches`).
    """
    it = PackedBatchIterator(
        prepared_dir,
        split,
        seq_len,
        global_batch_size,
        seed=0,
        process_index=process_index,
        process_count=process_count,
        num_epochs=1,
        shuffle=False,
        drop_remainder=False,
    )
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


def bytes_per_token(prepared_dir: str | os.PathLike, split: str = "val") -> float:
    """UTF-8 bytes of text per loss-bearing target token of a split.

    Loss-bearing targets are each document's tokens plus its eos (see `weights`), so over a
    full pass: bits per byte = mean loss per weighted token (nats) / ln 2 / bytes_per_token.
    """
    stats = load_meta(prepared_dir)["splits"][split]
    return stats["bytes"] / stats["target_tokens"]


def state_to_json(state: dict) -> str:
    return json.dumps(state, sort_keys=True)
