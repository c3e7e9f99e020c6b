"""The jitted reward-model step: Bradley-Terry loss on preference pairs.

loss = -log sigmoid(r_chosen - r_rejected - margin) (Bradley & Terry 1952; the
optional per-pair margin as in Llama 2). Batches are the pair format of
`rlhf.chat.preference_batch`: {chosen,rejected}_{tokens,mask} [B, L], plus
optional `margin` [B] and `pair_weight` [B] (0 for padding pairs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlhf.reward_model import RewardModel, sequence_reward
from train.gradients import accumulate_gradients, apply_gradients
from train.state import TrainState


@dataclasses.dataclass(frozen=True)
class RewardStepConfig:
    num_microbatches: int = 1


def pair_rewards(model: RewardModel, params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(r_chosen_B, r_rejected_B) in one forward pass over 2B rows.

    Chosen and rejected rows are interleaved ([B, 2, L] -> [2B, L]) rather than
    concatenated, so each device keeps its own pairs and nothing is resharded.
    """
    tokens = jnp.stack([batch["chosen_tokens"], batch["rejected_tokens"]], axis=1)
    mask = jnp.stack([batch["chosen_mask"], batch["rejected_mask"]], axis=1)
    B, _, L = tokens.shape
    rewards = sequence_reward(model, params, tokens.reshape(2 * B, L), mask.reshape(2 * B, L))
    rewards_B2 = rewards.reshape(B, 2)
    return rewards_B2[:, 0], rewards_B2[:, 1]


def bradley_terry_sums(
    chosen_B: jax.Array, rejected_B: jax.Array, margin_B: jax.Array, weight_B: jax.Array
) -> dict[str, jax.Array]:
    """Weighted sums of the pairwise loss, accuracy and reward margin."""
    diff_B = chosen_B - rejected_B
    loss_B = -jax.nn.log_sigmoid(diff_B - margin_B)
    return {
        "loss_sum": jnp.sum(weight_B * loss_B),
        "correct_sum": jnp.sum(weight_B * (diff_B > 0)),
        "margin_sum": jnp.sum(weight_B * diff_B),
        "chosen_sum": jnp.sum(weight_B * chosen_B),
        "rejected_sum": jnp.sum(weight_B * rejected_B),
        "weight_sum": jnp.sum(weight_B),
    }


def _pair_sums(chosen_B: jax.Array, rejected_B: jax.Array, batch: dict) -> dict[str, jax.Array]:
    B = chosen_B.shape[0]
    margin_B = batch.get("margin", jnp.zeros((B,), jnp.float32))
    weight_B = batch.get("pair_weight", jnp.ones((B,), jnp.float32)).astype(jnp.float32)
    return bradley_terry_sums(chosen_B, rejected_B, margin_B, weight_B)


def _metrics(sums: dict) -> dict[str, jax.Array]:
    n = jnp.maximum(sums["weight_sum"], 1.0)
    return {
        "loss": sums["loss_sum"] / n,
        "accuracy": sums["correct_sum"] / n,
        "margin": sums["margin_sum"] / n,
        "reward_chosen": sums["chosen_sum"] / n,
        "reward_rejected": sums["rejected_sum"] / n,
        "pairs": sums["weight_sum"],
    }


def make_reward_step(
    model: RewardModel, tx: optax.GradientTransformation, cfg: RewardStepConfig = RewardStepConfig()
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Returns the pure step `(state, batch, rng) -> (state, metrics)` (not yet jitted)."""

    def loss_sums(params, batch, rng):
        sums = _pair_sums(*pair_rewards(model, params, batch), batch)
        return sums["loss_sum"], sums

    def step(state: TrainState, batch: dict, rng: jax.Array):
        k = cfg.num_microbatches
        grads, sums = accumulate_gradients(loss_sums, state.params, batch, rng, k)
        new_state, update_metrics = apply_gradients(state, grads, tx)
        return new_state, {**_metrics(sums), **update_metrics}

    return step


def make_reward_eval(model: RewardModel) -> Callable[[object, dict], dict]:
    """`(params, batch) -> {"chosen": r_B, "rejected": r_B, **metrics}`, for held-out
    accuracy per corruption kind (grouped on the host)."""

    def evaluate(params, batch):
        chosen_B, rejected_B = pair_rewards(model, params, batch)
        sums = _pair_sums(chosen_B, rejected_B, batch)
        return {"chosen": chosen_B, "rejected": rejected_B, **_metrics(sums)}

    return evaluate
