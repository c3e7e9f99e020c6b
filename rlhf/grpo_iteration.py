"""One GRPO iteration as a step of the loop: sample G answers per prompt, score them with
the verifiable reward on the host (rlhf/verifier.py: parsed, never executed), prepare
group advantages and the old/reference log-probs, update. No value model.

`batch` = {"prompts", "lengths", "index"} from `rlhf.datasets.PromptBatches(group_size=G)`:
each prompt repeated G times in consecutive rows, "index" naming its reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from model.sampling import SamplingConfig
from rlhf.grpo import GRPOConfig, make_grpo_prepare, make_grpo_step
from rlhf.rollout import check_on_policy_sampling, make_rollout, response_ids
from rlhf.verifier import Reference, RewardWeights, check_answer, reward_from_checks
from train import sharding
from train.state import TrainState


class GRPOIteration:
    def __init__(
        self, rollout, prepare, update, ref_params, references, decode, end_id, weights, mesh
    ):
        self.rollout, self.prepare, self.update = rollout, prepare, update
        self.ref_params, self.references, self.decode = ref_params, references, decode
        self.end_id, self.weights, self.mesh = end_id, weights, mesh

    def __call__(self, state: TrainState, batch: dict, rng: jax.Array):
        sample_rng, step_rng = jax.random.split(jax.random.fold_in(rng, state.step))
        t0 = time.perf_counter()
        with sharding.mesh_context(self.mesh):
            rollout = self.rollout(state.params, batch["prompts"], batch["lengths"], sample_rng)
        host = sharding.to_host({k: rollout[k] for k in ("tokens", "response_mask")})
        index = np.asarray(sharding.to_host(batch["index"]))
        t1 = time.perf_counter()
        answers = [self.decode(ids) for ids in response_ids(host, self.end_id)]
        checks = [check_answer(a, self.references[i]) for a, i in zip(answers, index)]
        rewards_B = np.asarray([reward_from_checks(c, self.weights) for c in checks], np.float32)
        t2 = time.perf_counter()
        keys = ("tokens", "mask", "response_mask", "no_eos")
        prepared, stats = self.prepare(
            state.params,
            self.ref_params,
            {k: rollout[k] for k in keys},
            sharding.full_to_global({"r": rewards_B}, self.mesh)["r"],
        )
        state, metrics = self.update(state, prepared, step_rng)
        metrics, stats = jax.device_get((metrics, stats))
        t3 = time.perf_counter()
        components = {f"check_{k}": float(np.mean([c[k] for c in checks])) for k in checks[0]}
        return state, {
            **{k: float(v) for k, v in stats.items()},
            **{k: float(v) for k, v in metrics.items()},
            **components,
            "time_generate": t1 - t0,
            "time_reward": t2 - t1,
            "time_update": t3 - t2,
        }


def make_grpo_iteration(
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: TrainState,
    cfg: GRPOConfig,
    sampling_cfg: SamplingConfig,
    ref_params: Any,
    references: Sequence[Reference],
    decode: Callable[[list[int]], str],
    weights: RewardWeights = RewardWeights(),
) -> GRPOIteration:
    """Compiles sampler, prepare and step for `mesh`; `decode(ids) -> text` is the
    tokenizer's, `references[i]` the held-out function prompt i asks for."""
    check_on_policy_sampling("GRPO", cfg.temperature, sampling_cfg)
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    params_sh = state_shardings.params
    prepare = sharding.jit_sharded(
        make_grpo_prepare(model, cfg),
        mesh,
        in_shardings=(params_sh, params_sh if cfg.kl_beta > 0 else replicated, batch, batch),
        out_shardings=(batch, replicated),
    )
    update = sharding.jit_step(make_grpo_step(model, tx, cfg), state_shardings, mesh)
    return GRPOIteration(
        make_rollout(model, sampling_cfg),
        prepare,
        update,
        ref_params if cfg.kl_beta > 0 else None,
        list(references),
        decode,
        sampling_cfg.eos_id,
        weights,
        mesh,
    )
