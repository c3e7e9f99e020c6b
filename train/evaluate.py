"""Evaluation on a fixed validation set: loss, perplexity and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from data import pipeline
from train.losses import cross_entropy_sums, loss_options


def make_eval_step(model: nn.Module) -> Callable[[dict, dict], dict[str, jax.Array]]:
    """`eval_step(params, batch) -> {"ce_sum", "weight_sum"}` (pure; jit it)."""

    def eval_step(params, batch):
        logits_BLV = model.apply(
            {"params": params},
            batch["inputs"],
            batch.get("positions"),
            batch.get("segment_ids"),
            mask_vocab_padding=False,  # the loss leaves the padding out itself
        )
        sums = cross_entropy_sums(
            logits_BLV, batch["targets"], batch["weights"], **loss_options(model.cfg)
        )
        return {"ce_sum": sums["ce_sum"], "weight_sum": sums["weight_sum"]}

    return eval_step


def evaluate(
    eval_step: Callable, params: Any, batches: Iterable[dict], bytes_per_token: float | None
) -> dict[str, float]:
    """Loss (nats/token), perplexity, and bits per byte when the text's bytes per token is known.

    Bits per byte = loss / ln 2 / (bytes per token): comparable across tokenizers.
    """
    ce_sum = weight_sum = 0.0
    for batch in batches:
        sums = jax.device_get(eval_step(params, batch))
        ce_sum += float(sums["ce_sum"])
        weight_sum += float(sums["weight_sum"])
    if weight_sum == 0:
        raise ValueError("the validation set has no tokens with nonzero weight")
    loss = ce_sum / weight_sum
    metrics = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 80.0))}
    if bytes_per_token:
        metrics["eval/bits_per_byte"] = loss / math.log(2) / bytes_per_token
    return metrics


def evaluate_checkpoint(
    stage_dir: str | Path,
    data_dir: str | Path,
    *,
    split: str = "val",
    seq_len: int = 0,
    batch_size: int = 8,
    max_batches: int | None = None,
    which: str = "latest",
    progress: bool = False,
) -> dict:
    """Loss, perplexity and bits per byte of a stage's (or an imported) model on a split of a
    prepared data directory, every token of it scored once (up to `max_batches` batches).

    The data must be tokenized with the checkpoint's own tokenizer (the same files, by
    sha256): prepare it with `--tokenizer=STAGE_DIR/tokenizer`. `seq_len` 0 takes the
    model's max_len. Rows split over every device (and process)."""
    from data.prepare import load_meta, prepared_tokenizer_files
    from data.tokenizer import tokenizer_identity
    from model.transformer import LanguageModel
    from train import sharding
    from train.saved_model import load_model, read_latest_meta

    stage_dir, data_dir = Path(stage_dir).absolute(), Path(data_dir).absolute()
    meta = load_meta(data_dir)  # FileNotFoundError names a folder that is not prepared data
    if split not in meta["splits"]:
        raise ValueError(f"{data_dir} has no split {split!r}; it has {sorted(meta['splits'])}")
    mesh = sharding.make_mesh(sharding.MeshConfig())
    sharding.check_batch_size(batch_size, mesh)
    theirs = tokenizer_identity(prepared_tokenizer_files(data_dir))["sha256"]
    ours = read_latest_meta(stage_dir).get("tokenizer", {}).get("sha256")  # before any weight
    if ours and theirs != ours:
        raise ValueError(
            f"{data_dir} is tokenized with another tokenizer (sha256 {theirs[:12]}) than "
            f"{stage_dir}'s ({ours[:12]}); prepare the text with --tokenizer={stage_dir}/tokenizer"
        )
    loaded = load_model(stage_dir, mesh, which)
    cfg = loaded.cfg
    seq_len = seq_len or cfg.max_len
    if seq_len > cfg.max_len and cfg.positional == "learned":
        raise ValueError(f"seq_len {seq_len} exceeds the model's learned positions ({cfg.max_len})")
    eval_step = sharding.jit_sharded(
        make_eval_step(LanguageModel(cfg)),
        mesh,
        in_shardings=(
            jax.tree.map(lambda x: x.sharding, loaded.params),
            sharding.batch_sharding(mesh),
        ),
        out_shardings=sharding.replicated(mesh),
    )
    batches = (
        sharding.to_global_batch(batch, mesh)
        for batch in pipeline.make_eval_iterator(
            data_dir,
            seq_len,
            batch_size,
            split=split,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            max_batches=max_batches,
        )
    )
    rows = -(-(meta["splits"][split]["tokens"] - 1) // seq_len)  # as the packer counts
    split_batches = -(-rows // batch_size)
    total = min(split_batches, max_batches or split_batches)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"evaluating {split}", unit="batch", total=total)
    metrics = evaluate(eval_step, loaded.params, batches, pipeline.bytes_per_token(data_dir, split))
    # A partial pass is an estimate: its bits per byte use the whole split's bytes per token.
    scored = f"first {total} of {split_batches} batches" if total < split_batches else "whole split"
    return {"step": loaded.step, "split": split, "seq_len": seq_len, "scored": scored, **metrics}
