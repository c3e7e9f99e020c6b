"""GRPO: group-relative policy optimisation from verifiable rewards, with no value model.

Shao et al. 2024 (DeepSeekMath), with the variants of DAPO (Yu et al. 2025) and
Dr. GRPO (Liu et al. 2025) as options. One iteration:

  1. sample G responses per prompt (`repeat_for_groups`, then `rlhf.rollout`): rows
     k*G .. k*G+G-1 of the rollout are the group of prompt k;
  2. score each response on the host (`rlhf.verifier.verifiable_rewards`) -> rewards [B],
     less `missing_eos_penalty` for a response cut off at the length limit;
  3. `make_grpo_prepare`: log-probs of the policy (the "old" policy) and, when
     kl_beta > 0, of the frozen reference, at the sampling temperature, and the
     group-relative advantage of every response
         A_i = (r_i - mean(group)) [/ (std(group) + eps)  if std_normalize];
  4. `make_grpo_step`: `epochs` passes of `num_minibatches` updates minimising, per token,
         -min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t,
         rho_t = pi(a_t) / pi_old(a_t),   k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1,
     averaged by `loss_normalization`:
         "sequence"  mean over each response's tokens, then over responses (GRPO)
         "token"     sum over all tokens / number of tokens (DAPO)
         "constant"  sum over all tokens / (responses * max_new_tokens) (Dr. GRPO)

Presets: GRPO = the defaults; DAPO = clip_eps_high=0.28, loss_normalization="token",
kl_beta=0; Dr. GRPO = std_normalize=False, loss_normalization="constant", kl_beta=0.

Arrays over T = L - 1 follow `rlhf.sequences`: entry t concerns token t + 1.
Shape letters: B rows = responses, K prompts, G responses per prompt (B = K * G),
L tokens per row, T = L - 1 next-token positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf.sequences import lm_logits, log_probs_and_entropy
from train.gradients import accumulate_gradients, apply_gradients, minibatch_epochs
from train.state import TrainState

LOSS_NORMALIZATIONS = ("sequence", "token", "constant")
ADVANTAGE_EPS = 1e-4  # added to the group std: an all-equal group gets 0, not 0 / 0
MAX_LOG_RATIO = 20.0  # |log ratio| bound inside exp: one wild token cannot overflow the loss


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8  # G: responses sampled per prompt
    clip_eps_low: float = 0.2  # ratio clipped below at 1 - clip_eps_low
    clip_eps_high: float = 0.2  # ... and above at 1 + clip_eps_high (DAPO: 0.28)
    kl_beta: float = 0.04  # k3 KL penalty to the reference; 0: no reference pass at all
    std_normalize: bool = True  # divide advantages by the group std (False: Dr. GRPO)
    loss_normalization: str = "sequence"  # sequence (GRPO) | token (DAPO) | constant (Dr. GRPO)
    max_new_tokens: int = 0  # the "constant" normalisation's length (the sampler's budget)
    epochs: int = 1  # passes over each rollout batch
    num_minibatches: int = 1  # optimizer updates per epoch
    num_microbatches: int = 1  # gradient accumulation inside each minibatch
    temperature: float = 1.0  # sampling temperature; log-probs are recomputed at it
    # Subtracted from the reward of a response cut off at the length limit, as PPO does:
    # unpenalised, the reference followed by anything at all scores as the reference.
    missing_eos_penalty: float = 1.0

    def __post_init__(self):
        problems = []
        if self.group_size < 2:
            problems.append("group_size >= 2 (a group of one has no relative advantage)")
        if not (0 < self.clip_eps_low < 1 and self.clip_eps_high > 0):
            problems.append("0 < clip_eps_low < 1 and clip_eps_high > 0")
        if self.kl_beta < 0:
            problems.append("kl_beta >= 0")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            problems.append(f"loss_normalization in {LOSS_NORMALIZATIONS}")
        if self.loss_normalization == "constant" and self.max_new_tokens < 1:
            problems.append("max_new_tokens >= 1 with loss_normalization='constant'")
        if self.temperature <= 0 or min(self.epochs, self.num_minibatches) < 1:
            problems.append("temperature > 0, epochs >= 1, num_minibatches >= 1")
        if self.num_microbatches < 1:
            problems.append("num_microbatches >= 1")
        if problems:
            raise ValueError(f"GRPOConfig needs {'; '.join(problems)}: {self}")


# ----------------------------------------------------------------------------- math


def group_advantages(
    rewards_B: jax.Array, group_size: int, std_normalize: bool = True
) -> jax.Array:
    """advantages_B: each reward minus its group's mean, divided by the group's sample std
    (+ ADVANTAGE_EPS) when `std_normalize`. Groups are consecutive rows of G."""
    rewards_KG = rewards_B.astype(jnp.float32).reshape(-1, group_size)
    centred_KG = rewards_KG - jnp.mean(rewards_KG, axis=1, keepdims=True)
    if std_normalize:
        std_K1 = jnp.std(rewards_KG, axis=1, keepdims=True, ddof=1)
        centred_KG = centred_KG / (std_K1 + ADVANTAGE_EPS)
    return centred_KG.reshape(-1)


def k3_kl(logp_BT: jax.Array, ref_logp_BT: jax.Array) -> jax.Array:
    """Per-token k3 estimator of KL(pi || ref) on tokens sampled from pi (Schulman 2020):
    exp(ref - logp) - (ref - logp) - 1, unbiased and >= 0 (the log ratio is clipped to
    +-MAX_LOG_RATIO first)."""
    log_ratio_BT = jnp.clip(ref_logp_BT - logp_BT, -MAX_LOG_RATIO, MAX_LOG_RATIO)
    return jnp.exp(log_ratio_BT) - log_ratio_BT - 1.0


def clipped_surrogate(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    advantages_BT: jax.Array,
    clip_eps_low: float,
    clip_eps_high: float,
) -> jax.Array:
    """Per-token policy loss -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)."""
    ratio_BT = jnp.exp(logp_BT - old_logp_BT)
    clipped_BT = jnp.clip(ratio_BT, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    return jnp.maximum(-advantages_BT * ratio_BT, -advantages_BT * clipped_BT)


def normalized_sums(
    token_loss_BT: jax.Array, mask_BT: jax.Array, normalization: str, max_new_tokens: int = 0
) -> tuple[jax.Array, jax.Array]:
    """(loss_sum, weight_sum) with loss = loss_sum / weight_sum for `normalization`
    (see the module docstring); additive over rows, so microbatches combine exactly."""
    mask_BT = mask_BT.astype(jnp.float32)
    per_row_B = jnp.sum(token_loss_BT * mask_BT, axis=1)
    rows = jnp.asarray(mask_BT.shape[0], jnp.float32)
    if normalization == "sequence":
        lengths_B = jnp.maximum(jnp.sum(mask_BT, axis=1), 1.0)
        return jnp.sum(per_row_B / lengths_B), rows
    if normalization == "token":
        return jnp.sum(per_row_B), jnp.sum(mask_BT)
    if normalization == "constant":
        return jnp.sum(per_row_B), rows * max_new_tokens
    raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}: {normalization!r}")


def grpo_token_terms(
    logp_BT: jax.Array,
    old_logp_BT: jax.Array,
    ref_logp_BT: jax.Array | None,
    advantages_B: jax.Array,
    mask_BT: jax.Array,
    cfg: GRPOConfig,
) -> dict[str, jax.Array]:
    """Per-token loss (surrogate + beta * k3) and diagnostics; outside `mask_BT` the
    log-probs are replaced by zeros before any exp, so padding cannot overflow."""
    inside = mask_BT > 0
    logp_BT = jnp.where(inside, logp_BT, 0.0)
    old_logp_BT = jnp.where(inside, old_logp_BT, 0.0)
    advantages_BT = jnp.broadcast_to(advantages_B[:, None], logp_BT.shape)
    policy_BT = clipped_surrogate(
        logp_BT, old_logp_BT, advantages_BT, cfg.clip_eps_low, cfg.clip_eps_high
    )
    ratio_BT = jnp.exp(logp_BT - old_logp_BT)
    terms = {
        "policy_loss": policy_BT,
        "loss": policy_BT,
        # The clip binds (zero gradient) above 1 + eps_high for A > 0, below 1 - eps_low for A < 0.
        "clip_frac_high": ((ratio_BT > 1.0 + cfg.clip_eps_high) & (advantages_BT > 0)),
        "clip_frac_low": ((ratio_BT < 1.0 - cfg.clip_eps_low) & (advantages_BT < 0)),
        "ratio": ratio_BT,
    }
    if ref_logp_BT is not None:
        terms["kl"] = k3_kl(logp_BT, jnp.where(inside, ref_logp_BT, 0.0))
        terms["loss"] = policy_BT + cfg.kl_beta * terms["kl"]
    return {k: v.astype(jnp.float32) for k, v in terms.items()}


# ----------------------------------------------------------------------- host side


def repeat_for_groups(
    prompts_BP: np.ndarray, prompt_lengths_B: np.ndarray, group_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt row repeated G times in a row: the rollout layout GRPO expects."""
    return np.repeat(prompts_BP, group_size, axis=0), np.repeat(prompt_lengths_B, group_size)


