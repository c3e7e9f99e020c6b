"""Hugging Face checkpoints in and out (GPT-2 and Llama families, safetensors only).

  python -m experiments.convert import --src=HF_DIR --workdir=DIR
  python -m experiments.convert export --workdir=DIR --dst=HF_DIR [--max_shard_bytes=N]

`import` makes DIR an ordinary checkpoint of this project (params at step 0,
the model config, and the source's tokenizer under DIR/tokenizer/), which
sampling and every training stage can start from. `export` writes
config.json, generation_config.json, model*.safetensors (with an index above
--max_shard_bytes) and the tokenizer files that transformers reads.
Neither overwrites anything: the destination must not exist, and it appears
whole or not at all.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import jax
from absl import app, flags

import model.hf as hf
from data.cli import parse_flags
from data.hf_tokenizer import CONFIG_FILE, is_hf_tokenizer_json
from experiments import cli
from model.config import ModelConfig
from model.hf import safetensors_io
from model.transformer import LanguageModel
from train import sharding, state
from train.saved_model import load_model, save_model
from train.sharding import MeshConfig

FLAGS = flags.FLAGS

COMMANDS = ("import", "export")


def import_checkpoint(src: str | Path, workdir: str | Path) -> None:
    """HF_DIR -> a checkpoint of this project in `workdir` (which must not exist)."""
    src, workdir = Path(src), Path(workdir)
    if workdir.exists():
        raise FileExistsError(f"{workdir} already exists; choose a new --workdir")
    cfg, family = hf.read_config(src)
    params = hf.load_params(src, cfg, import_shardings(cfg), family)
    with tempfile.TemporaryDirectory() as scratch, hf.staged_directory(workdir) as tmp:
        tokenizer_files = hf.tokenizer_files(src, scratch)
        meta = {"imported_from": {"path": str(src.absolute()), "model_type": family.MODEL_TYPE}}
        save_model(tmp, params, cfg, tokenizer_files, meta)


def export_checkpoint(
    workdir: str | Path,
    dst: str | Path,
    max_shard_bytes: int = safetensors_io.DEFAULT_MAX_SHARD_BYTES,
    dtype: str | None = None,
) -> list[Path]:
    """A checkpoint of this project -> an HF model directory `dst` (which must not exist)."""
    workdir, dst = Path(workdir), Path(dst)
    if max_shard_bytes < 1:
        raise ValueError(f"--max_shard_bytes must be at least 1 (bytes), not {max_shard_bytes}")
    if not workdir.exists():
        raise FileNotFoundError(f"{workdir} does not exist")
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new --dst")
    loaded = load_model(workdir)
    hf.family_of(loaded.cfg).check_exportable(loaded.cfg)  # before reading anything else
    tok = loaded.tokenizer
    special_ids = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
    }
    files = hf_tokenizer_files(workdir / "tokenizer")
    return hf.export(dst, loaded.params, loaded.cfg, special_ids, files, max_shard_bytes, dtype)


def hf_tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files transformers can read: a sentencepiece model, or a
    tokenizer.json with its tokenizer_config.json (a character tokenizer has none)."""
    files = []
    for path in sorted(directory.glob("*")) if directory.exists() else []:
        if path.name == CONFIG_FILE:
            files.append(path)
        elif path.suffix == ".json":
            if is_hf_tokenizer_json(json.loads(path.read_text())):
                files.append(path)
        elif path.suffix == ".model":
            files.append(path)
    return files


def import_shardings(cfg: ModelConfig) -> Any:
    """Parameters split over every device (FSDP) where the shapes divide, else replicated."""
    init = state.init_fn(LanguageModel(cfg))
    abstract = state.strip_axis_names(jax.eval_shape(init, jax.random.key(0)))
    fsdp = state.param_shardings(init, sharding.make_mesh(MeshConfig(data=1, fsdp=-1)))
    try:
        sharding.check_divisible(abstract, fsdp)
        return fsdp
    except ValueError:
        return state.param_shardings(init, sharding.make_mesh(MeshConfig()))


def main(argv: list[str]) -> None:
    cli.quiet_library_logs()
    command = argv[1] if len(argv) == 2 else None

    def run() -> None:
        if command == "import":
            _need("src", "workdir")
            import_checkpoint(FLAGS.src, FLAGS.workdir)
            print(f"imported {FLAGS.src} into {FLAGS.workdir}")
        elif command == "export":
            _need("workdir", "dst")
            files = export_checkpoint(FLAGS.workdir, FLAGS.dst, FLAGS.max_shard_bytes, FLAGS.dtype)
            print(f"exported {FLAGS.workdir} to {FLAGS.dst}: {', '.join(f.name for f in files)}")
        else:
            raise ValueError(f"usage: python -m experiments.convert {{{'|'.join(COMMANDS)}}} ...")

    cli.run_mapped(run)


def _need(*names: str) -> None:
    for name in names:
        if not getattr(FLAGS, name):
            raise ValueError(f"--{name} is required")


def define_flags() -> None:
    """Defined only when run as a program, so that tests can import this module
    beside others that define flags of the same names."""
    flags.DEFINE_string("src", None, "import: a Hugging Face model directory")
    flags.DEFINE_string("workdir", None, "this project's checkpoint directory (import: created)")
    flags.DEFINE_string("dst", None, "export: the Hugging Face model directory to create")
    flags.DEFINE_integer(
        "max_shard_bytes",
        safetensors_io.DEFAULT_MAX_SHARD_BYTES,
        "export: the most bytes in one safetensors file",
    )
    flags.DEFINE_enum(
        "dtype", None, ["float32", "bfloat16"], "export: stored dtype (default: the params')"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=lambda argv: parse_flags(argv, positional=1))
