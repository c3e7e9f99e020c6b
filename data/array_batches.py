"""Batches drawn from in-memory arrays (the post-training sets), with a saveable position.

Rows are drawn without replacement and reshuffled every epoch; epoch e's order depends on
(seed, e) alone, so batch k is a function of k and a resumed stage continues the same
sequence. Each process returns only its share of every global batch (rows
[p*B/P, (p+1)*B/P)), as the packed-text iterator does, so a multi-process run sees the same
global batches as a single process.
"""

from __future__ import annotations

import numpy as np


class ArrayBatches:
    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))
        if self.n < global_batch_size:
            raise ValueError(
                f"only {self.n} examples for a batch of {global_batch_size}; lower the "
                "stage's train.global_batch_size or provide more data"
            )
        if global_batch_size % process_count:
            raise ValueError(
                f"global batch {global_batch_size} does not split over {process_count} processes"
            )
        self.batch_size, self.seed = global_batch_size, seed
        self.per_process = global_batch_size // process_count
        self.offset = process_index * self.per_process
        self.position = 0  # batches drawn so far

    def __iter__(self) -> ArrayBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        per_epoch = self.n // self.batch_size
        epoch, i = divmod(self.position, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        start = i * self.batch_size + self.offset
        rows = order[start : start + self.per_process]
        self.position += 1
        return {k: v[rows] for k, v in self.arrays.items()}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])
