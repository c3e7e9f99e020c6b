"""Hugging Face checkpoints in and out: GPT-2 and Llama families, safetensors only.

  cfg, family = read_config(hf_dir)             # config.json -> ModelConfig
  params = load_params(hf_dir, cfg, shardings)  # each device reads its own slice
  export(dst, params, cfg, special_ids)         # config.json, generation_config.json,
                                                # model*.safetensors (+ index)

`shardings` is the tree of NamedShardings the parameters should have, e.g.
`train.state.param_shardings(...)`; the model layer does not choose them.
Nothing here unpickles anything: safetensors holds raw arrays only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig
from model.hf import gpt2, layout, llama
from model.hf import safetensors_io as st
from model.transformer import LanguageModel

FAMILIES: dict[str, ModuleType] = {gpt2.MODEL_TYPE: gpt2, llama.MODEL_TYPE: llama}
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object of fields")
    return value


def read_config(hf_dir: str | Path) -> tuple[ModelConfig, ModuleType]:
    """The ModelConfig and family module of an HF model directory's config.json."""
    path = Path(hf_dir) / "config.json"
    hf = read_json(path)
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{path}: model_type={model_type!r} is not supported; supported: {sorted(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    architectures = hf.get("architectures") or [family.ARCHITECTURE]
    if architectures != [family.ARCHITECTURE]:
        raise ValueError(
            f"{path}: architectures={architectures} is not supported; "
            f"only {family.ARCHITECTURE} for model_type {model_type!r}"
        )

    def require(key: str):
        if hf.get(key) is None:
            raise ValueError(f"{path} lacks the field {key!r}")
        return hf[key]

    cfg = family.config_from_hf(hf, require)
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    # Parameters are kept in float32 (exact for any stored dtype, and what training
    # updates); activations in the dtype the model was published in.
    return cfg.replace(dtype=_DTYPE_NAMES.get(dtype, "float32"), param_dtype="float32"), family


def family_of(cfg: ModelConfig) -> ModuleType:
    """GPT-2 for learned positions, Llama for RoPE."""
    return gpt2 if cfg.positional == "learned" else llama


def abstract_params(cfg: ModelConfig) -> Any:
    """Shapes and dtypes of this model's parameters (nothing allocated)."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    init = lambda t: nn.unbox(LanguageModel(cfg).init(jax.random.key(0), t)["params"])  # noqa: E731
    return jax.eval_shape(init, tokens)


def load_params(
    hf_dir: str | Path,
    cfg: ModelConfig,
    shardings: Any = None,
    family: ModuleType | None = None,
) -> Any:
    """The parameters, each placed by `shardings` (a params-shaped tree of shardings;
    None: the default device), each device reading only its slice of the files."""
    family = family or family_of(cfg)
    checkpoint = st.Checkpoint(hf_dir)
    stored = {}
    for name in checkpoint.names():
        canonical = family.canonical_name(name)
        if canonical is not None:
            stored[canonical] = name
    rules = family.rules(cfg)
    wanted = {r.hf for r in layout.expand(rules, cfg.n_layers)}
    missing = sorted(wanted - set(stored))
    if missing:
        raise ValueError(f"{hf_dir}: tensor {missing[0]} is missing ({len(missing)} missing)")
    unused = sorted(set(stored) - wanted - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if unused:
        raise ValueError(
            f"{hf_dir}: tensor {unused[0]} has no place in this model "
            f"({len(unused)} such tensors): an option this converter does not support?"
        )
    views = layout.param_views(rules, cfg.n_layers, cfg, lambda n: checkpoint.tensor(stored[n]))
    expected = layout.flat_paths(abstract_params(cfg))
    if set(views) != set(expected):
        raise ValueError(f"parameter paths differ: {sorted(set(views) ^ set(expected))[:3]}")
    placement = layout.flat_paths(shardings) if shardings is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    dtype = cfg.weight_dtype
    params = {}
    for path, view in views.items():
        if tuple(view.shape) != expected[path].shape:
            raise ValueError(
                f"{path}: the checkpoint gives shape {tuple(view.shape)}, "
                f"the model needs {expected[path].shape}"
            )

        def read(index, view=view):
            return view[st.normalize_index(index, view.shape)].astype(dtype)

        params[path] = jax.make_array_from_callback(
            tuple(view.shape), placement.get(path, default), read
        )
    return layout.unflatten(params)


def _with_zero_biases(params: Any, cfg: ModelConfig) -> tuple[Any, ModelConfig]:
    """A bias-free model as the same function with zero biases (GPT-2 always has them)."""
    if cfg.use_bias:
        return params, cfg
    biased = cfg.replace(use_bias=True)
    flat = layout.flat_paths(params)
    for path, shape in layout.flat_paths(abstract_params(biased)).items():
        if path not in flat:
            flat[path] = np.zeros(shape.shape, np.dtype(cfg.weight_dtype))
    return layout.unflatten(flat), biased


def export(
    dst: str | Path,
    params: Any,
    cfg: ModelConfig,
    special_ids: dict[str, int | None],
    extra_files: Sequence[Path] = (),
    max_shard_bytes: int = st.DEFAULT_MAX_SHARD_BYTES,
    dtype: str | None = None,
) -> list[Path]:
    """Writes an HF model directory `dst` (which must not exist); returns its files.

    `special_ids`: bos_token_id, eos_token_id, pad_token_id (None where absent).
    `extra_files` (tokenizer files) are copied beside the weights. `dtype` of
    the stored tensors defaults to the parameters' dtype.
    """
    family = family_of(cfg)
    family.check_exportable(cfg)
    if family is gpt2:
        params, cfg = _with_zero_biases(params, cfg)
    dtype = dtype or cfg.param_dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"export dtype {dtype!r} is not one of {sorted(_DTYPE_NAMES)}")
    flat = layout.flat_paths(params)

    def get(path: str, layer: int | None) -> np.ndarray:
        value = flat[path] if layer is None else flat[path][layer]
        return np.asarray(jax.device_get(value))

    tensors = layout.hf_tensors(family.rules(cfg), cfg.n_layers, cfg, get, jnp.dtype(dtype))
    config = {**family.config_to_hf(cfg), **special_ids, "torch_dtype": dtype}
    generation = {**special_ids, "_from_model_config": True}
    with staged_directory(dst) as tmp:
        st.write_checkpoint(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for file in extra_files:
            shutil.copyfile(file, tmp / Path(file).name)
    return sorted(Path(dst).iterdir())


def tokenizer_files(hf_dir: str | Path, scratch: str | Path) -> list[Path]:
    """The source's tokenizer as files this project loads (`data.tokenizer.load_tokenizer`).

    A sentencepiece `tokenizer.model` where there is one; otherwise
    `tokenizer.json` with a `tokenizer_config.json` naming bos, eos and pad
    tokens. Where the source's tokenizer_config.json lacks them, a completed
    copy is written to `scratch`: ids come from config.json, and pad is eos
    when the model has no pad token (GPT-2; padding is masked by segment ids,
    so the id only fills space).
    """
    hf_dir, scratch = Path(hf_dir), Path(scratch)
    if (hf_dir / "tokenizer.model").exists():
        return [hf_dir / "tokenizer.model"]
    if not (hf_dir / "tokenizer.json").exists():
        raise FileNotFoundError(f"{hf_dir} has neither tokenizer.model nor tokenizer.json")
    vocab = {t["id"]: t["content"] for t in read_json(hf_dir / "tokenizer.json")["added_tokens"]}
    model_cfg = read_json(hf_dir / "config.json")
    tok_cfg_path = hf_dir / "tokenizer_config.json"
    tok_cfg = read_json(tok_cfg_path) if tok_cfg_path.exists() else {}
    completed = dict(tok_cfg)
    for role in ("bos", "eos"):
        if not _token(tok_cfg.get(f"{role}_token")):
            token_id = model_cfg.get(f"{role}_token_id")
            token_id = token_id[0] if isinstance(token_id, list) else token_id
            if token_id not in vocab:
                raise ValueError(
                    f"{hf_dir}: no {role} token (tokenizer_config.json {role}_token, or "
                    f"config.json {role}_token_id naming an added token of tokenizer.json)"
                )
            completed[f"{role}_token"] = vocab[token_id]
    if not _token(completed.get("pad_token")):
        completed["pad_token"] = _token(completed["eos_token"])
    if completed == tok_cfg:
        return [hf_dir / "tokenizer.json", tok_cfg_path]
    out = scratch / "tokenizer_config.json"
    out.write_text(json.dumps(completed, indent=2) + "\n")
    return [hf_dir / "tokenizer.json", out]


def _token(entry) -> str | None:
    """tokenizer_config.json names a token as a string or as {"content": ...}."""
    return entry.get("content") if isinstance(entry, dict) else entry


@contextlib.contextmanager
def staged_directory(dst: str | Path) -> Iterator[Path]:
    """A temporary sibling of `dst`, renamed to `dst` when the block succeeds.

    `dst` must not exist; on failure the sibling is removed, so nothing is left.
    """
    dst = Path(dst).absolute()
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new destination")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            raise FileExistsError(f"{dst} appeared while writing; left it untouched")
        _ordinary_permissions(tmp)
        os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _ordinary_permissions(directory: Path) -> None:
    """mkdtemp and safetensors create owner-only entries; give them the umask's modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
