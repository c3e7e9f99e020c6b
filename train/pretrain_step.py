"""The jitted pretraining step: next-token cross-entropy with per-token weights.

Batches are dicts of [B, L] arrays:
  inputs       int32 token ids fed to the model
  targets      int32 next-token ids
  weights      float32 loss weight per token (0 on padding, and on prompts in SFT)
  positions    int32 position within its document (optional: 0..L-1)
  segment_ids  int32 document id within the row, 0 for padding (optional:
               one document per row)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import optax

from model.auto import choose_cross_entropy_impl
from model.kernels import fp8_head, fused_head
from model.transformer import output_head_VD
from train.gradients import accumulate_gradients, apply_gradients
from train.losses import cross_entropy_sums, loss_options, statistics_sums, token_ce_sums
from train.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    num_microbatches: int = 1  # gradient accumulation inside the jitted step
    z_loss: float = 0.0  # coefficient of the log(Z)^2 penalty; PaLM used 1e-4

    def __post_init__(self):
        if self.num_microbatches < 1:
            raise ValueError(
                f"StepConfig.num_microbatches must be >= 1, got {self.num_microbatches}"
            )


def lm_loss_sums(model: nn.Module, z_loss: float, deterministic: bool) -> Callable:
    """loss_sums(params, batch, rng) for next-token prediction on `batch`."""
    cfg = model.cfg
    options = loss_options(cfg)
    fused = choose_cross_entropy_impl(cfg) == "fused"

    def loss_sums(params, batch, rng):
        apply = functools.partial(
            model.apply,
            {"params": params},
            batch["inputs"],
            batch.get("positions"),
            batch.get("segment_ids"),
            deterministic=deterministic,
            rngs={"dropout": rng},
        )
        if cfg.head_matmul == "fp8" or fused:  # the loss applies the head itself
            head = (apply(return_hidden=True), output_head_VD(params, cfg), batch["targets"])
            if cfg.head_matmul == "fp8":  # in float8, around the kernel pair
                statistics = fp8_head.target_logit_and_log_z(*head, cfg.vocab_size)
                sums = statistics_sums(*statistics, batch["weights"], z_loss)
            else:  # with the single-pass kernel
                ce_and_log_z = fused_head.cross_entropy_and_log_z(*head, cfg.vocab_size)
                sums = token_ce_sums(*ce_and_log_z, batch["weights"], z_loss)
        else:  # the model's logits; the loss leaves the vocabulary's padding out itself
            logits_BLV = apply(mask_vocab_padding=False)
            sums = cross_entropy_sums(
                logits_BLV, batch["targets"], batch["weights"], z_loss, **options
            )
        return sums["loss_sum"], sums

    return loss_sums


def make_pretrain_step(
    model: nn.Module, tx: optax.GradientTransformation, cfg: StepConfig = StepConfig()
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Returns the pure step `(state, batch, rng) -> (state, metrics)` (not yet jitted)."""
    deterministic = model.cfg.dropout_rate == 0.0 and model.cfg.attention_dropout == 0.0
    loss_sums = lm_loss_sums(model, cfg.z_loss, deterministic)

    def step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        grads, sums = accumulate_gradients(
            loss_sums, state.params, batch, rng, cfg.num_microbatches
        )
        tokens = sums["weight_sum"]
        new_state, update_metrics = apply_gradients(state, grads, tx, sums["loss_sum"])
        metrics = {
            "loss": sums["ce_sum"] / tokens,
            "loss_with_z": sums["loss_sum"] / tokens,
            "tokens": tokens,
            **update_metrics,
        }
        return new_state, metrics

    return step
