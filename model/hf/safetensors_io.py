"""Reading and writing Hugging Face safetensors checkpoints, one file or sharded.

Reading is lazy: `open_checkpoint` maps every tensor name to its file, and a
`LazyTensor` reads only the slice it is indexed with (safetensors memory-maps
the file and copies out just those bytes). Views compose without reading
anything: `Part` (one block of a fused tensor), `Reshaped` (an axis split in
two or more), `Transposed`, `Padded` (zero rows after the end) and `Stacked`
(layers on a new leading axis), so
a device can ask a parameter's view for its own shard alone.

Writing plans the files from the tensors' sizes first, then materialises one
file's tensors at a time, so host memory holds at most one file's worth.
Files are named as `save_pretrained` names them, with
`model.safetensors.index.json` when there is more than one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}

Index = tuple[slice, ...]  # one slice with explicit start and stop per axis


class LazyTensor(Protocol):
    shape: tuple[int, ...]
    dtype: np.dtype

    def __getitem__(self, index: Index) -> np.ndarray: ...


def full_index(shape: Sequence[int]) -> Index:
    return tuple(slice(0, n) for n in shape)


def normalize_index(index: tuple, shape: Sequence[int]) -> Index:
    """jax's callback indices (slice(None) etc.) as explicit unit-step slices."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided index {s} is not supported")
        out.append(slice(start, stop))
    return tuple(out)


class Stored:
    """One tensor of a safetensors file, read slice by slice."""

    def __init__(self, handle, name: str):
        self._slice = handle.get_slice(name)
        self.name = name
        self.shape = tuple(self._slice.get_shape())
        dtype = self._slice.get_dtype()
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {name} has dtype {dtype}; supported: {sorted(_DTYPES)}")
        self.dtype = _DTYPES[dtype]

    def __getitem__(self, index: Index) -> np.ndarray:
        if not self.shape:
            return np.asarray(self._slice[:]).reshape(())
        return np.asarray(self._slice[index])


class Part:
    """Block `index` of `count` equal blocks along `axis` (e.g. q of a fused q/k/v)."""

    def __init__(self, base: LazyTensor, axis: int, index: int, count: int):
        self.base, self.axis = base, axis
        self.width = base.shape[axis] // count
        self.offset = index * self.width
        self.shape = tuple(self.width if a == axis else n for a, n in enumerate(base.shape))
        self.dtype = base.dtype

    def __getitem__(self, index: Index) -> np.ndarray:
        s = index[self.axis]
        shifted = slice(s.start + self.offset, s.stop + self.offset)
        return self.base[index[: self.axis] + (shifted,) + index[self.axis + 1 :]]


class Reshaped:
    """`base.reshape(shape)` where each base axis splits into consecutive new axes."""

    def __init__(self, base: LazyTensor, shape: Sequence[int]):
        self.base, self.shape, self.dtype = base, tuple(shape), base.dtype
        self.groups: list[tuple[int, ...]] = []  # new axes of each base axis
        axis = 0
        for n in base.shape:
            group = [axis]
            size = self.shape[axis]
            while size < n:
                axis += 1
                group.append(axis)
                size *= self.shape[axis]
            if size != n:
                raise ValueError(f"cannot view shape {base.shape} as {self.shape}")
            self.groups.append(tuple(group))
            axis += 1
        if axis != len(self.shape):
            raise ValueError(f"cannot view shape {base.shape} as {self.shape}")

    def __getitem__(self, index: Index) -> np.ndarray:
        # Each group reads the rows its first axis selects, all of its other axes,
        # then selects within them; shardings never split the inner axes (head_dim).
        base_index, shape, inner = [], [], []
        for group in self.groups:
            first, rest = index[group[0]], group[1:]
            rest_size = math.prod(self.shape[a] for a in rest)
            base_index.append(slice(first.start * rest_size, first.stop * rest_size))
            shape.extend([first.stop - first.start, *(self.shape[a] for a in rest)])
            inner.extend([slice(None), *(index[a] for a in rest)])
        return self.base[tuple(base_index)].reshape(shape)[tuple(inner)]