# ------------------------------------------------------------------------- prepare


def make_grpo_prepare(model: nn.Module, cfg: GRPOConfig) -> Callable:
    """Returns `prepare(params, ref_params, rollout, rewards_B) -> (batch, stats)` (pure).

    `rollout` = {tokens [B, L], mask [B, L], response_mask [B, T], no_eos [B]} from
    `rlhf.rollout` over prompts repeated by `repeat_for_groups`; `rewards_B` the host's
    verifiable rewards. `ref_params` is unused (pass None) when kl_beta == 0. The batch
    is the input of the GRPO step: tokens, mask, response_mask, old_logp,
    ref_logp (only when kl_beta > 0) and advantages [B].
    """

    def prepare(params, ref_params, rollout, rewards_B):
        tokens_BL, mask_BL = rollout["tokens"], rollout["mask"]
        response_BT = rollout["response_mask"].astype(jnp.float32)
        if rewards_B.shape[0] % cfg.group_size:
            raise ValueError(f"{rewards_B.shape[0]} rewards do not form groups of {cfg.group_size}")
        logits_BTV = lm_logits(model, params, tokens_BL, mask_BL, cfg.temperature)
        logp_BT, entropy_BT = log_probs_and_entropy(logits_BTV, tokens_BL)
        rewards_B = rewards_B.astype(jnp.float32)
        no_eos_B = rollout["no_eos"].astype(jnp.float32)
        shaped_B = rewards_B - cfg.missing_eos_penalty * no_eos_B
        advantages_B = group_advantages(shaped_B, cfg.group_size, cfg.std_normalize)
        batch = {
            "tokens": tokens_BL,
            "mask": mask_BL,
            "response_mask": response_BT,
            "old_logp": logp_BT,
            "advantages": advantages_B,
        }
        tokens = jnp.maximum(jnp.sum(response_BT), 1.0)
        rewards_KG = shaped_B.reshape(-1, cfg.group_size)
        stats = {
            "reward_mean": jnp.mean(rewards_B),  # the verifier's, without the penalty
            "reward_std": jnp.std(rewards_B),
            # Groups whose rewards are all equal teach nothing (their advantages are 0).
            "frac_groups_all_equal": jnp.mean(jnp.all(rewards_KG == rewards_KG[:, :1], axis=1)),
            "entropy": jnp.sum(entropy_BT * response_BT) / tokens,
            "response_length": jnp.mean(jnp.sum(response_BT, axis=1)),
            "no_eos_frac": jnp.mean(rollout["no_eos"].astype(jnp.float32)),
        }
        if cfg.kl_beta > 0:
            ref_logits_BTV = lm_logits(model, ref_params, tokens_BL, mask_BL, cfg.temperature)
            ref_logp_BT, _ = log_probs_and_entropy(ref_logits_BTV, tokens_BL)
            batch["ref_logp"] = ref_logp_BT
            stats["kl"] = jnp.sum(k3_kl(logp_BT, ref_logp_BT) * response_BT) / tokens
        return batch, stats

    return prepare


