"""DPO, the one-step alternative to reward model + PPO:
`python -m experiments.dpo --config=CONFIG --workdir=DIR`.

Policy and frozen reference from DIR/sft, the reward model's preference pairs; the
reference log-probs are computed once, then the DPO steps run (rlhf/dpo.py). At the end the
held-out ground truth is measured, with the reward model of DIR/reward for the score
column when it exists. Writes DIR/dpo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ml_collections import ConfigDict

from data.array_batches import ArrayBatches
from experiments import cli
from rlhf import datasets, stage
from rlhf.dpo import DPOConfig, make_dpo_step, make_reference_log_probs
from rlhf.evaluation import held_out_evaluator
from train import sharding


def dpo_config(section: ConfigDict) -> DPOConfig:
    """DPOConfig from the stage's `algorithm` section."""
    return DPOConfig(num_microbatches=section.train.num_microbatches, **section.algorithm.to_dict())


def run(config: ConfigDict, root: Path) -> dict:
    with stage.open_stage("dpo", config, root) as ctx:
        if ctx.finished is not None:
            return ctx.finished
        dc, mesh = ctx.section, ctx.mesh
        sft = ctx.load_start("sft")
        data = datasets.load(config, root)
        tx = ctx.optimizer()
        policy = ctx.policy(sft, tx)
        lm, state, shardings = policy.model, policy.state, policy.shardings
        arrays, _ = datasets.pair_arrays(data["pairs_train"], sft.tokenizer, dc.data.seq_len)
        bs = dc.train.global_batch_size
        # Reference log-probs only for the pairs the steps will see (one epoch at most).
        available = len(arrays["chosen_tokens"]) // bs * bs
        if not available:
            raise ValueError(
                f"dpo: {len(arrays['chosen_tokens'])} preference pairs fit in "
                f"dpo.data.seq_len, fewer than dpo.train.global_batch_size={bs}: lower the "
                "batch size"
            )
        n = min(available, dc.train.num_steps * bs)
        keep = np.random.default_rng(dc.train.seed).permutation(available)[:n]
        arrays = {k: v[keep] for k, v in arrays.items()}
        reference = sharding.jit_sharded(
            make_reference_log_probs(lm),
            mesh,
            in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
            out_shardings=sharding.batch_sharding(mesh),
        )
        ref = [
            sharding.to_host(
                reference(
                    policy.start_params,
                    sharding.full_to_global({k: v[i : i + bs] for k, v in arrays.items()}, mesh),
                )
            )
            for i in range(0, n, bs)
        ]
        for key in ("ref_chosen_logp", "ref_rejected_logp"):
            arrays[key] = np.concatenate([r[key] for r in ref])
        algo = dpo_config(dc)
        evaluate = held_out_evaluator(ctx, data, lm, sft.tokenizer)
        return stage.run(
            ctx,
            state=state,
            step=sharding.jit_step(make_dpo_step(lm, tx, algo), shardings, mesh),
            batches=ArrayBatches(arrays, bs, dc.train.seed, **stage.process_share()),
            meta=ctx.meta(sft),
            unit="pairs",
            units_per_step=bs,
            finish=lambda s: (s, {"ground_truth": {"dpo": evaluate(s.params)}}),
            progress_keys=("loss", "accuracy"),
        )


if __name__ == "__main__":
    cli.stage_main(run, "DIR/sft")
