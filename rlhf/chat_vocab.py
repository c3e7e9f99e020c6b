"""The chat template's tokens added to a model that lacks them (what TRL's `setup_chat_format`
does): post-training a published GPT-2 or Llama imported with experiments.convert.

rlhf/chat.py renders conversations with `<|system|>`, `<|user|>`, `<|assistant|>` and
`<|end|>`. A tokenizer this project trained has them; a published one does not. Then the
missing tokens are appended to a copy of the tokenizer (data/special_tokens.py: ids right
after its last one, every old id unchanged) and the vocabulary grows to cover them. Where
the new ids fit in the rows the embedding already pads to (`ModelConfig.padded_vocab`:
GPT-2's 50257 -> 50304) only `vocab_size` changes; otherwise the embedding (and an untied
head) get new rows. A model without a pad token pads with eos (data/hf_tokenizer.py), so
pad needs no new token.

The stage that starts from such a model (SFT) records the extended tokenizer and model
config in its checkpoints, so every later stage, resume and export sees them; the
extension is deterministic, so a resumed stage stores the same tokenizer (same sha256).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from data.special_tokens import add_special_tokens
from data.tokenizer import CHAT_TOKENS, load_tokenizer
from model.config import ModelConfig
from train.saved_model import LoadedModel

log = logging.getLogger(__name__)


def missing_chat_tokens(tokenizer: Any) -> list[str]:
    """The chat tokens the tokenizer lacks, in CHAT_TOKENS' order."""
    missing = []
    for token in CHAT_TOKENS:
        try:
            tokenizer.special_id(token)
        except KeyError:
            missing.append(token)
    return missing


def with_chat_tokens(start: LoadedModel, scratch: Path) -> LoadedModel:
    """`start` itself if its tokenizer has every chat token; else the model with them added:
    the extended tokenizer written to `scratch` (a new directory), the vocabulary grown."""
    missing = missing_chat_tokens(start.tokenizer)
    if not missing:
        return start
    used, cfg = start.tokenizer.vocab_size, start.cfg
    if used > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer of {start.meta.get('stage_dir')} has {used} tokens but its model "
            f"only {cfg.vocab_size}: they do not belong together"
        )
    files = add_special_tokens(start.tokenizer_dir, scratch, missing)
    tokenizer = load_tokenizer(scratch)
    grown = cfg.replace(vocab_size=max(cfg.vocab_size, used + len(missing)))
    params = grow_vocab(start.params, grown, used)
    log.info(
        "added the chat tokens %s to the tokenizer of %s as ids %d..%d; vocab_size %d -> %d "
        "(%s), their embedding rows the mean of the others",
        " ".join(missing),
        start.meta.get("stage_dir"),
        used,
        used + len(missing) - 1,
        cfg.vocab_size,
        grown.vocab_size,
        "within the padded rows"
        if grown.padded_vocab == cfg.padded_vocab
        else f"rows {cfg.padded_vocab} -> {grown.padded_vocab}",
    )
    return dataclasses.replace(
        start, cfg=grown, params=params, tokenizer=tokenizer, tokenizer_dir=files[0].parent
    )


def grow_vocab(params: Any, cfg: ModelConfig, used: int) -> Any:
    """The embedding (and untied head) with `cfg.padded_vocab` rows, rows [used,
    cfg.vocab_size) set to the mean of rows [0, used), every other row unchanged.

    The mean (Hewitt 2021, "Initializing new word embeddings"): a new token's logit starts
    at the average of the others, so adding it barely moves the model's distribution,
    where a zero or random row can give it a logit far above every real token's; as an
    input it is an average embedding rather than a vector the model never saw.
    """
    out = dict(params)
    embedding = _grown(params["embed"]["embedding"], 0, used, cfg)
    out["embed"] = {**params["embed"], "embedding": embedding}
    if not cfg.tie_embeddings:
        out["lm_head"] = _grown(params["lm_head"], 1, used, cfg)
    return out


def _grown(table: jax.Array, axis: int, used: int, cfg: ModelConfig) -> jax.Array:
    rows = jnp.moveaxis(table, axis, 0)
    mean = rows[:used].astype(jnp.float32).mean(0, keepdims=True).astype(rows.dtype)
    extra = cfg.padded_vocab - rows.shape[0]
    if extra > 0:  # zero rows, as the import pads: masked, never sampled
        rows = jnp.pad(rows, [(0, extra)] + [(0, 0)] * (rows.ndim - 1))
    index = jnp.arange(rows.shape[0]).reshape(-1, *([1] * (rows.ndim - 1)))
    rows = jnp.where((index >= used) & (index < cfg.vocab_size), mean, rows)
    return jnp.moveaxis(rows, 0, axis)
