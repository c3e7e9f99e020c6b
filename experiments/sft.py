"""Supervised fine-tuning: `python -m experiments.sft --config=CONFIG --workdir=DIR`.

Loads DIR/pretrain, fine-tunes on the mined chat set (loss on assistant
tokens only, examples packed with segment ids) and saves DIR/sft.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict

from experiments import posttrain_common as common
from experiments.resume import StageResume
from model.transformer import LanguageModel
from rlhf import chat
from rlhf.sft_step import StepConfig, make_sft_step
from train import sharding
from train.evaluate import evaluate, make_eval_step
from train.metrics_writer import MetricsWriter


def chat_rows(records: list[dict], tokenizer, seq_len: int) -> dict[str, np.ndarray]:
    """Packed rows of the conversations that fit in `seq_len` (longer ones are dropped,
    not truncated, so every answer is trained to its end)."""
    tokens = chat.ChatTokens.from_tokenizer(tokenizer)
    examples = [chat.sft_example(r["messages"], tokenizer, tokens) for r in records]
    return chat.pack_examples([e for e in examples if len(e[0]) <= seq_len], seq_len)


def run(config: ConfigDict, root: Path) -> dict[str, float]:
    with StageResume(root / "sft", config, config.sft.checkpoint_every) as resume:
        return _run(config, root, resume)


def _run(config: ConfigDict, root: Path, resume: StageResume) -> dict[str, float]:
    sc = config.sft
    pre = common.load_pretrained(config, root)
    data = common.posttrain_data(config, root)
    model = LanguageModel(pre.cfg)
    tx = common.optimizer(sc)
    state, shardings = common.state_from(common.params_init(model), pre.params, tx, pre.mesh)
    state = resume.restore(state)
    rows = chat_rows(data["sft_train"], pre.tokenizer, sc.seq_len)
    eval_rows = chat_rows(data["sft_eval"], pre.tokenizer, sc.seq_len)
    step = common.jit_step(make_sft_step(model, tx, StepConfig()), shardings, pre.mesh)
    eval_step = sharding.jit_sharded(
        make_eval_step(model),
        pre.mesh,
        in_shardings=(shardings.params, sharding.batch_sharding(pre.mesh)),
        out_shardings=sharding.replicated(pre.mesh),
    )
    bs = sc.batch_size
    n_eval = min(len(eval_rows["inputs"]), sc.eval_rows) // bs * bs
    eval_batches = [
        jax.device_put(
            {k: v[i : i + bs] for k, v in eval_rows.items()}, sharding.batch_sharding(pre.mesh)
        )
        for i in range(0, n_eval, bs)
    ]
    out = root / "sft"
    out.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(out, resume_step=resume.step)
    if "before" not in resume.host:  # of the pretrained params: kept for a resumed run
        resume.host["before"] = evaluate(eval_step, state.params, eval_batches, None)
    before = resume.host["before"]
    batches = common.random_batches(rows, sc.batch_size, config.seed, start=resume.step)
    state, last = common.fit(
        step, state, batches, sc.steps, pre.mesh, writer, sc.log_every, "sft", resume=resume
    )
    after = evaluate(eval_step, state.params, eval_batches, None)
    writer.close()
    common.save_params(out, state.params, {"model": pre.cfg.__dict__})
    resume.finish()
    return {
        **last,
        "sft/train_rows": len(rows["inputs"]),
        "sft/eval_loss_before": before["eval/loss"],
        "sft/eval_loss": after["eval/loss"],
    }


if __name__ == "__main__":
    common.stage_main(run, "DIR/pretrain")
