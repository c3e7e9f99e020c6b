"""The whole chain in one command: `python -m experiments.pipeline --workdir=DIR`.

curate + tokenizer + pretrain (experiments.pretrain's loop), then SFT, reward
model, PPO and DPO on data mined from the standard library, then a report:
DIR/report/summary.json with each stage's final metrics and the ground-truth
table (parse rate, defines the requested name, reward) for SFT, PPO and DPO.
A stage that finished (DIR/STAGE/done.json) is not rerun, so an interrupted
pipeline resumes with the same command.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from experiments import cli, dpo, ppo, reward, sft
from experiments import posttrain_common as common
from rlhf.ground_truth import comparison_table

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "posttrain_tiny.py")
log = logging.getLogger(__name__)


def _pretrain(config: ConfigDict, root: Path) -> dict:
    from train.trainer import train

    root.mkdir(parents=True, exist_ok=True)
    return train(config.pretrain, root / "pretrain")


def run_stage(name: str, fn, config: ConfigDict, root: Path) -> dict:
    done = root / name / "done.json"
    if done.exists():
        log.info("stage %s already done (%s)", name, done)
        return json.loads(done.read_text())
    start = time.perf_counter()
    metrics = fn(config, root)
    metrics[f"{name}/seconds"] = time.perf_counter() - start
    common.write_json(done, metrics)
    log.info("stage %s done in %.0fs", name, metrics[f"{name}/seconds"])
    return metrics


def report(results: dict, root: Path) -> dict:
    table = {}
    for stage in ("ppo", "dpo"):
        table.update(results.get(stage, {}).get("ground_truth", {}))
    summary = {"stages": results, "ground_truth": table}
    if "sft" in table and "ppo" in table:
        ppo_metrics = results["ppo"]
        summary["checks"] = {
            "ppo_raised_reward_on_heldout": (
                table["ppo"]["reward_mean"] > table["sft"]["reward_mean"]
            ),
            "ppo_kept_parse_rate": table["ppo"]["parse_rate"] >= table["sft"]["parse_rate"],
            "ppo_final_kl": ppo_metrics.get("ppo/kl"),
            "ppo_train_score_first_last": [
                ppo_metrics.get("ppo/score_first"),
                ppo_metrics.get("ppo/score_last"),
            ],
        }
    rows = {k: {m: v for m, v in t.items() if m != "examples"} for k, t in table.items()}
    summary["ground_truth_markdown"] = comparison_table(rows)
    common.write_json(root / "report" / "summary.json", summary)
    (root / "report" / "ground_truth.md").write_text(summary["ground_truth_markdown"] + "\n")
    return summary


def run(config: ConfigDict, root: Path) -> dict:
    results = {"pretrain": run_stage("pretrain", _pretrain, config, root)}
    results["sft"] = run_stage("sft", sft.run, config, root)
    results["reward"] = run_stage("reward", reward.run, config, root)
    results["ppo"] = run_stage("ppo", ppo.run, config, root)
    if config.dpo.enabled:
        results["dpo"] = run_stage("dpo", dpo.run, config, root)
    return report(results, root)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "pipeline config")
    flags.DEFINE_string("workdir", "runs/pipeline", "where every stage and the report go")

    def main(argv):
        cli.setup()
        with cli.refusals():
            summary = run(flags.FLAGS.config, Path(flags.FLAGS.workdir).absolute())
        print(summary["ground_truth_markdown"])
        print(json.dumps(summary.get("checks", {}), indent=2))

    app.run(main)
