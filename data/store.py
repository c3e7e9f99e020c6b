"""On-disk formats of a prepared dataset.

DIR/text/      curated documents as a TFDS dataset in array_record format (splits train,
               val; features name, text). TFDS writes and reads array_record without
               TensorFlow; reads are by random access (`tfds` data source).
DIR/<split>/   tokens.bin: every document's ids as [bos] + ids + [eos], concatenated,
               uint16 (uint32 for vocabularies over 65536), memory-mapped by the loader;
               offsets.npy: int64 [num_docs + 1] start of each document in tokens.bin.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

TEXT_DATASET = "curated_corpus"


def _tfds_builder_class():
    import tensorflow_datasets as tfds  # lazy: a second of import time

    class CuratedCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Curated documents of one prepare() run; order is the curation order."""

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, splits: dict[str, Sequence[dict]] | None = None, **kwargs):
            self._splits = splits
            super().__init__(**kwargs)

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"name": tfds.features.Text(), "text": tfds.features.Text()}
            )
            return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(docs) for name, docs in self._splits.items()}

        def _generate_examples(self, docs):
            yield from enumerate(docs)

        # TFDS announces a download of "Unknown size" and its end; nothing is downloaded here
        def _log_download_bytes(self):
            pass

        def _log_download_done(self):
            pass

    return CuratedCorpus


def write_text_dataset(root: Path, splits: dict[str, Sequence[dict]]) -> None:
    """Writes {split: [{"name", "text"}, ...]} as an array_record TFDS dataset under root."""
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(False)  # the caller shows its own progress
    builder = _tfds_builder_class()(splits=splits, data_dir=str(root), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(verify_ssl=False),
    )


def read_text_dataset(root: Path, split: str) -> Sequence[dict[str, bytes]]:
    """Random-access source of {"name": bytes, "text": bytes} records."""
    builder = _tfds_builder_class()(data_dir=str(root))
    return builder.as_data_source(split=split)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_tokens(
    split_dir: Path, docs: Iterable[Sequence[int]], bos_id: int, eos_id: int, dtype: np.dtype
) -> dict:
    """Streams tokenized documents to tokens.bin/offsets.npy; returns token counts."""
    split_dir.mkdir(parents=True, exist_ok=True)
    offsets = [0]
    with open(split_dir / "tokens.bin", "wb") as f:
        for ids in docs:
            row = np.empty(len(ids) + 2, dtype=dtype)
            row[0], row[-1] = bos_id, eos_id
            row[1:-1] = ids
            f.write(row.tobytes())
            offsets.append(offsets[-1] + len(row))
    np.save(split_dir / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    return {"docs": len(offsets) - 1, "tokens": offsets[-1]}


@dataclasses.dataclass
class TokenizedSplit:
    tokens: np.ndarray  # memory-mapped, 1-D
    offsets: np.ndarray  # int64 [num_docs + 1]

    @classmethod
    def open(cls, split_dir: str | os.PathLike, dtype: np.dtype) -> TokenizedSplit:
        split_dir = Path(split_dir)
        offsets = np.load(split_dir / "offsets.npy")
        tokens = np.memmap(split_dir / "tokens.bin", dtype=dtype, mode="r")
        if len(tokens) != offsets[-1]:
            raise ValueError(f"{split_dir}: tokens.bin does not match offsets.npy")
        return cls(tokens, offsets)

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]])
