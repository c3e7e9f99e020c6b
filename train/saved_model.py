"""A stage directory as later stages and tools read it: its model, tokenizer and results.

`load_model` gives any stage's language model (or an imported one) for inference, with its
tokenizer; `load_params` the parameters alone, placed on a mesh; `finished_results` what a
stage recorded when it finished; `save_model` writes an imported model as a checkpoint of
step 0. The tokenizer files are copied to STAGE_DIR/tokenizer/ with their identity in the
checkpoints' meta (`store_tokenizer`), so a checkpoint is never decoded with another one.
The checkpoint layout itself is train/checkpoint.py's; everything here reads it read-only.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from data.tokenizer import AnyTokenizer, tokenizer_identity
from model.config import ModelConfig
from train import sharding
from train.checkpoint import Checkpointer, CheckpointError
from train.state import TrainState

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ tokenizer identity


def store_tokenizer(stage_dir: Path, files: list[Path]) -> dict:
    """Copies the tokenizer files to STAGE_DIR/tokenizer/ (atomically) and returns their
    identity; refuses a stage that already holds another tokenizer. Every process checks
    before process 0 writes, so all of them refuse alike."""
    identity = tokenizer_identity(files)
    target = stage_dir / "tokenizer"
    sharding.sync_processes("tokenizer check")
    held = tokenizer_identity(sorted(target.iterdir())) if target.is_dir() else None
    sharding.sync_processes("tokenizer checked")
    if held is not None and held["sha256"] != identity["sha256"]:
        raise ValueError(
            f"{stage_dir} was trained with another tokenizer (sha256 {held['sha256'][:12]}, "
            f"now {identity['sha256'][:12]} from {files[0].parent}); the prepared data "
            "changed since: restore it, or use a new workdir"
        )
    if held is None and jax.process_index() == 0:
        tmp = stage_dir / f".tokenizer.tmp-{time.time_ns()}"
        tmp.mkdir(parents=True)
        for path in files:
            shutil.copy2(path, tmp / path.name)
        tmp.rename(target)
    sharding.sync_processes("tokenizer stored")
    return identity


def load_stage_tokenizer(stage_dir: Path, meta: dict) -> AnyTokenizer:
    """The tokenizer a checkpoint was written with, checked against its recorded identity."""
    from data.tokenizer import load_tokenizer

    directory = stage_dir / "tokenizer"
    files = sorted(directory.iterdir()) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{directory} is missing: the checkpoint's tokenizer is gone")
    want = meta.get("tokenizer", {}).get("sha256")
    got = tokenizer_identity(files)["sha256"]
    if want and want != got:
        raise CheckpointError(
            f"the tokenizer in {directory} (sha256 {got[:12]}) is not the one the checkpoint "
            f"was trained with (sha256 {want[:12]}); restore the original tokenizer files"
        )
    return load_tokenizer(directory)


# ---------------------------------------------------------- models for inference and reuse


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    step: int
    meta: dict
    # Where the tokenizer's files are: STAGE_DIR/tokenizer, or the extended copy a stage
    # made (rlhf/chat_vocab.py); a stage stores these files as its own.
    tokenizer_dir: Path | None = None


def checkpointer_of(stage_dir: Path) -> Checkpointer:
    """A read-only view of STAGE_DIR/checkpoints (never creates or cleans anything)."""
    directory = Path(stage_dir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{stage_dir} holds no checkpoints; run that stage first")
    return Checkpointer(directory, keep_last=1, keep_best=0, async_save=False, read_only=True)


def choose_step(stage_dir: Path, steps: list[int], which: str) -> int | None:
    """None for the newest; for "best", the kept step with the lowest logged eval loss."""
    from train.metrics_writer import best_eval_step

    if which not in ("latest", "best"):
        raise ValueError(f"checkpoint must be 'latest' or 'best', got {which!r}")
    metrics = Path(stage_dir) / "metrics.jsonl"
    if which == "latest" or not metrics.exists():  # an import has no history to choose by
        return None
    best = best_eval_step(metrics, steps)
    if best is None:
        log.warning("no evaluated checkpoint in %s; taking the newest", stage_dir)
    return best


def chosen_step(stage_dir: Path, which: str = "latest") -> int:
    """The step `load_params(stage_dir, ..., which)` reads if every checkpoint is readable."""
    ckpt = checkpointer_of(stage_dir)
    try:
        steps = ckpt.steps()
    finally:
        ckpt.close()
    if not steps:
        raise FileNotFoundError(f"{stage_dir} holds no checkpoints; run that stage first")
    return choose_step(stage_dir, steps, which) or steps[-1]


def load_params(
    stage_dir: Path, abstract_params: Any, which: str = "latest"
) -> tuple[int, Any, dict]:
    """(step, params, meta) of a stage's checkpoint, params only, placed as
    `abstract_params`' shardings say."""
    ckpt = checkpointer_of(stage_dir)
    try:
        return ckpt.restore_params(abstract_params, choose_step(stage_dir, ckpt.steps(), which))
    finally:
        ckpt.close()


