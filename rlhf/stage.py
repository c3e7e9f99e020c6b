"""What every post-training stage does around its own math, in one place.

A pipeline directory DIR holds one stage directory per stage (DIR/pretrain, DIR/sft,
DIR/reward, DIR/ppo, DIR/dpo, ...), each in the one layout of train/workdir.py and
train/checkpoint.py, and DIR/posttrain_data/ (rlhf/datasets.py). A stage's config is the
pipeline config's section of the same name, with the sub-sections every stage has:
  data   what the stage reads (lengths, sizes)
  train  the loop: global_batch_size, num_steps, log/eval/checkpoint cadence, seed, ...
  optim  AdamW and its schedule (the schedule's length derived from the step count)
  mesh   the device mesh
  algorithm  the stage's own constants (PPO, DPO, GRPO, reward margin), where it has any
  lora   SFT, DPO, GRPO: rank > 0 trains LoRA adapters on the frozen model (train/lora.py)
`open_stage` validates the section, opens and locks the stage directory and records the
config; `run` hands the stage to the one loop (train/loop.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import optax
from ml_collections import ConfigDict

from model.config import ModelConfig
from model.transformer import LanguageModel
from rlhf.chat_vocab import with_chat_tokens
from train import loop, lora, sharding
from train.optim import make_optimizer, optim_config
from train.saved_model import (
    LoadedModel,
    chosen_step,
    finished_results,
    load_model,
    load_params,
    read_latest_meta,
    store_tokenizer,
)
from train.state import TrainState, abstract_params, init_fn, state_with_params
from train.workdir import Workdir

# The pipeline-level sections a post-training stage's results depend on besides its own.
SHARED_SECTIONS = ("seed", "posttrain_data", "eval", "pretrain_checkpoint", "init_from")


@dataclasses.dataclass
class Policy:
    """What a stage that trains a language model (SFT, DPO, GRPO) trains."""

    model: Any  # what the steps, evaluations and samplers apply: LanguageModel or LoraModel
    state: TrainState  # the initial state, sharded by the rule table
    shardings: TrainState
    start_params: Any  # the starting model in the state's params layout (the state holds copies)


@dataclasses.dataclass
class StageContext:
    name: str
    config: ConfigDict  # the whole pipeline config
    root: Path  # the pipeline directory
    directory: Path  # root / name
    mesh: Any
    identity: dict  # the config this stage's results depend on (recorded, compared)
    scratch: Path  # a temporary directory, removed when the stage ends
    # The checkpoints this stage trains from, {"dir", "which", "step"} each: recorded in its
    # meta and compared, since an earlier stage trained further changes them, not the config.
    inputs: list = dataclasses.field(default_factory=list)

    @property
    def section(self) -> ConfigDict:
        return self.config[self.name]

    @property
    def finished(self) -> dict | None:
        """The stage's results if it already ran to the end (nothing is built then) from the
        checkpoints it would start from now."""
        results = finished_results(self.directory, self.section.train.num_steps)
        if results is not None:
            check_inputs(self.name, self.root, read_latest_meta(self.directory))
        return results

    def _record_input(self, directory: Path, which: str, step: int) -> None:
        """Notes a checkpoint the stage trains from; on a resume, it must be the one the
        stage's checkpoints were trained from."""
        if directory.is_relative_to(self.root):  # the pipeline directory may move
            directory = directory.relative_to(self.root)
        self.inputs.append({"dir": str(directory), "which": which, "step": step})
        if (self.directory / "checkpoints").is_dir() and any(
            (self.directory / "checkpoints").iterdir()
        ):
            check_inputs(self.name, self.root, read_latest_meta(self.directory))

    def optimizer(self, num_updates: int | None = None) -> optax.GradientTransformation:
        """AdamW for this stage; its schedule spans `num_updates` (default: num_steps)."""
        return make_optimizer(
            optim_config(self.section.optim, num_updates or self.section.train.num_steps)
        )

    def load_start(self, source: str, which: str = "latest") -> LoadedModel:
        """The language model of an earlier stage (or the imported model `init_from`), with
        the chat tokens added where its tokenizer lacks them (rlhf/chat_vocab.py)."""
        if source == "pretrain" and self.config.get("init_from"):
            directory = Path(self.config.init_from).absolute()
        else:
            directory = self.root / source
        loaded = load_model(directory, self.mesh, which)
        self._record_input(directory, which, loaded.step)
        return with_chat_tokens(loaded, Path(tempfile.mkdtemp(dir=self.scratch)))

    def policy(self, start: LoadedModel, tx: optax.GradientTransformation) -> Policy:
        """The policy trained from `start`: all its params, or with `lora.rank > 0` fresh
        adapters on it frozen (the optimizer then holds the adapters' moments only)."""
        lm, lora_cfg = LanguageModel(start.cfg), lora.config_of(self.section)
        if not lora_cfg.enabled:
            state, shardings = state_with_params(init_fn(lm), start.params, tx, self.mesh)
            return Policy(lm, state, shardings, start.params)
        model = lora.LoraModel(lm, lora_cfg)
        rng = jax.random.key(self.section.train.seed)
        start_params = lora.with_fresh_adapters(model, start.params, self.mesh, rng)
        state, shardings = state_with_params(init_fn(model), start_params, tx, self.mesh)
        return Policy(model, state, shardings, start_params)

    def load_reward(self, cfg: ModelConfig, trains_on_it: bool = True) -> Any:
        """The reward model's params (normalised), from DIR/reward; `trains_on_it` records
        it as an input (PPO), unlike scoring an evaluation."""
        from rlhf.reward_model import RewardModel

        target = abstract_params(RewardModel(cfg), self.mesh)
        step, params, _ = load_params(self.root / "reward", target)
        if trains_on_it:
            self._record_input(self.root / "reward", "latest", step)
        return params

    def meta(self, start: LoadedModel, **extra) -> dict:
        """The stage's checkpoint meta: its config, the model, the tokenizer it inherits."""
        files = sorted(Path(start.tokenizer_dir).iterdir())
        lora_cfg = lora.config_of(self.section)
        if lora_cfg.enabled:  # load_model then merges the saved adapters
            extra["lora"] = dataclasses.asdict(lora_cfg)
        return {
            "stage": self.name,
            "config": self.identity,
            "model": dataclasses.asdict(start.cfg),
            "tokenizer": store_tokenizer(self.directory, files),
            "inputs": self.inputs,
            **extra,
        }


