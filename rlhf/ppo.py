"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022).

One iteration: sample responses (`rlhf.rollout`), then `make_prepare` scores
them in one jitted call — log-probs of the policy and of the frozen reference
at the sampling temperature, values, the reward-model score — and turns them
into per-token rewards

    r_t = -beta * (log pi(a_t) - log ref(a_t))   (+ score at the last response token)

then GAE advantages (gamma=1, lambda=0.95), whitened, and returns. Then
`make_ppo_step` runs several epochs of clipped policy and value updates over
shuffled minibatches inside one jitted call. The policy and the critic (a
reward-model-shaped network, initialised from the reward model) share one
TrainState: params = {"policy": ..., "value": ...}, loss = pg + vf_coef * vf.

Arrays over T = L - 1 follow `rlhf.sequences`: entry t concerns token t + 1.
`response_mask_BT` is 1 where token t + 1 was generated (its EOS included).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf.reward_model import RewardModel, sequence_reward, token_scores
from rlhf.sequences import last_token_index, lm_logits, log_probs_and_entropy
from train.gradients import accumulate_gradients, apply_gradients, minibatch_epochs
from train.state import TrainState


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    temperature: float = 1.0  # sampling temperature; log-probs are recomputed at it
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1
    epochs: int = 4  # passes over each rollout batch
    num_minibatches: int = 4  # optimizer updates per epoch
    num_microbatches: int = 1  # gradient accumulation inside each minibatch
    whiten_advantages: bool = True
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response without EOS

    def __post_init__(self):
        if self.temperature <= 0 or self.epochs < 1 or self.num_minibatches < 1:
            raise ValueError(
                f"PPOConfig needs temperature > 0, epochs >= 1, num_minibatches >= 1: {self}"
            )


# ----------------------------------------------------------------------------- math


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x_BT: jax.Array, mask_BT: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x - mean) / std over the masked entries; masked-out entries become 0."""
    mean = masked_mean(x_BT, mask_BT)
    var = masked_mean(jnp.square(x_BT - mean), mask_BT)
    out = (x_BT - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask_BT


def gae(
    rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """(advantages_BT, returns_BT) by Generalized Advantage Estimation (Schulman et al. 2016).

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lambda A_{t+1},
    with V and A zero after the last response token (the episode ends there).
    Entries outside the mask are 0.
    """
    mask_BT = mask_BT.astype(jnp.float32)

    def back(carry, xs):
        next_value_B, next_adv_B = carry
        r_B, v_B, m_B = xs
        delta_B = r_B + gamma * next_value_B - v_B
        adv_B = (delta_B + gamma * lam * next_adv_B) * m_B
        # Outside the response the carry resets, so the response's last token
        # bootstraps from 0 (terminal).
        return (v_B * m_B, adv_B), adv_B

    B = rewards_BT.shape[0]
    zeros_B = jnp.zeros((B,), jnp.float32)
    xs = (rewards_BT.T.astype(jnp.float32), values_BT.T.astype(jnp.float32), mask_BT.T)
    _, adv_TB = jax.lax.scan(back, (zeros_B, zeros_B), xs, reverse=True)
    advantages_BT = adv_TB.T
    return advantages_BT, (advantages_BT + values_BT) * mask_BT


def kl_penalized_rewards(
    logp_BT: jax.Array,
    ref_logp_BT: jax.Array,
    scores_B: jax.Array,
    mask_BT: jax.Array,
    beta: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(rewards_BT, kl_BT): -beta * kl per response token, plus the sequence score on the
    last response token, with kl_BT = log pi - log ref (the k1 estimate, as InstructGPT).

    Only k1 belongs in a reward. The k3 estimate r - 1 - log r (r = ref / pi) is never
    negative and estimates the KL's value with less variance, but as a reward its policy
    gradient is grad KL(pi || ref) - grad KL(ref || pi) (Tang & Munos 2025), which can point
    the other way; `kl_statistics` reports it instead.
    """
    mask_BT = mask_BT.astype(jnp.float32)
    kl_BT = jnp.where(mask_BT > 0, logp_BT - ref_logp_BT, 0.0)
    last_B = last_token_index(mask_BT)
    at_last_BT = jax.nn.one_hot(last_B, mask_BT.shape[1], dtype=jnp.float32) * mask_BT
    return -beta * kl_BT + scores_B[:, None] * at_last_BT, kl_BT


