"""One PPO iteration as a step of the loop: generate, score, update.

Each phase is one compiled call (the KV-cache sampler, `make_prepare`, the PPO step) and
the iteration only moves the adaptive KL coefficient between them (host state that the
stage saves with every checkpoint). Its signature is every step's, `(state, batch, rng) ->
(state, metrics)`, with `batch` = {"prompts", "lengths"}.
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from model.sampling import SamplingConfig
from rlhf.ppo import KLController, PPOConfig, RewardFn, make_ppo_step, make_prepare
from rlhf.reward_model import RewardModel
from rlhf.rollout import check_on_policy_sampling, make_rollout
from train import sharding
from train.state import TrainState


class PPOIteration:
    """The loop's step for PPO: generate, score (`prepare`), update; each phase one compiled
    call, timed. Moves the adaptive KL coefficient between iterations."""

    def __init__(self, rollout, prepare, update, kl: KLController, ref_params, reward_params, mesh):
        self.rollout, self.prepare, self.update = rollout, prepare, update
        self.kl, self.ref_params, self.reward_params, self.mesh = (
            kl,
            ref_params,
            reward_params,
            mesh,
        )

    def __call__(self, state, batch: dict, rng: jax.Array):
        sample_rng, step_rng = jax.random.split(jax.random.fold_in(rng, state.step))
        t0 = time.perf_counter()
        with sharding.mesh_context(self.mesh):
            rollout = self.rollout(
                state.params["policy"], batch["prompts"], batch["lengths"], sample_rng
            )
            rollout = jax.block_until_ready(rollout)
        t1 = time.perf_counter()
        keys = ("tokens", "mask", "response_mask", "no_eos")
        prepared, stats = self.prepare(
            state.params,
            self.ref_params,
            self.reward_params,
            {k: rollout[k] for k in keys},
            sharding.host_to_replicated(np.float32(self.kl.beta), self.mesh),
        )
        prepared = jax.block_until_ready(prepared)
        t2 = time.perf_counter()
        state, metrics = self.update(state, prepared, step_rng)
        metrics = jax.device_get(metrics)
        t3 = time.perf_counter()
        stats = {k: float(v) for k, v in jax.device_get(stats).items()}
        self.kl.update(stats["kl"], n_steps=batch["prompts"].shape[0])
        return state, {
            **stats,
            **metrics,
            "time_generate": t1 - t0,
            "time_score": t2 - t1,
            "time_update": t3 - t2,
            "frac_time_generate": (t1 - t0) / (t3 - t0),
        }


def make_ppo_iteration(
    policy_model: nn.Module,
    value_model: RewardModel,
    reward_fn: RewardFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: TrainState,
    ppo_cfg: PPOConfig,
    sampling_cfg: SamplingConfig,
    kl: KLController,
    ref_params: Any,
    reward_params: Any,
    reward_shardings: Any = None,
) -> PPOIteration:
    """Compiles the three phases for `mesh`. The frozen reference shares the policy's
    shardings; `reward_shardings` (default: replicated) places the reward function's params."""
    check_on_policy_sampling("PPO", ppo_cfg.temperature, sampling_cfg)
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
    update = sharding.jit_step(
        make_ppo_step(policy_model, value_model, tx, ppo_cfg), state_shardings, mesh
    )
    return PPOIteration(
        make_rollout(policy_model, sampling_cfg),
        prepare,
        update,
        kl,
        ref_params,
        reward_params,
        mesh,
    )
