"""Direct Preference Optimization (Rafailov et al. 2023): preference tuning in one step.

loss = -log sigmoid(beta * [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))])

with log-probabilities summed over the answer tokens only. The frozen
reference's log-probs are computed once per batch (`make_reference_log_probs`)
and travel in the batch as `ref_chosen_logp` / `ref_rejected_logp` [B], so
the training step holds a single model. Optional label smoothing is the
conservative DPO of Mitchell (2023).

`nll_weight` > 0 adds the chosen answer's mean per-token negative log-likelihood
(RPO, Pang et al. 2024): DPO alone only widens the gap between chosen and
rejected, and often does so by lowering both ("likelihood displacement"); on
this project's pairs (the real function against corrupted copies) plain DPO
lowered every ground-truth rate (BENCHMARKS.md), the NLL term keeps the chosen
answers likely. Batches are the pair format of `rlhf.chat.preference_batch`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf.sequences import sequence_log_probs
from train.gradients import accumulate_gradients, apply_gradients
from train.state import TrainState


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1  # strength of the implicit KL leash to the reference
    label_smoothing: float = 0.0  # assumed probability that a preference label is flipped
    nll_weight: float = 0.0  # RPO: weight of the chosen answers' per-token NLL
    num_microbatches: int = 1

    def __post_init__(self):
        if self.beta <= 0 or not 0.0 <= self.label_smoothing < 0.5 or self.nll_weight < 0:
            raise ValueError(
                f"DPOConfig needs beta > 0, label_smoothing in [0, 0.5) and nll_weight >= 0: {self}"
            )


def pair_log_probs(model: nn.Module, params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(logp_chosen_B, logp_rejected_B) of the answers, one forward pass over
    interleaved [B, 2, L] -> [2B, L] rows (no resharding)."""
    stacked = {
        key: jnp.stack([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=1)
        for key in ("tokens", "mask", "loss_mask")
    }
    B, _, L = stacked["tokens"].shape
    flat = {key: value.reshape(2 * B, L) for key, value in stacked.items()}
    logp_B2 = sequence_log_probs(
        model, params, flat["tokens"], flat["mask"], flat["loss_mask"]
    ).reshape(B, 2)
    return logp_B2[:, 0], logp_B2[:, 1]


def make_reference_log_probs(model: nn.Module) -> Callable[[Any, dict], dict]:
    """`(ref_params, batch) -> {"ref_chosen_logp", "ref_rejected_logp"}`, to add to the batch."""

    def reference(ref_params, batch):
        chosen_B, rejected_B = pair_log_probs(model, ref_params, batch)
        return {"ref_chosen_logp": chosen_B, "ref_rejected_logp": rejected_B}

    return reference


def dpo_sums(
    chosen_B: jax.Array,
    rejected_B: jax.Array,
    ref_chosen_B: jax.Array,
    ref_rejected_B: jax.Array,
    weight_B: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_tokens_B: jax.Array | None = None,
    nll_weight: float = 0.0,
) -> dict[str, jax.Array]:
    """Weighted sums of the DPO loss, preference accuracy and implicit rewards; with
    `nll_weight`, the loss adds nll_weight * (-chosen_B / chosen_tokens_B) (RPO)."""
    reward_chosen_B = beta * (chosen_B - ref_chosen_B)
    reward_rejected_B = beta * (rejected_B - ref_rejected_B)
    z_B = reward_chosen_B - reward_rejected_B
    loss_B = -(1 - label_smoothing) * jax.nn.log_sigmoid(z_B)
    loss_B -= label_smoothing * jax.nn.log_sigmoid(-z_B)
    nll_B = jnp.zeros_like(chosen_B)
    if chosen_tokens_B is not None:
        nll_B = -chosen_B / jnp.maximum(chosen_tokens_B, 1.0)
    loss_B += nll_weight * nll_B
    return {
        "nll_sum": jnp.sum(weight_B * nll_B),
        "loss_sum": jnp.sum(weight_B * loss_B),
        "correct_sum": jnp.sum(weight_B * (z_B > 0)),
        "margin_sum": jnp.sum(weight_B * z_B),
        "chosen_sum": jnp.sum(weight_B * reward_chosen_B),
        "rejected_sum": jnp.sum(weight_B * reward_rejected_B),
        "weight_sum": jnp.sum(weight_B),
    }


def make_dpo_step(
    model: nn.Module, tx: optax.GradientTransformation, cfg: DPOConfig = DPOConfig()
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Returns the pure step `(state, batch, rng) -> (state, metrics)` (not yet jitted).

    The batch must hold the reference log-probs (see `make_reference_log_probs`).
    """

    def loss_sums(params, batch, rng):
        chosen_B, rejected_B = pair_log_probs(model, params, batch)
        weight_B = batch.get("pair_weight", jnp.ones_like(chosen_B)).astype(jnp.float32)
        sums = dpo_sums(
            chosen_B,
            rejected_B,
            batch["ref_chosen_logp"],
            batch["ref_rejected_logp"],
            weight_B,
            cfg.beta,
            cfg.label_smoothing,
            # answer tokens of each chosen row: the targets its log-prob sums over
            jnp.sum(batch["chosen_loss_mask"][:, 1:], axis=1).astype(jnp.float32),
            cfg.nll_weight,
        )
        return sums["loss_sum"], sums

    def step(state: TrainState, batch: dict, rng: jax.Array):
        k = cfg.num_microbatches
        grads, sums = accumulate_gradients(loss_sums, state.params, batch, rng, k)
        new_state, update_metrics = apply_gradients(state, grads, tx)
        n = jnp.maximum(sums["weight_sum"], 1.0)
        metrics = {
            "loss": sums["loss_sum"] / n,
            "accuracy": sums["correct_sum"] / n,
            "margin": sums["margin_sum"] / n,
            "reward_chosen": sums["chosen_sum"] / n,
            "reward_rejected": sums["rejected_sum"] / n,
            "chosen_nll": sums["nll_sum"] / n,
            **update_metrics,
        }
        return new_state, metrics

    return step
