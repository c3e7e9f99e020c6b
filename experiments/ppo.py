"""PPO against the reward model: `python -m experiments.ppo --config=CONFIG --workdir=DIR`.

Policy and frozen reference from DIR/sft, critic (initialised as the reward model, as in
InstructGPT) and reward from DIR/reward. One step of the loop is one PPO iteration:
sample responses for a batch of prompts with the KV-cache sampler, score them, run the
PPO epochs (rlhf/ppo.py); the adaptive KL coefficient is host state, saved with every
checkpoint. The held-out ground truth is measured every `eval_every` iterations and at the
end, beside the SFT model's. Writes DIR/ppo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from experiments import cli
from model.sampling import SamplingConfig
from model.transformer import LanguageModel
from rlhf import chat, datasets, stage
from rlhf.evaluation import eval_metrics, held_out_evaluator
from rlhf.ppo import KLController, PPOConfig, reward_model_fn
from rlhf.ppo_iteration import make_ppo_iteration
from rlhf.reward_model import RewardModel
from train.metrics_writer import read_metrics
from train.state import init_fn, state_with_params


def ppo_config(section: ConfigDict) -> PPOConfig:
    """PPOConfig from the stage's `algorithm` section (the KL controller's fields excepted)."""
    controller = ("kl_coef", "kl_target", "kl_horizon")  # KLController's, host side
    fields = {k: v for k, v in section.algorithm.items() if k not in controller}
    return PPOConfig(**fields, num_microbatches=section.train.num_microbatches)


def run(config: ConfigDict, root: Path) -> dict:
    with stage.open_stage("ppo", config, root) as ctx:
        if ctx.finished is not None:
            return ctx.finished
        pc, mesh = ctx.section, ctx.mesh
        algo = ppo_config(pc)
        sft = ctx.load_start("sft")
        reward_params = ctx.load_reward(sft.cfg)
        data = datasets.load(config, root)
        lm, rm = LanguageModel(sft.cfg), RewardModel(sft.cfg)
        tx = ctx.optimizer(pc.train.num_steps * algo.epochs * algo.num_minibatches)
        # The critic starts as the reward model; policy and critic get fresh copies.
        state, shardings = state_with_params(
            lambda r: {"policy": init_fn(lm)(r), "value": init_fn(rm)(r)},
            {"policy": sft.params, "value": reward_params},
            tx,
            mesh,
        )
        sampling = SamplingConfig(
            max_new_tokens=pc.data.max_new_tokens,
            temperature=algo.temperature,
            eos_id=chat.ChatTokens.from_tokenizer(sft.tokenizer).end,
            pad_id=sft.tokenizer.pad_id,
        )
        a = pc.algorithm
        kl = KLController(a.kl_coef, a.kl_target or None, a.kl_horizon)
        step = make_ppo_iteration(
            lm,
            rm,
            reward_model_fn(rm),
            tx,
            mesh,
            shardings,
            algo,
            sampling,
            kl,
            sft.params,
            reward_params,
            reward_shardings=shardings.params["value"],
        )
        prompts, _ = datasets.prompts_of(data["sft_train"], sft.tokenizer, pc.data.max_prompt_len)
        ground_truth = held_out_evaluator(ctx, data, lm, sft.tokenizer)

        def evaluate(state) -> dict[str, float]:
            return eval_metrics(ground_truth(state.params["policy"]))

        def finish(state):
            scores = [
                r["ppo/score_mean"]
                for r in read_metrics(ctx.directory / "metrics.jsonl")
                if r.get("ppo/score_mean") is not None
            ]
            k = max(1, len(scores) // 5)
            return state, {
                "ppo/score_first": float(np.mean(scores[:k])) if scores else float("nan"),
                "ppo/score_last": float(np.mean(scores[-k:])) if scores else float("nan"),
                "ground_truth": {
                    "sft": ground_truth(sft.params),
                    "ppo": ground_truth(state.params["policy"]),
                },
            }

        return stage.run(
            ctx,
            state=state,
            step=step,
            batches=datasets.PromptBatches(
                prompts,
                pc.train.global_batch_size,
                pc.data.max_prompt_len,
                sft.tokenizer.pad_id,
                pc.train.seed,
                **stage.process_share(),
            ),
            meta=ctx.meta(sft, lm_params="policy"),
            unit="samples",
            units_per_step=pc.train.global_batch_size,
            evaluate=evaluate,
            finish=finish,
            host_state=lambda: {"beta": kl.beta},
            set_host_state=lambda h: setattr(kl, "beta", h.get("beta", kl.beta)),
            progress_keys=("score_mean", "kl"),
        )


if __name__ == "__main__":
    cli.stage_main(run, "DIR/sft and DIR/reward")