def kl_statistics(
    logp_BT: jax.Array, ref_logp_BT: jax.Array, mask_BT: jax.Array
) -> dict[str, jax.Array]:
    """Mean sequence KL to the reference by k1 (what the reward charges; the controller's
    input) and by k3 (unbiased as well, never negative, lower variance)."""
    inside_BT = mask_BT > 0
    # zeroed outside the response before exp: a padding slot cannot overflow into NaN
    log_ratio_BT = jnp.where(inside_BT, ref_logp_BT - logp_BT, 0.0)
    k3_BT = jnp.exp(log_ratio_BT) - 1.0 - log_ratio_BT
    return {
        "kl": jnp.mean(jnp.sum(-log_ratio_BT, axis=1)),
        "kl_k3": jnp.mean(jnp.sum(k3_BT, axis=1)),
    }


def ppo_token_losses(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    advantages_BT: jax.Array,
    values_BT: jax.Array,
    old_values_BT: jax.Array,
    returns_BT: jax.Array,
    mask_BT: jax.Array,
    clip_eps: float,
    value_clip: float,
) -> dict[str, jax.Array]:
    """Per-token clipped policy loss, clipped value loss and diagnostics; entries outside
    `mask_BT` are 0."""
    inside_BT = mask_BT > 0
    # zeroed outside the mask before exp, so a padding slot cannot overflow (inf * 0 = NaN)
    log_ratio_BT = jnp.where(inside_BT, logp_BT - old_logp_BT, 0.0)
    ratio_BT = jnp.exp(log_ratio_BT)
    pg1_BT = -advantages_BT * ratio_BT
    pg2_BT = -advantages_BT * jnp.clip(ratio_BT, 1.0 - clip_eps, 1.0 + clip_eps)
    values_clipped_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -value_clip, value_clip)
    vf1_BT = jnp.square(values_BT - returns_BT)
    vf2_BT = jnp.square(values_clipped_BT - returns_BT)
    terms = {
        "policy_loss": jnp.maximum(pg1_BT, pg2_BT),
        "value_loss": 0.5 * jnp.maximum(vf1_BT, vf2_BT),
        # Fractions outside the trust region (robust to ties at ratio == 1).
        "clip_frac": (jnp.abs(ratio_BT - 1.0) > clip_eps).astype(jnp.float32),
        "value_clip_frac": (jnp.abs(values_BT - old_values_BT) > value_clip).astype(jnp.float32),
        # k3 estimator of KL(old || new) (Schulman 2020): unbiased and >= 0.
        "approx_kl": ratio_BT - 1.0 - log_ratio_BT,
    }
    return {name: jnp.where(inside_BT, x_BT, 0.0) for name, x_BT in terms.items()}


def explained_variance(
    values_BT: jax.Array, returns_BT: jax.Array, mask_BT: jax.Array
) -> jax.Array:
    """1 - Var(returns - values) / Var(returns) over the masked entries."""

    def var(x):
        return masked_mean(jnp.square(x - masked_mean(x, mask_BT)), mask_BT)

    return 1.0 - var(returns_BT - values_BT) / jnp.maximum(var(returns_BT), 1e-8)


@dataclasses.dataclass
class KLController:
    """beta for the KL penalty: fixed, or adaptive (Ziegler et al. 2019, sec. 2.2):
    beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon. Host-side."""

    beta: float
    target: float | None = None  # None: fixed beta
    horizon: int = 10_000

    def update(self, kl: float, n_steps: int) -> float:
        # A non-finite KL (a batch the loop will stop or skip) must not poison beta for good:
        # beta is host state, saved with every checkpoint.
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta


# ------------------------------------------------------------------- prepare (scoring)

# reward_fn(reward_params, tokens_BL, mask_BL, response_mask_BT) -> scores_B
RewardFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def reward_model_fn(model: RewardModel) -> RewardFn:
    """The reward model's score at each row's last real token, as a RewardFn."""
    return lambda params, tokens_BL, mask_BL, response_mask_BT: sequence_reward(
        model, params, tokens_BL, mask_BL
    )


