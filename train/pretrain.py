"""Pretraining as a stage of the one loop: packed text batches, next-token loss, eval in
bits per byte. `train(config, workdir)` is what `python -m experiments.pretrain` runs.

The model's vocabulary is derived from the tokenizer (`model.vocab_size=0`) unless set;
the schedule's length from `train.num_steps` (`optim.total_steps=0`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from model.config import ModelConfig
from model.sampling import SamplingConfig, fitting_new_tokens, make_sampler, sample_texts
from model.transformer import LanguageModel
from train import flops, loop, sharding
from train.data_source import build_data
from train.evaluate import evaluate, make_eval_step
from train.metrics_writer import plot_loss_curves
from train.optim import make_optimizer, optim_config
from train.pretrain_step import StepConfig, make_pretrain_step
from train.saved_model import finished_results, load_params, read_latest_meta, store_tokenizer
from train.state import abstract_params, abstract_train_state, create_train_state, init_fn
from train.workdir import Workdir

log = logging.getLogger(__name__)


def model_config(model: ConfigDict | dict, vocab_size: int) -> ModelConfig:
    """The ModelConfig of a config's `model` section, its vocabulary filled in."""
    fields = dict(model)
    fields["vocab_size"] = fields.get("vocab_size") or vocab_size
    return ModelConfig(**fields)


def validate(config: ConfigDict) -> None:
    """Every check that needs no data, before anything is written or allocated."""
    missing = [name for name in ("model", "data", "train", "optim") if name not in config]
    if missing:
        raise ValueError(
            f"the config has no {', '.join(missing)} section: pretraining takes a pretraining "
            "config (experiments/configs/stdlib_tiny.py, ...); a pipeline config "
            "(posttrain_*.py) goes to experiments.pipeline"
        )
    tc = config.train
    if tc.global_batch_size < 1:
        raise ValueError(f"train.global_batch_size must be >= 1, got {tc.global_batch_size}")
    loop.LoopConfig.from_config(tc)
    optim_config(config.optim, tc.num_steps)
    StepConfig(tc.num_microbatches, tc.z_loss)
    cfg = model_config(config.model, vocab_size=max(config.data.vocab_size, 1))
    if tc.get("init_from"):
        _check_init_from_model(config)
    if config.data.seq_len < 2:
        raise ValueError(f"data.seq_len must be >= 2, got {config.data.seq_len}")
    if config.data.seq_len > cfg.max_len and cfg.positional == "learned":
        raise ValueError(
            f"data.seq_len={config.data.seq_len} exceeds model.max_len={cfg.max_len}; "
            "raise model.max_len or lower data.seq_len"
        )


