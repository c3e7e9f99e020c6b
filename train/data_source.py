"""The training loop's view of the data: prepared on first use, then packed batches on the mesh."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from ml_collections import ConfigDict

from data import pipeline
from data.prepare import (
    ensure_prepared,
    is_existing,
    load_prepared_tokenizer,
    prepared_tokenizer_files,
)
from train import sharding

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DataSource:
    tokenizer: Any  # encode / decode / vocab_size / pad_id / bos_id / eos_id
    train_iter: pipeline.PackedBatchIterator  # get_state() / set_state() for exact resume
    eval_batches: list[dict]  # the fixed validation set, as global jax.Arrays
    bytes_per_token: float  # of the validation text, for bits per byte
    mesh: Any
    tokenizer_files: list[Path]  # what the checkpoints record the identity of

    def next_train_batch(self) -> dict:
        return sharding.to_global_batch(next(self.train_iter), self.mesh)


def data_dir(config: ConfigDict, workdir: Path) -> Path:
    return Path(config.data.dir).expanduser().absolute() if config.data.dir else workdir / "data"


def tokenizer_option(config: ConfigDict) -> str:
    """data.tokenizer, except in continued pretraining (train.init_from) when it names a kind
    to train: then the source checkpoint's own tokenizer, since a newly trained one could
    never match the model (data.prepare's existing-tokenizer mode)."""
    dc, tc = config.data, config.train
    if tc.get("init_from") and not is_existing(dc.tokenizer):
        return str(Path(tc.init_from).expanduser().absolute() / "tokenizer")
    return dc.tokenizer


def build_data(config: ConfigDict, workdir: Path, mesh: Mesh) -> DataSource:
    """Prepares the corpus and tokenizer if missing, then opens the train and eval streams.

    Bits per byte use the bytes per token of the whole validation split, also
    when evaluation reads only its first `eval_batches` batches.
    """
    dc, tc = config.data, config.train
    directory = data_dir(config, workdir)
    tokenizer = tokenizer_option(config)
    if tokenizer != dc.tokenizer:
        log.info("the data is tokenized with train.init_from's tokenizer, %s", tokenizer)
    # One process prepares; the others wait, then find it complete.
    if jax.process_index() == 0:
        ensure_prepared(dc.corpus, directory, vocab_size=dc.vocab_size, tokenizer=tokenizer)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("data prepared")
    ensure_prepared(dc.corpus, directory, vocab_size=dc.vocab_size, tokenizer=tokenizer)
    common = dict(
        seq_len=dc.seq_len,
        global_batch_size=tc.global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train_iter = pipeline.make_train_iterator(directory, "train", seed=tc.seed, **common)
    eval_batches = [
        sharding.to_global_batch(batch, mesh)
        for batch in pipeline.make_eval_iterator(directory, max_batches=tc.eval_batches, **common)
    ]
    return DataSource(
        load_prepared_tokenizer(directory),
        train_iter,
        eval_batches,
        pipeline.bytes_per_token(directory, "val"),
        mesh,
        prepared_tokenizer_files(directory),
    )