def check_inputs(name: str, root: Path, meta: dict) -> None:
    """Refuses stage `name` of pipeline directory `root` if its recorded inputs
    (`StageContext.inputs`) are not the checkpoints it would start from now: an earlier
    stage has trained further since."""
    for used in meta.get("inputs", []):
        now = chosen_step(root / used["dir"], used["which"])
        if now != used["step"]:
            raise ValueError(
                f"{name} was trained from step {used['step']} of {used['dir']}, which now gives "
                f"step {now}: delete {root / name} and the stages after it to train them on "
                "it, or use a new pipeline directory"
            )


def validate(section: ConfigDict, name: str) -> None:
    """The checks that need no data, before anything is written."""
    tc = section.train
    if tc.global_batch_size < 1:
        raise ValueError(f"{name}.train.global_batch_size must be >= 1, got {tc.global_batch_size}")
    try:
        loop.LoopConfig.from_config(tc)
        optim_config(section.optim, tc.num_steps)
        lora_on = lora.config_of(section).enabled
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    if lora_on and name not in lora.STAGES:
        raise ValueError(f"{name}.lora: LoRA is for the {', '.join(lora.STAGES)} stages only")


@contextlib.contextmanager
def open_stage(
    name: str, config: ConfigDict, root: Path, rows_per_step: int | None = None
) -> Iterator[StageContext]:
    """Validates stage `name`'s section, opens and locks its directory. `rows_per_step` is
    what the mesh splits (default: train.global_batch_size; GRPO: prompts x group size)."""
    if name not in config:
        raise ValueError(f"the config has no section {name!r}")
    validate(config[name], name)
    identity = {name: config[name].to_dict()}
    if not lora.config_of(config[name]).enabled:  # LoRA off is the stage as it always was:
        identity[name].pop("lora", None)  # directories made before the switch still resume
    identity.update({k: _plain(config[k]) for k in SHARED_SECTIONS if k in config})
    mesh = sharding.make_mesh(sharding.MeshConfig(**config[name].mesh.to_dict()))
    sharding.check_batch_size(rows_per_step or config[name].train.global_batch_size, mesh)
    with Workdir(root / name, identity) as wd, tempfile.TemporaryDirectory() as scratch:
        yield StageContext(name, config, root, wd.path, mesh, identity, Path(scratch))


def _plain(value: Any) -> Any:
    return value.to_dict() if isinstance(value, ConfigDict) else value


def run(ctx: StageContext, **stage_fields) -> dict[str, Any]:
    """Runs the stage in the one loop, with the stage's metrics under its own name."""
    stage = loop.Stage(
        name=ctx.name,
        directory=ctx.directory,
        mesh=ctx.mesh,
        metrics_prefix=ctx.name,
        **stage_fields,
    )
    return loop.run(stage, loop.LoopConfig.from_config(ctx.section.train))


def process_share() -> dict[str, int]:
    """This process's place among all, for batch iterators."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}
