"""Supervised fine-tuning: `python -m experiments.sft --config=CONFIG --workdir=DIR`.

Starts from DIR/pretrain (or the model `init_from` names), fine-tunes on the mined chat set
(loss on assistant tokens only, examples packed with segment ids) and writes DIR/sft. The
step is pretraining's (rlhf/sft_step.py); only the data differs.
"""

from __future__ import annotations

from pathlib import Path

from ml_collections import ConfigDict

from data.array_batches import ArrayBatches
from experiments import cli
from rlhf import datasets, stage
from rlhf.sft_step import StepConfig, make_sft_step
from train import flops, sharding
from train.evaluate import evaluate, make_eval_step


def run(config: ConfigDict, root: Path) -> dict:
    with stage.open_stage("sft", config, root) as ctx:
        if ctx.finished is not None:
            return ctx.finished
        sc = ctx.section
        start = ctx.load_start("pretrain", config.pretrain_checkpoint)
        data = datasets.load(config, root)
        tx = ctx.optimizer()
        policy = ctx.policy(start, tx)
        model, state, shardings = policy.model, policy.state, policy.shardings
        rows = datasets.chat_rows(data["sft_train"], start.tokenizer, sc.data.seq_len)
        eval_rows = datasets.chat_rows(data["sft_eval"], start.tokenizer, sc.data.seq_len)
        step = sharding.jit_step(
            make_sft_step(model, tx, StepConfig(sc.train.num_microbatches)), shardings, ctx.mesh
        )
        eval_step = sharding.jit_sharded(
            make_eval_step(model),
            ctx.mesh,
            in_shardings=(shardings.params, sharding.batch_sharding(ctx.mesh)),
            out_shardings=sharding.replicated(ctx.mesh),
        )
        bs = sc.train.global_batch_size
        n_eval = min(len(eval_rows["inputs"]), sc.data.eval_rows) // bs * bs
        eval_batches = [
            sharding.full_to_global({k: v[i : i + bs] for k, v in eval_rows.items()}, ctx.mesh)
            for i in range(0, n_eval, bs)
        ]

        def finish(state):
            before = evaluate(eval_step, policy.start_params, eval_batches, None)
            return state, {
                "sft/train_rows": len(rows["inputs"]),
                "sft/eval_loss_before": before["eval/loss"],
            }

        return stage.run(
            ctx,
            state=state,
            step=step,
            batches=ArrayBatches(rows, bs, sc.train.seed, **stage.process_share()),
            meta=ctx.meta(start),
            units_per_step=bs * sc.data.seq_len,
            flops_per_unit=flops.flops_per_token(start.cfg, sc.data.seq_len),
            evaluate=lambda s: evaluate(eval_step, s.params, eval_batches, None),
            finish=finish,
        )


if __name__ == "__main__":
    cli.stage_main(run, "DIR/pretrain")
