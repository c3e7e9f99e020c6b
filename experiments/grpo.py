"""GRPO on the verifiable reward: `python -m experiments.grpo --config=CONFIG --workdir=DIR`.

Policy and frozen reference from DIR/sft. One step of the loop is one GRPO iteration
(rlhf/grpo_iteration.py): G answers per prompt from the KV-cache sampler, each checked
against the function the prompt asks for (parses, defines the name with the signature, no
undefined names, not a trivial body, similarity to the reference: rlhf/verifier.py,
nothing executed), group-normalised advantages, clipped updates, an optional k3 KL to the
reference. The held-out ground truth is measured every `eval_every` steps and at the end,
beside the SFT model's. Writes DIR/grpo.
"""

from __future__ import annotations

from pathlib import Path

from ml_collections import ConfigDict

from experiments import cli
from model.sampling import SamplingConfig
from rlhf import chat, datasets, stage
from rlhf.evaluation import eval_metrics, held_out_evaluator
from rlhf.grpo import GRPOConfig
from rlhf.grpo_iteration import make_grpo_iteration
from rlhf.verifier import Reference, RewardWeights


def grpo_config(section: ConfigDict) -> GRPOConfig:
    """GRPOConfig from the stage's `algorithm` section (the reward weights excepted)."""
    fields = {k: v for k, v in section.algorithm.items() if k != "reward_weights"}
    return GRPOConfig(
        **fields,
        max_new_tokens=section.data.max_new_tokens,
        num_microbatches=section.train.num_microbatches,
    )


def run(config: ConfigDict, root: Path) -> dict:
    rows = config.grpo.train.global_batch_size * config.grpo.algorithm.group_size
    with stage.open_stage("grpo", config, root, rows_per_step=rows) as ctx:
        if ctx.finished is not None:
            return ctx.finished
        gc, mesh = ctx.section, ctx.mesh
        algo = grpo_config(gc)
        sft = ctx.load_start("sft")
        data = datasets.load(config, root)
        tx = ctx.optimizer(gc.train.num_steps * algo.epochs * algo.num_minibatches)
        policy = ctx.policy(sft, tx)
        lm, state, shardings = policy.model, policy.state, policy.shardings
        sampling = SamplingConfig(
            max_new_tokens=gc.data.max_new_tokens,
            temperature=algo.temperature,
            eos_id=chat.ChatTokens.from_tokenizer(sft.tokenizer).end,
            pad_id=sft.tokenizer.pad_id,
        )
        prompts, records = datasets.prompts_of(
            data["sft_train"], sft.tokenizer, gc.data.max_prompt_len
        )
        step = make_grpo_iteration(
            lm,
            tx,
            mesh,
            shardings,
            algo,
            sampling,
            policy.start_params,
            [Reference.from_sft_record(r) for r in records],
            sft.tokenizer.decode,
            RewardWeights(**gc.algorithm.reward_weights.to_dict()),
        )
        ground_truth = held_out_evaluator(ctx, data, lm, sft.tokenizer)

        def evaluate(state) -> dict[str, float]:
            return eval_metrics(ground_truth(state.params))

        def finish(state):
            return state, {
                "ground_truth": {
                    "sft": ground_truth(policy.start_params),
                    "grpo": ground_truth(state.params),
                }
            }

        return stage.run(
            ctx,
            state=state,
            step=step,
            batches=datasets.PromptBatches(
                prompts,
                gc.train.global_batch_size,
                gc.data.max_prompt_len,
                sft.tokenizer.pad_id,
                gc.train.seed,
                group_size=algo.group_size,
                **stage.process_share(),
            ),
            meta=ctx.meta(sft),
            unit="samples",
            units_per_step=gc.train.global_batch_size * algo.group_size,
            evaluate=evaluate,
            finish=finish,
            progress_keys=("reward_mean", "check_defines_name"),
        )


if __name__ == "__main__":
    cli.stage_main(run, "DIR/sft")
