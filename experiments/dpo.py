"""DPO, the one-step alternative to reward model + PPO:
`python -m experiments.dpo --config=CONFIG --workdir=DIR`.

Policy and frozen reference from DIR/sft, the same preference pairs as the
reward model; the reference log-probs are computed once, then the DPO steps
run. Ground truth is measured with the reward model of DIR/reward when it
exists (for the score column). Saves DIR/dpo.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict

from experiments import posttrain_common as common
from experiments.ppo import ground_truth_fn
from experiments.resume import StageResume
from experiments.reward import pair_arrays
from model.transformer import LanguageModel
from rlhf.dpo import DPOConfig, make_dpo_step, make_reference_log_probs
from rlhf.reward_model import RewardModel
from train import sharding
from train.metrics_writer import MetricsWriter


def run(config: ConfigDict, root: Path) -> dict:
    with StageResume(root / "dpo", config, config.dpo.checkpoint_every) as resume:
        return _run(config, root, resume)


def _run(config: ConfigDict, root: Path, resume: StageResume) -> dict:
    dc = config.dpo
    pre = common.load_pretrained(config, root)
    mesh = pre.mesh
    data = common.posttrain_data(config, root)
    lm, rm = LanguageModel(pre.cfg), RewardModel(pre.cfg)
    lm_init = common.params_init(lm)
    sft_params = common.load_params(root / "sft", lm_init, mesh)
    tx = common.optimizer(dc)
    state, shardings = common.state_from(lm_init, sft_params, tx, mesh)
    state = resume.restore(state)
    arrays, _ = pair_arrays(data["pairs_train"], pre.tokenizer, config.reward.seq_len)
    # Reference log-probs only for the pairs the steps will see (one epoch at most).
    available = len(arrays["chosen_tokens"]) // dc.batch_size * dc.batch_size
    n = min(available, dc.steps * dc.batch_size)
    keep = np.random.default_rng(config.seed).permutation(available)[:n]
    arrays = {k: v[keep] for k, v in arrays.items()}
    reference = sharding.jit_sharded(
        make_reference_log_probs(lm),
        mesh,
        in_shardings=(shardings.params, sharding.batch_sharding(mesh)),
        out_shardings=sharding.batch_sharding(mesh),
    )
    ref = [
        jax.device_get(
            reference(
                sft_params,
                jax.device_put(
                    {k: v[i : i + dc.batch_size] for k, v in arrays.items()},
                    sharding.batch_sharding(mesh),
                ),
            )
        )
        for i in range(0, n, dc.batch_size)
    ]
    for key in ("ref_chosen_logp", "ref_rejected_logp"):
        arrays[key] = np.concatenate([r[key] for r in ref])
    step = common.jit_step(make_dpo_step(lm, tx, DPOConfig(beta=dc.beta)), shardings, mesh)
    out = root / "dpo"
    out.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(out, resume_step=resume.step)
    batches = common.random_batches(arrays, dc.batch_size, config.seed, start=resume.step)
    state, last = common.fit(
        step, state, batches, dc.steps, mesh, writer, dc.log_every, "dpo", resume=resume
    )
    writer.close()
    common.save_params(out, state.params, {"beta": dc.beta})
    resume.finish()
    result = {**last}
    if (root / "reward").exists():
        rm_init = common.params_init(rm)
        reward_params = common.load_params(root / "reward", rm_init, mesh)
        result["ground_truth"] = {
            "dpo": ground_truth_fn(config, root, pre, lm, rm)(state.params, reward_params)
        }
    return result


if __name__ == "__main__":
    common.stage_main(run, "DIR/sft")
