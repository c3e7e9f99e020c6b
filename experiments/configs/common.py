"""The fields every experiment config has; each config file starts from `base_config`.

Every field can be overridden from the command line, e.g.
`--config.optim.lr=1e-3 --config.model.n_layers=4 --config.mesh.fsdp=8`.
"""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict, config_dict

from model.config import get_preset
from train.optim import OptimConfig


def model_fields(preset: str, **overrides) -> ConfigDict:
    """All ModelConfig fields of a preset, so that each is overridable and type-checked."""
    fields = dataclasses.asdict(get_preset(preset, **overrides))
    for name in ("n_kv_heads", "d_head"):  # None: derived from the other fields
        if fields[name] is None:
            fields[name] = config_dict.placeholder(int)
    return ConfigDict(fields)


def base_config(preset: str = "tiny") -> ConfigDict:
    c = ConfigDict()
    c.model = model_fields(preset)
    c.data = ConfigDict(
        dict(
            corpus="stdlib",  # stdlib | text:PATH | jsonl:PATH:FIELD | tfds:NAME
            dir="",  # prepared data; "" means WORKDIR/data
            tokenizer="bpe",  # bpe | unigram | char
            vocab_size=4096,
            seq_len=256,
        )
    )
    c.train = ConfigDict(
        dict(
            global_batch_size=32,
            num_steps=1000,
            num_microbatches=1,
            z_loss=0.0,
            seed=0,
            skip_nonfinite=False,  # False: stop at a non-finite loss/grad; True: skip and count
            log_every=10,
            eval_every=200,
            eval_batches=16,
            checkpoint_every=200,
            keep_checkpoints=2,
            keep_best=1,
            peak_flops=0.0,  # per device, for MFU; 0 = look up the device kind
        )
    )
    c.optim = ConfigDict(dataclasses.asdict(OptimConfig()))
    c.optim.clip_norm = 1.0
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sample = ConfigDict(
        dict(num_samples=2, prompt="", max_new_tokens=128, temperature=0.8, top_k=40, top_p=1.0)
    )
    return c
