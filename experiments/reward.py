"""Reward model: `python -m experiments.reward --config=CONFIG --workdir=DIR`.

Starts from the SFT trunk (DIR/sft) with a new scalar head, trains trunk and head with the
Bradley-Terry loss on the mined preference pairs, evaluates held-out accuracy per kind of
corruption, and at the end normalises the reward so that the SFT policy's own samples
score mean 0, std 1 (folded into the head: the saved model scores normalised). DIR/reward.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from data.array_batches import ArrayBatches
from experiments import cli
from model.sampling import SamplingConfig
from model.transformer import LanguageModel
from rlhf import chat, datasets, stage
from rlhf.evaluation import generate
from rlhf.reward_model import (
    RewardModel,
    fold_normalization,
    init_from_lm,
    normalization,
    sequence_reward,
)
from rlhf.reward_step import make_reward_eval, make_reward_step
from rlhf.rollout import make_rollout
from train import sharding
from train.state import copy_to, create_train_state, init_fn


def accuracy_by_kind(
    evaluate: Callable, params: Any, arrays: dict, kinds: list[str], batch_size: int, mesh: Mesh
) -> dict[str, float]:
    """Held-out accuracy and mean margin, overall and for each corruption kind."""
    n = len(kinds) // batch_size * batch_size
    diffs = []
    for i in range(0, n, batch_size):
        batch = sharding.full_to_global({k: v[i : i + batch_size] for k, v in arrays.items()}, mesh)
        out = sharding.to_host(evaluate(params, batch))
        diffs.append(np.asarray(out["chosen"]) - np.asarray(out["rejected"]))
    diffs = np.concatenate(diffs) if diffs else np.zeros((0,))
    by_kind = collections.defaultdict(list)
    for kind, d in zip(kinds[:n], diffs):
        by_kind[kind].append(d)
    result = {f"eval/accuracy/{k}": float(np.mean(np.asarray(v) > 0)) for k, v in by_kind.items()}
    result["eval/accuracy"] = float(np.mean(diffs > 0)) if n else float("nan")
    result["eval/margin"] = float(np.mean(diffs)) if n else float("nan")
    return result


def run(config: ConfigDict, root: Path) -> dict:
    with stage.open_stage("reward", config, root) as ctx:
        if ctx.finished is not None:
            return ctx.finished
        rc, mesh = ctx.section, ctx.mesh
        sft = ctx.load_start("sft")
        data = datasets.load(config, root)
        lm, rm = LanguageModel(sft.cfg), RewardModel(sft.cfg)
        tx = ctx.optimizer()
        state, shardings = create_train_state(init_fn(rm), tx, mesh, jax.random.key(config.seed))
        params = init_from_lm(state.params, sft.params)  # the SFT trunk, a new head
        state = state.replace(params=copy_to(params, shardings.params))
        train_arrays, _ = datasets.pair_arrays(data["pairs_train"], sft.tokenizer, rc.data.seq_len)
        eval_arrays, kinds = datasets.pair_arrays(
            data["pairs_eval"], sft.tokenizer, rc.data.seq_len
        )
        if rc.algorithm.margin:
            n = len(train_arrays["chosen_tokens"])
            train_arrays["margin"] = np.full(n, rc.algorithm.margin, np.float32)
        evaluate = sharding.jit_sharded(
            make_reward_eval(rm),
            mesh,
            in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
            out_shardings=sharding.replicated(mesh),
        )
        bs = rc.train.global_batch_size

        def finish(state):
            """Normalise on the SFT policy's own samples at the PPO temperature."""
            pc = config.ppo
            prompts, _ = datasets.prompts_of(
                data["sft_train"], sft.tokenizer, pc.data.max_prompt_len
            )
            sampling = SamplingConfig(
                max_new_tokens=pc.data.max_new_tokens,
                temperature=pc.algorithm.temperature,
                eos_id=chat.ChatTokens.from_tokenizer(sft.tokenizer).end,
                pad_id=sft.tokenizer.pad_id,
            )
            rollouts = generate(
                make_rollout(lm, sampling),
                sft.params,
                prompts[: rc.data.normalization_samples],
                pc.data.max_prompt_len,
                sft.tokenizer.pad_id,
                pc.train.global_batch_size,
                mesh,
                config.seed,
                jax.jit(lambda p, t, m: sequence_reward(rm, p, t, m)),
                state.params,
            )
            raw = np.concatenate([r["score"] for r in rollouts])
            gain, bias = normalization(raw)
            params = copy_to(fold_normalization(state.params, gain, bias), shardings.params)
            return state.replace(params=params), {
                "reward/train_pairs": len(train_arrays["chosen_tokens"]),
                "reward/sft_sample_raw_mean": float(raw.mean()),
                "reward/sft_sample_raw_std": float(raw.std()),
                "reward/gain": float(gain),
                "reward/bias": float(bias),
            }

        return stage.run(
            ctx,
            state=state,
            step=sharding.jit_step(make_reward_step(rm, tx), shardings, mesh),
            batches=ArrayBatches(train_arrays, bs, rc.train.seed, **stage.process_share()),
            meta=ctx.meta(sft, model_kind="reward"),
            unit="pairs",
            units_per_step=bs,
            evaluate=lambda s: accuracy_by_kind(evaluate, s.params, eval_arrays, kinds, bs, mesh),
            finish=finish,
            progress_keys=("loss", "accuracy"),
        )


if __name__ == "__main__":
    cli.stage_main(run, "DIR/sft")
