"""The whole chain in one command: `python -m experiments.pipeline --workdir=DIR`.

curate + tokenizer + pretrain (DIR/pretrain), then the post-training stages named in
`config.stages` (SFT, reward model, PPO, DPO) on data mined from the standard library, then
a report: DIR/report/summary.json with each stage's results and the ground-truth table
(parse rate, defines the requested name, reward) of every policy. Every stage runs in the
one loop (train/loop.py): a finished stage is not rerun, an interrupted one resumes, so an
interrupted pipeline continues with the same command. Exit statuses: experiments/cli.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax
from absl import flags
from ml_collections import ConfigDict

from experiments import cli

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "posttrain_tiny.py")
log = logging.getLogger(__name__)


def stage_runners() -> dict[str, Callable[[ConfigDict, Path], dict]]:
    from experiments import dpo, grpo, ppo, reward, sft

    return {"sft": sft.run, "reward": reward.run, "ppo": ppo.run, "grpo": grpo.run, "dpo": dpo.run}


def stage_names(config: ConfigDict) -> list[str]:
    names = [n.strip() for n in config.stages.split(",") if n.strip()]
    unknown = sorted(set(names) - set(stage_runners()))
    if unknown:
        raise ValueError(
            f"config.stages names unknown stages {unknown}; known: {sorted(stage_runners())}"
        )
    return names


def validate(config: ConfigDict) -> None:
    """Every section checked before the first stage starts, so a bad value in the last
    stage does not surface after an hour of pretraining."""
    from rlhf import datasets
    from train import pretrain

    if "stages" not in config or "pretrain" not in config:
        raise ValueError(
            "the config has no stages or pretrain section: experiments.pipeline takes a "
            "pipeline config (experiments/configs/posttrain_*.py); a pretraining config goes "
            "to experiments.pretrain"
        )
    if config.pretrain_checkpoint not in ("latest", "best"):
        raise ValueError(
            f"pretrain_checkpoint must be 'latest' or 'best', got {config.pretrain_checkpoint!r}"
        )
    if config.init_from:
        if not (Path(config.init_from) / "checkpoints").is_dir():
            raise ValueError(
                f"init_from={config.init_from} is not a stage directory (no checkpoints/ in "
                "it): name a pretraining or SFT stage, or a model imported with "
                "experiments.convert"
            )
    else:
        pretrain.validate(config.pretrain)
        datasets.check_held_out(config)
    for name in stage_names(config):
        validate_stage(config, name)


def validate_stage(config: ConfigDict, name: str) -> None:
    """One post-training stage's section (and the evaluation they share), before anything
    of it is written."""
    from experiments import dpo, grpo, ppo
    from rlhf import stage
    from rlhf.evaluation import check_eval_config

    if name not in config:
        raise ValueError(
            f"the config has no {name} section: post-training stages take a pipeline config "
            "(experiments/configs/posttrain_*.py)"
        )
    stage.validate(config[name], name)
    algorithm = {"ppo": ppo.ppo_config, "grpo": grpo.grpo_config, "dpo": dpo.dpo_config}
    try:
        if name in algorithm:
            algorithm[name](config[name])
        check_eval_config(config.eval)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{name}: {error}") from None


def _pretrain(config: ConfigDict, root: Path) -> dict:
    from train.pretrain import train

    return train(config.pretrain, root / "pretrain")


def run_stage(name: str, fn: Callable, config: ConfigDict, root: Path) -> dict:
    start = time.perf_counter()
    results = fn(config, root)
    results.setdefault(f"{name}/seconds", time.perf_counter() - start)
    log.info("stage %s done in %.0fs", name, time.perf_counter() - start)
    if results.get("ground_truth"):
        from rlhf.ground_truth import comparison_table

        rows = {
            k: {m: v for m, v in t.items() if m != "examples"}
            for k, t in results["ground_truth"].items()
        }
        log.info("%s ground truth on held-out prompts:\n%s", name, comparison_table(rows))
    return results


def compression_baselines(config: ConfigDict, root: Path) -> dict:
    """The bits per byte of the pretraining checkpoint post-training started from, over the
    whole held-out split, beside zlib -9 and lzma -9 on the same documents (each compressed
    on its own). Training's own evaluations read only `train.eval_batches` batches."""
    from data.compression import held_out_baselines
    from train.data_source import data_dir
    from train.evaluate import evaluate_checkpoint

    pc, stage_dir = config.pretrain, root / "pretrain"
    prepared = data_dir(pc, stage_dir)
    scored = evaluate_checkpoint(
        stage_dir,
        prepared,
        seq_len=pc.data.seq_len,
        batch_size=pc.train.global_batch_size,
        which=config.pretrain_checkpoint,
    )
    out = held_out_baselines(prepared)
    out["model_best"] = scored["eval/bits_per_byte"]
    out["model_over_lzma"] = out["model_best"] / out["lzma_9"]
    return out


def report(results: dict, root: Path, config: ConfigDict) -> dict:
    from rlhf.ground_truth import comparison_table

    table = {}
    for stage_results in results.values():
        table.update(stage_results.get("ground_truth", {}))
    summary = {"stages": results, "ground_truth": table}
    if "sft" in table and "ppo" in table:
        ppo_results = results["ppo"]
        summary["checks"] = {
            "ppo_raised_reward_on_heldout": (
                table["ppo"].get("reward_mean", 0) > table["sft"].get("reward_mean", 0)
            ),
            "ppo_kept_parse_rate": table["ppo"]["parse_rate"] >= table["sft"]["parse_rate"],
            "ppo_final_kl": ppo_results.get("ppo/kl"),
            "ppo_train_score_first_last": [
                ppo_results.get("ppo/score_first"),
                ppo_results.get("ppo/score_last"),
            ],
        }
    if "pretrain" in results:
        summary["compression"] = compression_baselines(config, root)
    rows = {k: {m: v for m, v in t.items() if m != "examples"} for k, t in table.items()}
    summary["ground_truth_markdown"] = comparison_table(rows)
    if "compression" in summary:
        c = summary["compression"]
        summary["ground_truth_markdown"] += (
            f"\n\nHeld-out bits per byte ({c['docs']} held-out documents): pretrained model "
            f"({config.pretrain_checkpoint} checkpoint) {c['model_best']:.3f}, zlib -9 "
            f"{c['zlib_9']:.3f}, lzma -9 "
            f"{c['lzma_9']:.3f} (model / lzma = {c['model_over_lzma']:.2f})"
        )
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out / "ground_truth.md").write_text(summary["ground_truth_markdown"] + "\n")
    return summary


def run(config: ConfigDict, root: Path) -> dict:
    validate(config)
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    if not config.init_from:
        results["pretrain"] = run_stage("pretrain", _pretrain, config, root)
    runners = stage_runners()
    for name in stage_names(config):
        results[name] = run_stage(name, runners[name], config, root)
    summary = report(results, root, config)
    if jax.process_index() == 0:
        from docs.report import write_report

        log.info("run report: %s", write_report(root))
    return summary


if __name__ == "__main__":
    cli.define_config(DEFAULT_CONFIG, "pipeline config")
    flags.DEFINE_string("workdir", "runs/pipeline", "where every stage and the report go")

    def main() -> None:
        summary = run(flags.FLAGS.config, Path(flags.FLAGS.workdir).absolute())
        print(summary["ground_truth_markdown"])
        print(json.dumps(summary.get("checks", {}), indent=2))

    cli.main(main)