class Transposed:
    """`base.transpose(perm)`: axis j of the view is axis perm[j] of base."""

    def __init__(self, base: LazyTensor, perm: Sequence[int]):
        self.base, self.perm = base, tuple(perm)
        self.shape = tuple(base.shape[p] for p in self.perm)
        self.dtype = base.dtype

    def __getitem__(self, index: Index) -> np.ndarray:
        base_index = [slice(None)] * len(self.perm)
        for j, p in enumerate(self.perm):
            base_index[p] = index[j]
        return self.base[tuple(base_index)].transpose(self.perm)


class Padded:
    """`base` zero-padded at the end of `axis` to `size` (the padded vocabulary)."""

    def __init__(self, base: LazyTensor, axis: int, size: int):
        self.base, self.axis, self.dtype = base, axis, base.dtype
        self.shape = tuple(size if a == axis else n for a, n in enumerate(base.shape))

    def __getitem__(self, index: Index) -> np.ndarray:
        s, stored = index[self.axis], self.base.shape[self.axis]
        inside = slice(min(s.start, stored), min(s.stop, stored))
        out = self.base[index[: self.axis] + (inside,) + index[self.axis + 1 :]]
        pad = [(0, 0)] * out.ndim
        pad[self.axis] = (0, (s.stop - s.start) - (inside.stop - inside.start))
        return np.pad(out, pad) if pad[self.axis][1] else out


class Stacked:
    """Equal-shaped tensors stacked on a new leading axis (scanned layers)."""

    def __init__(self, parts: Sequence[LazyTensor]):
        self.parts = list(parts)
        self.shape = (len(self.parts), *self.parts[0].shape)
        self.dtype = self.parts[0].dtype

    def __getitem__(self, index: Index) -> np.ndarray:
        layers = range(index[0].start, index[0].stop)
        return np.stack([self.parts[i][index[1:]] for i in layers])


class Checkpoint:
    """The tensors of an HF model directory (`model.safetensors` or an index)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index_path, single_path = directory / INDEX_FILE, directory / SINGLE_FILE
        if index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            self.files = {name: directory / f for name, f in weight_map.items()}
        elif single_path.exists():
            with safe_open(single_path, framework="np") as f:
                self.files = {name: single_path for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} "
                "(only safetensors checkpoints are read)"
            )
        for path in sorted(set(self.files.values())):
            if not path.exists():
                raise FileNotFoundError(f"{path}, listed in {index_path}, does not exist")
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return sorted(self.files)

    def tensor(self, name: str) -> Stored:
        if name not in self.files:
            raise ValueError(f"tensor {name} is missing from the checkpoint")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="np")
        return Stored(self._handles[path], name)


class TensorToWrite:
    """A tensor to write: its shape and dtype now, its values when its file is written."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, compute: Callable[[], np.ndarray]):
        self.shape, self.dtype, self.compute = tuple(shape), np.dtype(dtype), compute

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Names grouped into files of at most max_shard_bytes (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_checkpoint(
    directory: str | Path,
    tensors: dict[str, TensorToWrite],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """Writes `tensors` into `directory` (which must exist); returns the files written."""
    directory = Path(directory)
    shards = plan_shards({n: t.nbytes for n, t in tensors.items()}, max_shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        arrays = {}
        for name in shard:
            array = np.ascontiguousarray(tensors[name].compute(), dtype=tensors[name].dtype)
            if array.shape != tensors[name].shape:
                raise ValueError(
                    f"{name}: computed shape {array.shape}, planned {tensors[name].shape}"
                )
            arrays[name] = array
            weight_map[name] = file_name
        save_file(arrays, directory / file_name, metadata={"format": "pt"})
        del arrays
    if len(shards) > 1:
        total = sum(t.nbytes for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / n for n in names]