def read_latest_meta(stage_dir: Path) -> dict:
    return _latest_meta(stage_dir)[1]


def _latest_meta(stage_dir: Path) -> tuple[int, dict]:
    ckpt = checkpointer_of(stage_dir)
    try:
        for step in reversed(ckpt.steps()):
            try:
                return step, ckpt.read_meta(step)
            except Exception:  # noqa: BLE001, S112 - unreadable: try the one before
                continue
    finally:
        ckpt.close()
    raise FileNotFoundError(f"no readable checkpoint in {stage_dir}/checkpoints")


def finished_results(stage_dir: Path, num_steps: int) -> dict | None:
    """The results a stage recorded when it finished `num_steps` steps, or None (not run,
    interrupted, or asked now for more steps than it ran)."""
    if not (Path(stage_dir) / "checkpoints").is_dir():
        return None
    try:
        step, meta = _latest_meta(stage_dir)
    except FileNotFoundError:
        return None
    return meta.get("final") if step >= num_steps else None


def load_model(
    stage_dir: Path, mesh: Mesh | None = None, which: str = "latest", subtree: str | None = None
) -> LoadedModel:
    """A language model of any stage (or an imported one) for inference: its config, params
    placed by the rule table on `mesh` (default: data parallel over every device), and its
    tokenizer. Reads the params alone: no optimizer state, no data preparation. A LoRA
    stage's adapters come merged into its base (train/lora.py)."""
    from model.transformer import LanguageModel
    from train import lora
    from train.state import abstract_params

    stage_dir = Path(stage_dir).absolute()
    meta = read_latest_meta(stage_dir)
    kind = meta.get("model_kind", "lm")
    if kind != "lm":  # its trunk would load, and its head be read as the vocabulary's
        raise ValueError(
            f"{stage_dir} holds a {kind} model, not a language model: choose a pretraining "
            "or policy stage (sft, ppo, grpo, dpo) directory"
        )
    cfg = ModelConfig(**meta["model"])
    mesh = mesh if mesh is not None else sharding.make_mesh(sharding.MeshConfig())
    subtree = subtree if subtree is not None else meta.get("lm_params")
    lm = LanguageModel(cfg)
    # A LoRA stage saved {frozen base, adapters}: read both, hand out the merged model.
    lora_cfg = lora.LoraConfig(**meta["lora"]) if meta.get("lora") else None
    target = abstract_params(lora.LoraModel(lm, lora_cfg) if lora_cfg else lm, mesh)
    if subtree:
        target = {subtree: target}
    step, params, meta = load_params(stage_dir, target, which)
    params = params[subtree] if subtree else params
    if lora_cfg:
        shardings = jax.tree.map(lambda x: x.sharding, abstract_params(lm, mesh))
        params = lora.merged_params(params, lora_cfg, shardings)
    meta = {**meta, "stage_dir": str(stage_dir)}
    tokenizer = load_stage_tokenizer(stage_dir, meta)
    return LoadedModel(cfg, params, tokenizer, step, meta, stage_dir / "tokenizer")


def save_model(
    stage_dir: Path,
    params: Any,
    model_cfg: ModelConfig,
    tokenizer_files: list[Path],
    meta: dict | None = None,
) -> None:
    """Writes a model that did not come from training (an imported one) as an ordinary
    checkpoint of step 0: params, an empty optimizer state, the tokenizer and its identity."""
    stage_dir = Path(stage_dir).absolute()
    if (stage_dir / "checkpoints").exists():
        raise FileExistsError(f"{stage_dir}/checkpoints exists; choose a new workdir")
    identity = store_tokenizer(stage_dir, [Path(f) for f in tokenizer_files])
    full_meta = {
        "stage": "import",
        "model": dataclasses.asdict(model_cfg),
        "tokenizer": identity,
        **(meta or {}),
    }
    ckpt = Checkpointer(stage_dir / "checkpoints", keep_last=1, keep_best=0, async_save=False)
    try:
        step = jax.numpy.zeros((), jax.numpy.int32)
        ckpt.save(0, TrainState(step, params, {}), {}, full_meta)
    finally:
        ckpt.close()