def build(config: ConfigDict, workdir: Path) -> loop.Stage:
    tc = config.train
    mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()))
    sharding.check_batch_size(tc.global_batch_size, mesh)
    data = build_data(config, workdir, mesh)
    cfg = model_config(config.model, data.tokenizer.vocab_size)
    if data.tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {data.tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{cfg.vocab_size}; raise model.vocab_size, or set it to 0 to take the tokenizer's"
        )
    model = LanguageModel(cfg)
    tx = make_optimizer(optim_config(config.optim, tc.num_steps))
    init, rng = init_fn(model), jax.random.key(tc.seed)
    abstract_state, shardings = abstract_train_state(init, tx, mesh, rng)
    batches = _GlobalBatches(data)
    # compiled while the state is initialised (train/launch.py)
    step = loop.compile_ahead(
        sharding.jit_step(
            make_pretrain_step(model, tx, StepConfig(tc.num_microbatches, tc.z_loss)),
            shardings,
            mesh,
        ),
        abstract_state,
        batches,
        mesh,
        tc.seed,
        "pretrain step",
    )
    state, _ = create_train_state(init, tx, mesh, rng, shardings)
    tokenizer = store_tokenizer(workdir, data.tokenizer_files)
    if tc.get("init_from"):
        state = _init_from(state, Path(tc.init_from), cfg, mesh, tokenizer)
    eval_step = sharding.jit_sharded(
        make_eval_step(model),
        mesh,
        in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
    meta = {
        "stage": "pretrain",
        "config": config.to_dict(),
        "model": dataclasses.asdict(cfg),
        "tokenizer": tokenizer,
    }
    return loop.Stage(
        name="pretrain",
        directory=workdir,
        state=state,
        step=step,
        batches=batches,
        mesh=mesh,
        meta=meta,
        units_per_step=tc.global_batch_size * config.data.seq_len,
        flops_per_unit=flops.flops_per_token(cfg, config.data.seq_len),
        evaluate=lambda s: evaluate(eval_step, s.params, data.eval_batches, data.bytes_per_token),
    )


class _GlobalBatches:
    """The packed-data iterator, its batches already split over the mesh."""

    def __init__(self, data):
        self.data = data

    def __next__(self) -> dict:
        return self.data.next_train_batch()

    def get_state(self) -> dict:
        return self.data.train_iter.get_state()

    def set_state(self, state: dict) -> None:
        self.data.train_iter.set_state(state)


def _check_init_from_model(config: ConfigDict) -> None:
    """Before any data is prepared: the model section must be train.init_from's model
    (model.vocab_size=0 taking its vocabulary, as its tokenizer will give)."""
    source = Path(config.train.init_from)
    theirs = ModelConfig(**read_latest_meta(source)["model"])
    _same_model(source, model_config(config.model, theirs.vocab_size), theirs)


def _same_model(source: Path, ours: ModelConfig, theirs: ModelConfig) -> None:
    """ValueError naming every field where the model section differs from the source's."""
    fields = dataclasses.asdict(theirs)
    differ = [k for k, v in dataclasses.asdict(ours).items() if fields[k] != v]
    if differ:
        raise ValueError(
            f"train.init_from={source} holds another model; set "
            + " ".join(f"--config.model.{k}={fields[k]}" for k in differ)
        )


def _init_from(state, source: Path, cfg: ModelConfig, mesh, tokenizer: dict) -> Any:
    """The parameters of another stage's (or an imported model's) checkpoint, with a fresh
    optimizer state: continued pretraining. Model and tokenizer must be the source's."""
    _same_model(source, cfg, ModelConfig(**read_latest_meta(source)["model"]))
    _, params, meta = load_params(source, abstract_params(LanguageModel(cfg), mesh))
    if meta.get("tokenizer", {}).get("sha256") != tokenizer["sha256"]:
        raise ValueError(
            f"train.init_from={source} was trained with another tokenizer than the prepared "
            "data's; continued pretraining needs data tokenized with the model's own tokenizer"
        )
    log.info("pretraining starts from the parameters in %s", source)
    return state.replace(params=params)


def train(config: ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Pretrains to config.train.num_steps (resuming from WORKDIR's checkpoints); returns the
    last logged train and eval metrics."""
    validate(config)
    with Workdir(workdir, config) as wd:
        done = finished_results(wd.path, config.train.num_steps)
        if done is not None:
            return done
        stage = build(config, wd.path)
        results = loop.run(stage, loop.LoopConfig.from_config(config.train))
    if jax.process_index() == 0:
        plot_loss_curves(wd.path / "metrics.jsonl", wd.path / "loss_curve.png")
        _print_samples(stage, config)
    return results


def _print_samples(stage: loop.Stage, config: ConfigDict) -> None:
    sc = config.sample
    if not sc.num_samples:
        return
    from train.saved_model import load_stage_tokenizer

    tokenizer = load_stage_tokenizer(stage.directory, stage.meta)
    cfg = ModelConfig(**stage.meta["model"])
    try:
        prompt_tokens = 1 + len(tokenizer.encode(sc.prompt))
        new_tokens = fitting_new_tokens(cfg, prompt_tokens, sc.max_new_tokens)
    except ValueError as error:  # the training is done and saved: say so, do not fail it
        log.warning("no samples printed: %s (sample.prompt)", error)
        return
    sampling = SamplingConfig(
        max_new_tokens=new_tokens,
        temperature=sc.temperature,
        top_k=sc.top_k,
        top_p=sc.top_p,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        vocab_size=tokenizer.vocab_size,
    )
    with sharding.mesh_context(stage.mesh):
        texts = sample_texts(
            make_sampler(LanguageModel(cfg), sampling),
            stage.state.params,
            tokenizer,
            [sc.prompt] * sc.num_samples,
            jax.random.key(config.train.seed + 1),
        )
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{sc.prompt}{text}")
