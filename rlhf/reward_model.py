"""Reward model (and PPO critic): the language model's trunk with a scalar head.

The parameter tree is `embed`, `decoder` (exactly as in `LanguageModel`, so an
SFT checkpoint's trunk loads straight in, see `init_from_lm`) and
`reward_head` / `reward_bias`. The module returns a score at every token;
the sequence reward is the score at the last real token (`sequence_reward`),
found from the mask so left- and right-padded batches read the same token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import Embed, dense_param
from model.transformer import Decoder, default_positions
from rlhf.sequences import gather_at, last_token_index, positions_and_segments


class RewardModel(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BL: jax.Array,
        positions_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """scores_BL in float32: the head applied to every token's final hidden state."""
        cfg = self.cfg
        if positions_BL is None:
            positions_BL = default_positions(tokens_BL)
        hidden_BLD, _ = Decoder(cfg, name="decoder")(
            Embed(cfg, name="embed")(tokens_BL), positions_BL, segment_ids_BL, None, deterministic
        )
        # std 1/d: initial rewards are small (about d^-1/2) but the trunk still gets gradient.
        w_D = dense_param(self, "reward_head", (cfg.d_model,), ("embed",), fan_in=cfg.d_model**2)
        b = dense_param(self, "reward_bias", (1,), (None,), zeros=True)
        scores_BL = hidden_BLD.astype(jnp.float32) @ w_D.astype(jnp.float32) + b[0]
        return nn.with_logical_constraint(scores_BL, ("batch", "length"))


def token_scores(
    model: RewardModel, params: Any, tokens_BL: jax.Array, mask_BL: jax.Array
) -> jax.Array:
    """scores_BL for a padded batch (positions and segments derived from the mask)."""
    positions_BL, segments_BL = positions_and_segments(mask_BL)
    return model.apply({"params": params}, tokens_BL, positions_BL, segments_BL)


def sequence_reward(
    model: RewardModel, params: Any, tokens_BL: jax.Array, mask_BL: jax.Array
) -> jax.Array:
    """rewards_B: the score at each row's last real token."""
    return gather_at(token_scores(model, params, tokens_BL, mask_BL), last_token_index(mask_BL))


def init_from_lm(reward_params: Any, lm_params: Any) -> Any:
    """Reward-model params with the trunk (`embed`, `decoder`) taken from a language model."""
    return {**reward_params, "embed": lm_params["embed"], "decoder": lm_params["decoder"]}


def normalization(rewards_N: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(gain, bias) with gain * r + bias having mean 0 and std 1 over `rewards_N`
    (the SFT policy's own samples, as in InstructGPT)."""
    rewards_N = jnp.asarray(rewards_N, jnp.float32)
    gain = 1.0 / jnp.maximum(jnp.std(rewards_N), 1e-6)
    return gain, -jnp.mean(rewards_N) * gain


def fold_normalization(params: Any, gain: jax.Array, bias: jax.Array) -> Any:
    """Params whose scores are gain * score + bias (the head is linear, so this is exact)."""
    return {
        **params,
        "reward_head": params["reward_head"] * gain,
        "reward_bias": params["reward_bias"] * gain + bias,
    }
