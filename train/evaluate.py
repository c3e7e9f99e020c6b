"""Evaluation on a fixed validation set: loss, perplexity and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax

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
    eval_step: Callable, params, batches: Iterable[dict], bytes_per_token: float | None
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
