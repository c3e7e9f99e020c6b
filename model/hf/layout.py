"""One name-mapping table per family: how each HF tensor becomes a parameter here.

A `Rule` says: parameter `ours` (a "/"-joined path in the params tree) is the
HF tensor `hf`, optionally block `part` of `parts` along `part_axis` (GPT-2's
fused q/k/v), reshaped to `shape`, transposed by `perm`, and zero-padded
along `pad_axis` (the vocabulary, see `ModelConfig.padded_vocab`). Rules whose names
hold "{i}" apply to every layer. The same rule read backwards exports, so the
two directions cannot disagree.

With `scan_layers` the per-layer parameters live stacked under
"decoder/blocks" instead of "decoder/block_{i}"; the rules are the same.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from model.config import ModelConfig
from model.hf import safetensors_io as st


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF tensor name; "{i}" for the layer index
    ours: str  # parameter path here, e.g. "decoder/block_{i}/attn/query"
    hf_shape: tuple[int, ...]  # the whole HF tensor
    shape: tuple[int, ...] | None = None  # the (part of the) HF tensor reshaped, HF axis order
    perm: tuple[int, ...] | None = None  # then transposed to our axis order
    part: int = 0
    parts: int = 1
    part_axis: int = 0
    pad_axis: int | None = None  # our vocabulary axis, zero-padded to pad_to rows
    pad_to: int = 0

    def layer(self, i: int) -> Rule:
        return dataclasses.replace(self, hf=self.hf.format(i=i), ours=self.ours.format(i=i))

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def view(self, stored: st.LazyTensor) -> st.LazyTensor:
        """Our parameter as a lazy view of the stored HF tensor."""
        if tuple(stored.shape) != self.hf_shape:
            raise ValueError(
                f"tensor {self.hf} has shape {tuple(stored.shape)}, but the config implies "
                f"{self.hf_shape}"
            )
        view = stored
        if self.parts > 1:
            view = st.Part(view, self.part_axis, self.part, self.parts)
        if self.shape is not None:
            view = st.Reshaped(view, self.shape)
        if self.perm is not None:
            view = st.Transposed(view, self.perm)
        if self.pad_axis is not None:
            view = st.Padded(view, self.pad_axis, self.pad_to)
        return view

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """Our parameter as (its part of) the HF tensor: `view` backwards."""
        if self.pad_axis is not None:
            stored = self.hf_shape if self.perm is None else [self.hf_shape[p] for p in self.perm]
            ours = np.take(ours, np.arange(stored[self.pad_axis]), axis=self.pad_axis)
        if self.perm is not None:
            ours = ours.transpose(np.argsort(self.perm))
        part_shape = list(self.hf_shape)
        part_shape[self.part_axis] //= self.parts
        return ours.reshape(part_shape)


def expand(rules: Sequence[Rule], n_layers: int) -> list[Rule]:
    """The model-wide rules, then the per-layer ones repeated for every layer."""
    out = [r for r in rules if not r.per_layer]
    for i in range(n_layers):
        out += [r.layer(i) for r in rules if r.per_layer]
    return out


def _scanned_path(path: str) -> tuple[str, int | None]:
    """'decoder/block_3/attn/query' -> ('decoder/blocks/attn/query', 3)."""
    match = re.search(r"/block_(\d+)/", path)
    if match is None:
        return path, None
    return path.replace(match.group(0), "/blocks/"), int(match.group(1))


def param_views(
    rules: Sequence[Rule], n_layers: int, cfg: ModelConfig, read: Callable[[str], Any]
) -> dict:
    """{our path: lazy view}, stacking layers when cfg.scan_layers; `read(name)` opens a tensor."""
    views: dict[str, Any] = {}
    stacks: dict[str, dict[int, Any]] = {}
    for rule in expand(rules, n_layers):
        view = rule.view(read(rule.hf))
        path, layer = _scanned_path(rule.ours) if cfg.scan_layers else (rule.ours, None)
        if layer is None:
            views[path] = view
        else:
            stacks.setdefault(path, {})[layer] = view
    for path, layers in stacks.items():
        views[path] = st.Stacked([layers[i] for i in range(n_layers)])
    return views


def hf_tensors(
    rules: Sequence[Rule],
    n_layers: int,
    cfg: ModelConfig,
    get: Callable[[str, int | None], np.ndarray],
    dtype: np.dtype,
) -> dict[str, st.TensorToWrite]:
    """{HF name: tensor to write}; `get(path, layer)` fetches our parameter (one
    layer of it when scanned, layer None otherwise).

    Fused HF tensors concatenate their parts in order.
    """
    parts: dict[str, list[Rule]] = {}
    for rule in expand(rules, n_layers):
        parts.setdefault(rule.hf, []).append(rule)

    def compute(group: list[Rule]) -> Callable[[], np.ndarray]:
        def run():
            blocks = []
            for rule in sorted(group, key=lambda r: r.part):
                path, layer = _scanned_path(rule.ours) if cfg.scan_layers else (rule.ours, None)
                blocks.append(rule.to_hf(np.asarray(get(path, layer))))
            return np.concatenate(blocks, axis=group[0].part_axis)

        return run

    return {
        name: st.TensorToWrite(group[0].hf_shape, dtype, compute(group))
        for name, group in parts.items()
    }


def flat_paths(tree: Any) -> dict[str, Any]:
    """{"a/b/c": leaf} for a nested dict of parameters."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): leaf for path, leaf in flat}


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree
