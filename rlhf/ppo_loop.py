"""One PPO iteration on the host: generate, score, update, with the time of each.

Each phase is one compiled call — the KV-cache sampler, `make_prepare`, the
PPO step — and the loop only moves the KL coefficient between them (the
adaptive controller is host state).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from model.sampling import SamplingConfig
from rlhf.ppo import KLController, PPOConfig, RewardFn, make_ppo_step, make_prepare
from rlhf.reward_model import RewardModel
from rlhf.rollout import make_rollout
from train import sharding
from train.state import TrainState


@dataclasses.dataclass
class PPOTrainer:
    rollout: Callable  # (policy_params, prompts_BP, lengths_B, rng) -> rollout dict
    prepare: Callable  # (params, ref_params, reward_params, rollout, beta) -> (batch, stats)
    step: Callable  # (state, batch, rng) -> (state, metrics)
    kl: KLController
    mesh: Mesh

    def iteration(
        self,
        state: TrainState,
        ref_params: Any,
        reward_params: Any,
        prompts_BP,
        prompt_lengths_B,
        rng: jax.Array,
    ) -> tuple[TrainState, dict[str, float]]:
        """Generates for a batch of prompts, scores, and runs the PPO epochs."""
        sample_rng, step_rng = jax.random.split(rng)
        batch_sharding = sharding.batch_sharding(self.mesh)
        t0 = time.perf_counter()
        with sharding.mesh_context(self.mesh):
            prompts_BP = jax.device_put(prompts_BP, batch_sharding)
            prompt_lengths_B = jax.device_put(prompt_lengths_B, batch_sharding)
            rollout = self.rollout(state.params["policy"], prompts_BP, prompt_lengths_B, sample_rng)
            rollout = jax.block_until_ready(rollout)
        t1 = time.perf_counter()
        keys = ("tokens", "mask", "response_mask", "no_eos")
        batch, stats = self.prepare(
            state.params, ref_params, reward_params, {k: rollout[k] for k in keys}, self.kl.beta
        )
        batch = jax.block_until_ready(batch)
        t2 = time.perf_counter()
        state, metrics = self.step(state, batch, step_rng)
        metrics = jax.device_get(metrics)
        t3 = time.perf_counter()
        stats = {k: float(v) for k, v in jax.device_get(stats).items()}
        B = prompts_BP.shape[0]
        self.kl.update(stats["kl"], n_steps=B)
        total = t3 - t0
        return state, {
            **stats,
            **{k: float(v) for k, v in metrics.items()},
            "time_generate": t1 - t0,
            "time_score": t2 - t1,
            "time_update": t3 - t2,
            "frac_time_generate": (t1 - t0) / total,
        }


def make_ppo_trainer(
    policy_model: nn.Module,
    value_model: RewardModel,
    reward_fn: RewardFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: TrainState,
    ppo_cfg: PPOConfig,
    sampling_cfg: SamplingConfig,
    kl: KLController,
    reward_shardings: Any = None,
) -> PPOTrainer:
    """Compiles the three phases for `mesh`. The frozen reference shares the policy's
    shardings; `reward_shardings` (default: replicated) places the reward function's params."""
    s = sampling_cfg
    if s.temperature != ppo_cfg.temperature or s.top_k or s.top_p < 1:
        raise ValueError(
            "PPO samples at PPOConfig.temperature without top-k/top-p, so that the recomputed "
            f"log-probs are those of the sampling distribution; got {sampling_cfg}"
        )
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    params_sh = state_shardings.params
    prepare = sharding.jit_sharded(
        make_prepare(policy_model, value_model, reward_fn, ppo_cfg),
        mesh,
        in_shardings=(
            params_sh,
            params_sh["policy"],
            reward_shardings or replicated,
            batch,
            replicated,
        ),
        out_shardings=(batch, replicated),
    )
    step = sharding.jit_sharded(
        make_ppo_step(policy_model, value_model, tx, ppo_cfg),
        mesh,
        in_shardings=(state_shardings, batch, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    return PPOTrainer(make_rollout(policy_model, sampling_cfg), prepare, step, kl, mesh)
