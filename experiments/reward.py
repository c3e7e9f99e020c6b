"""Reward model: `python -m experiments.reward --config=CONFIG --workdir=DIR`.

Starts from the SFT trunk (DIR/sft), trains a scalar head and the trunk with
the Bradley-Terry loss on the mined preference pairs, reports held-out
accuracy per kind of corruption, then normalises the reward so that the SFT
policy's own samples score mean 0, std 1, and saves DIR/reward.
"""

from __future__ import annotations

import collections
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict

from experiments import posttrain_common as common
from experiments.resume import StageResume
from model.sampling import SamplingConfig
from model.transformer import LanguageModel
from rlhf import chat
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
from train.metrics_writer import MetricsWriter
from train.state import create_train_state


def pair_arrays(pairs: list[dict], tokenizer, length: int) -> tuple[dict, list[str]]:
    """The pair batch of every pair whose two sides fit in `length` (strictly, so the
    last real token is never cut), and the corruption kind of each kept pair."""
    batch = chat.preference_batch(pairs, tokenizer, length)
    keep = (batch["chosen_mask"][:, -1] == 0) & (batch["rejected_mask"][:, -1] == 0)
    return {k: v[keep] for k, v in batch.items()}, [p["kind"] for p, k in zip(pairs, keep) if k]


def accuracy_by_kind(evaluate, params, arrays: dict, kinds: list[str], batch_size: int, mesh):
    """Held-out accuracy and mean margin for each corruption kind."""
    n = len(kinds) // batch_size * batch_size
    diffs = []
    for i in range(0, n, batch_size):
        batch = jax.device_put(
            {k: v[i : i + batch_size] for k, v in arrays.items()}, sharding.batch_sharding(mesh)
        )
        out = jax.device_get(evaluate(params, batch))
        diffs.append(np.asarray(out["chosen"]) - np.asarray(out["rejected"]))
    diffs = np.concatenate(diffs) if diffs else np.zeros((0,))
    by_kind = collections.defaultdict(list)
    for kind, d in zip(kinds[:n], diffs):
        by_kind[kind].append(d)
    result = {
        f"reward/eval_accuracy/{k}": float(np.mean(np.asarray(v) > 0)) for k, v in by_kind.items()
    }
    result["reward/eval_accuracy"] = float(np.mean(diffs > 0)) if n else float("nan")
    result["reward/eval_margin"] = float(np.mean(diffs)) if n else float("nan")
    return result


def run(config: ConfigDict, root: Path) -> dict[str, float]:
    with StageResume(root / "reward", config, config.reward.checkpoint_every) as resume:
        return _run(config, root, resume)


def _run(config: ConfigDict, root: Path, resume: StageResume) -> dict[str, float]:
    rc, pc = config.reward, config.ppo
    pre = common.load_pretrained(config, root)
    mesh, tokenizer = pre.mesh, pre.tokenizer
    data = common.posttrain_data(config, root)
    lm, rm = LanguageModel(pre.cfg), RewardModel(pre.cfg)
    lm_init = common.params_init(lm)
    rm_init = common.params_init(rm)
    sft_params = common.load_params(root / "sft", lm_init, mesh)
    tx = common.optimizer(rc)
    state, shardings = create_train_state(rm_init, tx, mesh, jax.random.key(config.seed))
    params = init_from_lm(state.params, sft_params)
    state = resume.restore(state.replace(params=common.copy_to(params, shardings.params)))

    train_arrays, _ = pair_arrays(data["pairs_train"], tokenizer, rc.seq_len)
    eval_arrays, eval_kinds = pair_arrays(data["pairs_eval"], tokenizer, rc.seq_len)
    if rc.margin:
        train_arrays["margin"] = np.full(len(train_arrays["chosen_tokens"]), rc.margin, np.float32)
    step = common.jit_step(make_reward_step(rm, tx), shardings, mesh)
    evaluate = sharding.jit_sharded(
        make_reward_eval(rm),
        mesh,
        in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
    out = root / "reward"
    out.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(out, resume_step=resume.step)
    batches = common.random_batches(train_arrays, rc.batch_size, config.seed, start=resume.step)
    state, last = common.fit(
        step, state, batches, rc.steps, mesh, writer, rc.log_every, "reward", resume=resume
    )
    writer.close()
    metrics = {
        **last,
        "reward/train_pairs": len(train_arrays["chosen_tokens"]),
        **accuracy_by_kind(evaluate, state.params, eval_arrays, eval_kinds, rc.batch_size, mesh),
    }

    # Normalise on the SFT policy's own samples at the PPO temperature (as PPO will see them).
    prompts, _ = common.prompts_of(data["sft_train"], tokenizer, pc.max_prompt_len)
    prompts = prompts[: rc.normalization_samples]
    ends = chat.ChatTokens.from_tokenizer(tokenizer)
    sampling = SamplingConfig(
        max_new_tokens=pc.max_new_tokens,
        temperature=pc.temperature,
        eos_id=ends.end,
        pad_id=tokenizer.pad_id,
    )
    score = jax.jit(lambda p, t, m: sequence_reward(rm, p, t, m))
    rollouts = common.generate(
        make_rollout(lm, sampling),
        sft_params,
        prompts,
        pc.max_prompt_len,
        tokenizer.pad_id,
        pc.batch_size,
        mesh,
        config.seed,
        score,
        state.params,
    )
    raw = np.concatenate([r["score"] for r in rollouts])
    gain, bias = normalization(raw)
    params = fold_normalization(state.params, gain, bias)
    common.save_params(out, params, {"gain": float(gain), "bias": float(bias)})
    resume.finish()
    metrics.update(
        {
            "reward/sft_sample_raw_mean": float(raw.mean()),
            "reward/sft_sample_raw_std": float(raw.std()),
            "reward/gain": float(gain),
            "reward/bias": float(bias),
        }
    )
    return metrics


if __name__ == "__main__":
    common.stage_main(run, "DIR/sft")