# ---------------------------------------------------------------------------- update


def make_grpo_loss_sums(model: nn.Module, cfg: GRPOConfig) -> Callable:
    """`loss_sums(params, minibatch, rng) -> (loss_sum, sums)` for `accumulate_gradients`:
    the GRPO loss as (sum, weight_sum) by `cfg.loss_normalization`, and token sums of
    the diagnostics with their count in "tokens"."""

    def loss_sums(params, mb, rng):
        del rng  # dropout is off in post-training forward passes
        logits_BTV = lm_logits(model, params, mb["tokens"], mb["mask"], cfg.temperature)
        logp_BT, entropy_BT = log_probs_and_entropy(logits_BTV, mb["tokens"])
        ref_logp_BT = mb["ref_logp"] if cfg.kl_beta > 0 else None
        m_BT = mb["response_mask"].astype(jnp.float32)
        terms = grpo_token_terms(logp_BT, mb["old_logp"], ref_logp_BT, mb["advantages"], m_BT, cfg)
        terms["entropy"] = entropy_BT
        loss_sum, weight_sum = normalized_sums(
            terms.pop("loss"), m_BT, cfg.loss_normalization, cfg.max_new_tokens
        )
        sums = {f"{k}_sum": jnp.sum(v * m_BT) for k, v in terms.items()}
        sums.update(loss_sum=loss_sum, weight_sum=weight_sum, tokens=jnp.sum(m_BT))
        return loss_sum, sums

    return loss_sums


def make_grpo_step(
    model: nn.Module, tx: optax.GradientTransformation, cfg: GRPOConfig = GRPOConfig()
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Returns the pure step `(state, batch, rng) -> (state, metrics)` (not yet jitted):
    `cfg.epochs` passes of `cfg.num_minibatches` updates over the prepared batch, rows
    shuffled each epoch. Metrics are means over the updates: "loss" (normalised as
    configured), and per response token "policy_loss", "kl", "ratio", "entropy",
    "clip_frac_low" / "clip_frac_high", plus the optimizer's."""
    loss_sums = make_grpo_loss_sums(model, cfg)

    def minibatch_update(state, mb, rng):
        grads, sums = accumulate_gradients(loss_sums, state.params, mb, rng, cfg.num_microbatches)
        state, update_metrics = apply_gradients(state, grads, tx)
        tokens = jnp.maximum(sums.pop("tokens"), 1.0)
        # The same denominator accumulate_gradients divides the gradient by.
        metrics = {"loss": sums.pop("loss_sum") / jnp.maximum(sums.pop("weight_sum"), 1.0)}
        metrics.update({k.removesuffix("_sum"): v / tokens for k, v in sums.items()})
        return state, {**metrics, **update_metrics}

    return minibatch_epochs(minibatch_update, cfg.epochs, cfg.num_minibatches)
