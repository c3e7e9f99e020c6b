"""The training loop's view of the data: prepared on first use, then packed batches on the mesh."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict


@dataclasses.dataclass
class DataSource:
    tokenizer: Any  # encode / decode / vocab_size / pad_id / bos_id / eos_id
    train_iter: Any  # numpy batches; get_state() / set_state() for exact resume
    eval_batches: list[dict]  # the fixed validation set, as global jax.Arrays
    bytes_per_token: float | None  # of the validation text, for bits per byte
    mesh: Any

    def next_train_batch(self) -> dict:
        from data.pipeline import to_global_batch

        return to_global_batch(next(self.train_iter), self.mesh)


def data_dir(config: ConfigDict, workdir: Path) -> Path:
    return Path(config.data.dir).expanduser().absolute() if config.data.dir else workdir / "data"


def build_data(config: ConfigDict, workdir: Path, mesh) -> DataSource:
    """Prepares the corpus and tokenizer if missing, then opens the train and eval streams."""
    from data import pipeline
    from data.prepare import ensure_prepared, load_prepared_tokenizer

    dc, tc = config.data, config.train
    directory = data_dir(config, workdir)
    ensure_prepared(dc.corpus, directory, vocab_size=dc.vocab_size, tokenizer=dc.tokenizer)
    tokenizer = load_prepared_tokenizer(directory)
    common = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = pipeline.make_train_iterator(
        directory, "train", dc.seq_len, tc.global_batch_size, seed=tc.seed, **common
    )
    eval_batches = [
        pipeline.to_global_batch(b, mesh)
        for b in pipeline.make_eval_iterator(
            directory, dc.seq_len, tc.global_batch_size, max_batches=tc.eval_batches, **common
        )
    ]
    return DataSource(
        tokenizer, train_iter, eval_batches, pipeline.bytes_per_token(directory, "val"), mesh
    )
