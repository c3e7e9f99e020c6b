"""PPO against the reward model: `python -m experiments.ppo --config=CONFIG --workdir=DIR`.

Policy and frozen reference from DIR/sft, critic and reward from DIR/reward.
Each iteration samples responses with the KV-cache sampler, scores them, and
runs the PPO epochs; the held-out ground truth (parse rate, defines the
requested name, reward) is measured before and after. Saves DIR/ppo.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict

from experiments import posttrain_common as common
from experiments.resume import StageResume
from model.sampling import SamplingConfig
from model.transformer import LanguageModel
from rlhf import chat
from rlhf.ppo import KLController, PPOConfig, reward_model_fn
from rlhf.ppo_loop import make_ppo_trainer
from rlhf.reward_model import RewardModel, sequence_reward
from rlhf.rollout import make_rollout, prompt_batch
from train.metrics_writer import MetricsWriter


def ground_truth_fn(config: ConfigDict, root: Path, pre, lm, rm):
    """`evaluate(policy_params, reward_params) -> ground truth` on the held-out prompts."""
    pc = config.ppo
    data = common.posttrain_data(config, root)
    prompts, names = common.prompts_of(data["sft_eval"], pre.tokenizer, pc.max_prompt_len)
    prompts, names = prompts[: config.eval.num_prompts], names[: config.eval.num_prompts]
    sampling = SamplingConfig(
        max_new_tokens=pc.max_new_tokens,
        temperature=config.eval.temperature,
        eos_id=chat.ChatTokens.from_tokenizer(pre.tokenizer).end,
        pad_id=pre.tokenizer.pad_id,
    )
    rollout = make_rollout(lm, sampling)
    score = jax.jit(lambda p, t, m: sequence_reward(rm, p, t, m))
    return lambda policy_params, reward_params: common.evaluate_policy(
        rollout,
        score,
        policy_params,
        reward_params,
        prompts,
        names,
        pre.tokenizer,
        pc.max_prompt_len,
        pc.batch_size,
        pre.mesh,
        config.seed + 7,
    )


def run(config: ConfigDict, root: Path) -> dict:
    with StageResume(root / "ppo", config, config.ppo.checkpoint_every) as resume:
        return _run(config, root, resume)


def _run(config: ConfigDict, root: Path, resume: StageResume) -> dict:
    pc = config.ppo
    pre = common.load_pretrained(config, root)
    mesh, tokenizer = pre.mesh, pre.tokenizer
    data = common.posttrain_data(config, root)
    lm, rm = LanguageModel(pre.cfg), RewardModel(pre.cfg)
    lm_init = common.params_init(lm)
    rm_init = common.params_init(rm)
    sft_params = common.load_params(root / "sft", lm_init, mesh)
    reward_params = common.load_params(root / "reward", rm_init, mesh)
    updates = pc.iterations * pc.epochs * pc.num_minibatches
    tx = common.optimizer(ConfigDict(dict(lr=pc.lr, warmup_steps=pc.warmup_steps, steps=updates)))
    # The critic starts as the reward model (InstructGPT); both get fresh copies.
    state, shardings = common.state_from(
        lambda r: {"policy": lm_init(r), "value": rm_init(r)},
        {"policy": sft_params, "value": reward_params},
        tx,
        mesh,
    )
    ppo_cfg = PPOConfig(
        temperature=pc.temperature,
        lam=pc.lam,
        clip_eps=pc.clip_eps,
        value_clip=pc.value_clip,
        vf_coef=pc.vf_coef,
        epochs=pc.epochs,
        num_minibatches=pc.num_minibatches,
        missing_eos_penalty=pc.missing_eos_penalty,
    )
    end = chat.ChatTokens.from_tokenizer(tokenizer).end
    sampling = SamplingConfig(
        max_new_tokens=pc.max_new_tokens,
        temperature=pc.temperature,
        eos_id=end,
        pad_id=tokenizer.pad_id,
    )
    kl = KLController(pc.kl_coef, pc.kl_target or None, pc.kl_horizon)
    trainer = make_ppo_trainer(
        lm,
        rm,
        reward_model_fn(rm),
        tx,
        mesh,
        shardings,
        ppo_cfg,
        sampling,
        kl,
        reward_shardings=shardings.params["value"],
    )
    ground_truth = ground_truth_fn(config, root, pre, lm, rm)
    # Host state of the loop: restored when resuming, so that nothing is measured twice.
    state = resume.restore(state)
    host = resume.host
    if "before" not in host:
        host["before"] = ground_truth(sft_params, reward_params)
    history = host.setdefault("history", [])
    kl.beta = host.get("beta", kl.beta)  # the adaptive coefficient (the trainer holds `kl`)

    prompts, _ = common.prompts_of(data["sft_train"], tokenizer, pc.max_prompt_len)
    out = root / "ppo"
    out.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(out, resume_step=resume.step)
    for it in range(resume.step + 1, pc.iterations + 1):
        # Prompts and keys depend on (seed, iteration) alone: a resumed run draws the same.
        chosen = np.random.default_rng([config.seed, it]).choice(
            len(prompts), pc.batch_size, replace=False
        )
        prompts_BP, lengths_B = prompt_batch(
            [prompts[i] for i in chosen], tokenizer.pad_id, pc.max_prompt_len
        )
        state, metrics = trainer.iteration(
            state, sft_params, reward_params, prompts_BP, lengths_B, jax.random.key(1000 + it)
        )
        metrics = {f"ppo/{k}": v for k, v in metrics.items()}
        writer.write(it, metrics)
        history.append(metrics)
        host["beta"] = kl.beta
        resume.step_done(it, state, last=it == pc.iterations)
        if it % pc.log_every == 0 or it == pc.iterations:
            common.log.info(
                "ppo iteration %d: score %.3f kl %.3f beta %.4f len %.1f no_eos %.2f gen %.0f%%",
                it,
                metrics["ppo/score_mean"],
                metrics["ppo/kl"],
                metrics["ppo/beta"],
                metrics["ppo/response_length"],
                metrics["ppo/no_eos_frac"],
                100 * metrics["ppo/frac_time_generate"],
            )
    writer.close()
    after = ground_truth(state.params["policy"], reward_params)
    common.save_params(out, state.params["policy"], {"iterations": pc.iterations})
    resume.finish()
    k = max(1, len(history) // 5)
    return {
        **history[-1],
        "ppo/score_first": float(np.mean([h["ppo/score_mean"] for h in history[:k]])),
        "ppo/score_last": float(np.mean([h["ppo/score_mean"] for h in history[-k:]])),
        "ground_truth": {"sft": host["before"], "ppo": after},
    }


if __name__ == "__main__":
    common.stage_main(run, "DIR/sft and DIR/reward")
