"""The sections every experiment config has; each config file starts from these.

Every stage (pretraining and each post-training stage) has the same sub-sections:
  model  (pretraining only: post-training inherits the model it starts from)
  data   what the stage reads
  train  the loop (train/loop.py): batch, steps, log/eval/checkpoint cadence, seed, ...
  optim  AdamW and its schedule (train/optim.py); total_steps=0 spans the stage's steps
  mesh   the device mesh (train/sharding.py)
and a stage with constants of its own has an `algorithm` section; the stages that train a
language model alone (SFT, DPO, GRPO) have a `lora` section (train/lora.py). Every field can be
overridden from the command line, type-checked, e.g. `--config.optim.lr=1e-3`,
`--config.sft.optim.lr=1e-4`, `--config.ppo.train.num_steps=50`.
"""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict, config_dict

from model.config import get_preset
from train.lora import LoraConfig
from train.optim import OptimConfig


def model_fields(preset: str, **overrides) -> ConfigDict:
    """All ModelConfig fields of a preset, so that each is overridable and type-checked.
    vocab_size=0 takes the tokenizer's vocabulary."""
    vocab = overrides.pop("vocab_size", None)
    fields = dataclasses.asdict(get_preset(preset, **overrides))
    if vocab is not None:
        fields["vocab_size"] = vocab
    return model_section(fields)


def model_section(fields: dict) -> ConfigDict:
    """A config's `model` section holding these ModelConfig fields (a dict of all of them)."""
    fields = dict(fields)
    for name in ("n_kv_heads", "d_head"):  # None: derived from the other fields
        if fields[name] is None:
            fields[name] = config_dict.placeholder(int)
    return ConfigDict(fields)


def train_fields(**overrides) -> ConfigDict:
    fields = dict(
        global_batch_size=32,
        num_steps=1000,
        num_microbatches=1,  # gradient accumulation inside the jitted step
        z_loss=0.0,
        seed=0,
        skip_nonfinite=False,  # False: stop at a non-finite loss/grad/update; True: skip, count
        log_every=10,
        eval_every=200,
        eval_batches=16,
        checkpoint_every=200,
        keep_checkpoints=2,
        keep_best=1,  # checkpoints kept for the lowest eval/loss
        peak_flops=0.0,  # per device, for MFU; 0 = look the device kind up
        profile_start=0,  # >0: a jax.profiler trace of profile_steps steps from this step
        profile_steps=3,
        init_from="",  # pretraining: start from the params of this stage directory
    )
    unknown = set(overrides) - set(fields)
    if unknown:
        raise KeyError(f"unknown train fields {sorted(unknown)}")
    return ConfigDict({**fields, **overrides})


def optim_fields(**overrides) -> ConfigDict:
    fields = {f.name: f.default for f in dataclasses.fields(OptimConfig)}
    unknown = set(overrides) - set(fields)
    if unknown:
        raise KeyError(f"unknown optim fields {sorted(unknown)}")
    return ConfigDict({**fields, **overrides})


def mesh_fields(**overrides) -> ConfigDict:
    return ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, **overrides})


def lora_fields(**overrides) -> ConfigDict:
    """LoRA: rank 0 trains every parameter; rank r > 0 freezes the model and trains rank-r
    adapters on the kernels `targets` names (the update scaled by alpha / r)."""
    fields = {f.name: f.default for f in dataclasses.fields(LoraConfig)}
    unknown = set(overrides) - set(fields)
    if unknown:
        raise KeyError(f"unknown lora fields {sorted(unknown)}")
    return ConfigDict({**fields, **overrides})


def stage_config(data: dict, train: dict, optim: dict, algorithm: dict | None = None) -> ConfigDict:
    """A post-training stage's section: data, train, optim, mesh (and algorithm)."""
    c = ConfigDict()
    c.data = ConfigDict(data)
    c.train = train_fields(**train)
    c.optim = optim_fields(**optim)
    c.mesh = mesh_fields()
    if algorithm is not None:
        c.algorithm = ConfigDict(algorithm)
    return c


def base_config(preset: str = "tiny") -> ConfigDict:
    """A pretraining config: model, data, train, optim, mesh, sample."""
    c = ConfigDict()
    c.model = model_fields(preset)
    c.data = ConfigDict(
        dict(
            # stdlib[:holdout=F] | text:PATH[:val_tail=F] | jsonl:PATH:FIELD | tfds:NAME
            corpus="stdlib",
            dir="",  # prepared data; "" means WORKDIR/data
            tokenizer="bpe",  # bpe | unigram | char, or an existing one's path (init_from: its own)
            vocab_size=4096,
            seq_len=256,
        )
    )
    c.train = train_fields()
    c.optim = optim_fields(clip_norm=1.0)
    c.mesh = mesh_fields()
    c.sample = ConfigDict(
        dict(num_samples=2, prompt="", max_new_tokens=128, temperature=0.8, top_k=40, top_p=1.0)
    )
    return c
