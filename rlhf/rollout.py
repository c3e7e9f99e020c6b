"""Rollouts: responses sampled by the jitted KV-cache sampler, laid out for PPO.

`model.sampling.sample` returns the generated tokens apart from the
right-padded prompts. `make_rollout` joins each prompt with its response into
one contiguous right-padded row, `prompt | response | pad`, so that positions
and the attention mask follow from `mask_BL` alone (`rlhf.sequences`), and
marks the generated tokens (EOS included) in `response_mask`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.sampling import SamplingConfig, sample
from rlhf.chat import pad_sequences


def join_prompt_and_response(
    prompts_BP: jax.Array,
    prompt_lengths_B: jax.Array,
    response_BR: jax.Array,
    response_lengths_B: jax.Array,
    pad_id: int,
) -> dict[str, jax.Array]:
    """{tokens_BL, mask_BL, response_mask_BL} with L = P + R, prompt and response contiguous
    (works for any per-token array in place of tokens, e.g. log-probs)."""
    B, P = prompts_BP.shape
    L = P + response_BR.shape[1]
    i_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    plen_B1 = prompt_lengths_B[:, None].astype(jnp.int32)
    end_B1 = plen_B1 + response_lengths_B[:, None].astype(jnp.int32)
    # Index into [prompt | response]: prompt slot i below its length, else response slot i - plen.
    source_BL = jnp.where(i_BL < plen_B1, i_BL, jnp.minimum(P + i_BL - plen_B1, L - 1))
    joined_BL = jnp.take_along_axis(jnp.concatenate([prompts_BP, response_BR], 1), source_BL, 1)
    mask_BL = (i_BL < end_B1).astype(jnp.int32)
    return {
        "tokens": jnp.where(mask_BL > 0, joined_BL, jnp.asarray(pad_id, joined_BL.dtype)),
        "mask": mask_BL,
        "response_mask": ((i_BL >= plen_B1) & (i_BL < end_B1)).astype(jnp.int32),
    }


def check_on_policy_sampling(algorithm: str, temperature: float, cfg: SamplingConfig) -> None:
    """Raises unless `cfg` samples at the algorithm's `temperature` without top-k/top-p:
    PPO and GRPO recompute the responses' log-probs at that temperature over the whole
    vocabulary, which must be the distribution the tokens were drawn from."""
    if cfg.temperature != temperature or cfg.top_k or cfg.top_p < 1:
        raise ValueError(
            f"{algorithm} samples at its algorithm.temperature without top-k/top-p, so that "
            f"the recomputed log-probs are those of the sampling distribution; got {cfg}"
        )


def make_rollout(model: nn.Module, cfg: SamplingConfig) -> Callable[..., dict]:
    """`rollout(params, prompts_BP, prompt_lengths_B, rng) -> dict` (jitted, pure).

    Returns tokens [B, L], mask [B, L], response_mask [B, L-1] (the PPO layout:
    entry t marks token t + 1), no_eos [B], response_lengths [B]. Call it inside
    `train.sharding.mesh_context(mesh)` to shard like training.
    """

    def rollout(params, prompts_BP, prompt_lengths_B, rng):
        samples = sample(model, params, prompts_BP, prompt_lengths_B, rng, cfg)
        out = join_prompt_and_response(
            prompts_BP, prompt_lengths_B, samples.tokens_BT, samples.lengths_B, cfg.pad_id
        )
        out["response_mask"] = out["response_mask"][:, 1:]
        # The sampler's own log-probs in the same layout (a check on the recomputed ones).
        zeros_BP = jnp.zeros(prompts_BP.shape, jnp.float32)
        out["sampler_logp"] = join_prompt_and_response(
            zeros_BP, prompt_lengths_B, samples.logprobs_BT, samples.lengths_B, 0
        )["tokens"][:, 1:]
        out["no_eos"] = ~samples.finished_B
        out["response_lengths"] = samples.lengths_B
        return out

    return jax.jit(rollout)


def prompt_batch(
    prompts: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(prompts_BP, prompt_lengths_B) numpy arrays, right-padded as the sampler expects."""
    length = length or max(len(p) for p in prompts)
    tokens_BP, mask_BP = pad_sequences(prompts, length, pad_id, "right")
    return tokens_BP, mask_BP.sum(axis=1).astype(np.int32)


def response_ids(rollout: dict[str, Any], end_id: int | None = None) -> list[list[int]]:
    """Host-side: each row's generated tokens, without a trailing end/EOS token."""
    tokens = np.asarray(rollout["tokens"])[:, 1:]
    mask = np.asarray(rollout["response_mask"]) > 0
    out = []
    for row, m in zip(tokens, mask):
        ids = row[m].tolist()
        if ids and end_id is not None and ids[-1] == end_id:
            ids = ids[:-1]
        out.append(ids)
    return out