def make_prepare(
    policy_model: nn.Module, value_model: RewardModel, reward_fn: RewardFn, cfg: PPOConfig
) -> Callable:
    """Returns `prepare(params, ref_params, reward_params, rollout, beta) -> (batch, stats)`.

    `params` = {"policy", "value"}; `rollout` = {tokens [B, L], mask [B, L],
    response_mask [B, T], no_eos [B]}. The returned batch is the input of the
    PPO step; stats are rollout-level metrics (reward, KL, lengths, ...).
    """

    def prepare(params, ref_params, reward_params, rollout, beta):
        tokens_BL, mask_BL = rollout["tokens"], rollout["mask"]
        response_BT = rollout["response_mask"].astype(jnp.float32)
        logits_BTV = lm_logits(policy_model, params["policy"], tokens_BL, mask_BL, cfg.temperature)
        logp_BT, entropy_BT = log_probs_and_entropy(logits_BTV, tokens_BL)
        ref_logits_BTV = lm_logits(policy_model, ref_params, tokens_BL, mask_BL, cfg.temperature)
        ref_logp_BT, _ = log_probs_and_entropy(ref_logits_BTV, tokens_BL)
        values_BT = token_scores(value_model, params["value"], tokens_BL, mask_BL)[:, :-1]
        raw_scores_B = reward_fn(reward_params, tokens_BL, mask_BL, response_BT)
        no_eos_B = rollout["no_eos"].astype(jnp.float32)
        scores_B = raw_scores_B - cfg.missing_eos_penalty * no_eos_B
        rewards_BT, _ = kl_penalized_rewards(logp_BT, ref_logp_BT, scores_B, response_BT, beta)
        advantages_BT, returns_BT = gae(rewards_BT, values_BT, response_BT, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages_BT = whiten(advantages_BT, response_BT)
        batch = {
            "tokens": tokens_BL,
            "mask": mask_BL,
            "response_mask": response_BT,
            "old_logp": logp_BT,
            "old_values": values_BT * response_BT,
            "advantages": advantages_BT,
            "returns": returns_BT,
        }
        stats = {
            "score_mean": jnp.mean(raw_scores_B),
            "score_std": jnp.std(raw_scores_B),
            "reward_mean": jnp.mean(jnp.sum(rewards_BT, axis=1)),  # score + KL penalty
            **kl_statistics(logp_BT, ref_logp_BT, response_BT),  # sequence KL, in nats
            "entropy": masked_mean(entropy_BT, response_BT),
            "value_explained_variance": explained_variance(values_BT, returns_BT, response_BT),
            "response_length": jnp.mean(jnp.sum(response_BT, axis=1)),
            "no_eos_frac": jnp.mean(no_eos_B),
            "beta": jnp.asarray(beta, jnp.float32),
        }
        return batch, stats

    return prepare


# ---------------------------------------------------------------------------- update


def make_ppo_loss_sums(
    policy_model: nn.Module, value_model: RewardModel, cfg: PPOConfig
) -> Callable:
    """`loss_sums(params, minibatch, rng) -> (loss_sum, sums)` for `accumulate_gradients`:
    token sums of the clipped policy loss + vf_coef * clipped value loss over response
    tokens, with weight_sum = the number of response tokens."""

    def loss_sums(params, mb, rng):
        tokens_BL, mask_BL = mb["tokens"], mb["mask"]
        logits_BTV = lm_logits(policy_model, params["policy"], tokens_BL, mask_BL, cfg.temperature)
        logp_BT, entropy_BT = log_probs_and_entropy(logits_BTV, mb["tokens"])
        values_BT = token_scores(value_model, params["value"], mb["tokens"], mb["mask"])[:, :-1]
        terms = ppo_token_losses(
            logp_BT,
            mb["old_logp"],
            mb["advantages"],
            values_BT,
            mb["old_values"],
            mb["returns"],
            mb["response_mask"],
            cfg.clip_eps,
            cfg.value_clip,
        )
        terms["entropy"] = entropy_BT
        m_BT = mb["response_mask"]
        sums = {f"{k}_sum": jnp.sum(v * m_BT) for k, v in terms.items()}
        sums["weight_sum"] = jnp.sum(m_BT)
        loss_sum = sums["policy_loss_sum"] + cfg.vf_coef * sums["value_loss_sum"]
        return loss_sum, sums

    return loss_sums


def make_ppo_step(
    policy_model: nn.Module,
    value_model: RewardModel,
    tx: optax.GradientTransformation,
    cfg: PPOConfig = PPOConfig(),
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Returns the pure step `(state, batch, rng) -> (state, metrics)` (not yet jitted):
    `cfg.epochs` passes of `cfg.num_minibatches` updates over the prepared batch."""
    loss_sums = make_ppo_loss_sums(policy_model, value_model, cfg)

    def minibatch_update(state, mb, rng):
        grads, sums = accumulate_gradients(loss_sums, state.params, mb, rng, cfg.num_microbatches)
        state, update_metrics = apply_gradients(state, grads, tx)
        n = jnp.maximum(sums["weight_sum"], 1.0)
        metrics = {k[: -len("_sum")]: v / n for k, v in sums.items() if k != "weight_sum"}
        return state, {**metrics, **update_metrics}

    return minibatch_epochs(minibatch_update, cfg.epochs, cfg.num_minibatches)
