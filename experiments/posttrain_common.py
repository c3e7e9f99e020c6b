"""What the post-training stages share: the workdir layout, stage checkpoints, the step loop.

Layout of a pipeline workdir DIR:
  DIR/pretrain/        the pretraining run (experiments.pretrain's workdir)
  DIR/posttrain_data/  mined SFT and preference JSONL (rlhf.stdlib_tasks)
  DIR/sft, DIR/reward, DIR/ppo, DIR/dpo   one stage each: params checkpoint, metrics
  DIR/report/summary.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from data.sources import parse_spec
from experiments.resume import StageResume
from model.config import ModelConfig
from rlhf import stdlib_tasks
from train import sharding
from train.checkpoint import Checkpointer
from train.metrics_writer import MetricsWriter
from train.optim import OptimConfig, make_optimizer
from train.state import (
    TrainState,
    create_train_state,
    param_shardings,
    strip_axis_names,
)

log = logging.getLogger(__name__)
EXAMPLE = jnp.zeros((1, 8), jnp.int32)


def params_init(model) -> Callable[[jax.Array], Any]:
    """`rng -> boxed params` of `model`, the form create_train_state and load_params take."""
    return lambda rng: model.init(rng, EXAMPLE)["params"]


@dataclasses.dataclass
class Pretrained:
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    mesh: Any


def load_pretrained(config: ConfigDict, root: Path) -> Pretrained:
    """The pretraining stage's model, newest checkpoint, tokenizer and mesh."""
    from train.trainer import load_for_inference

    which = config.get("pretrain_checkpoint", "latest")
    model, params, tokenizer, mesh, step = load_for_inference(
        config.pretrain, root / "pretrain", which
    )
    log.info("loaded the pretrained model at step %d (%s checkpoint)", step, which)
    return Pretrained(model.cfg, params, tokenizer, mesh)


def posttrain_data(config: ConfigDict, root: Path) -> dict[str, list[dict]]:
    """The mined SFT / preference sets, built once and kept as JSONL."""
    check_held_out(config)
    directory = root / "posttrain_data"
    names = ("sft_train", "sft_eval", "pairs_train", "pairs_eval")
    if not all((directory / f"{n}.jsonl").exists() for n in names):
        dc = config.posttrain_data
        data = stdlib_tasks.build_datasets(
            root=dc.root or None,
            eval_fraction=dc.eval_fraction,
            seed=config.seed,
            max_files=dc.max_files or None,
            max_chars=dc.max_chars,
        )
        for name in names:
            stdlib_tasks.write_jsonl(directory / f"{name}.jsonl", data[name])
    return {n: stdlib_tasks.read_jsonl(directory / f"{n}.jsonl") for n in names}


def check_held_out(config: ConfigDict) -> None:
    """Refuses a pretraining corpus that contains the evaluation's held-out files."""
    spec = parse_spec(config.pretrain.data.corpus)
    fraction = config.posttrain_data.eval_fraction
    if spec.kind == "stdlib" and not config.posttrain_data.root and spec.holdout < fraction:
        raise ValueError(
            f"pretrain.data.corpus={str(spec)!r} includes files that posttrain_data."
            f"eval_fraction={fraction} holds out for evaluation; use "
            f"'stdlib:holdout={fraction}'"
        )


def optimizer(stage: ConfigDict):
    return make_optimizer(
        OptimConfig(
            lr=stage.lr,
            warmup_steps=min(stage.warmup_steps, stage.steps),
            total_steps=stage.steps,
            schedule="cosine",
            end_lr=stage.lr * 0.1,
            weight_decay=0.0,
            clip_norm=1.0,
        )
    )


def state_from(init_params: Callable, params: Any, tx, mesh, seed: int = 0):
    """(state, shardings) with the given parameter values and a fresh optimizer.

    Adam's initial moments do not depend on parameter values, so the state
    created sharded by `create_train_state` only needs its params replaced.
    """
    state, shardings = create_train_state(init_params, tx, mesh, jax.random.key(seed))
    return state.replace(params=copy_to(params, shardings.params)), shardings


def copy_to(tree: Any, shardings: Any) -> Any:
    """A copy of `tree` placed by `shardings`: the steps donate their state, so a state
    must never share buffers with params used later (the frozen reference, say)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def save_params(directory: Path, params: Any, meta: dict) -> None:
    """The stage's final params, replacing any earlier ones (a stage rerun after it saved)."""
    ckpt = Checkpointer(directory / "checkpoints", keep_last=1, keep_best=0, async_save=False)
    ckpt.save(max(ckpt.steps(), default=-1) + 1, params, {}, meta)
    ckpt.close()


def abstract_params(init_params: Callable, mesh) -> Any:
    """ShapeDtypeStructs, with their shardings, of the params `init_params` creates."""
    shardings = param_shardings(init_params, mesh)
    with sharding.mesh_context(mesh):
        shapes = strip_axis_names(jax.eval_shape(init_params, jax.random.key(0)))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def load_params(directory: Path, init_params: Callable, mesh) -> Any:
    """Params saved by `save_params`, sharded as `init_params`'s logical axes say."""
    ckpt = Checkpointer(directory / "checkpoints", keep_last=1, keep_best=0, async_save=False)
    restored = ckpt.restore_latest(abstract_params(init_params, mesh))
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no stage checkpoint in {directory}; run that stage first")
    return restored[1]


def jit_step(step_fn: Callable, shardings: TrainState, mesh) -> Callable:
    return sharding.jit_sharded(
        step_fn,
        mesh,
        in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def random_batches(
    arrays: dict[str, np.ndarray], batch_size: int, seed: int, start: int = 0
) -> Iterator[dict]:
    """Endless batches of rows drawn without replacement, reshuffled every epoch, from batch
    `start` on. Epoch e's order depends on (seed, e) alone, so batch k is a function of k
    and a resumed stage continues the same sequence."""
    n = len(next(iter(arrays.values())))
    if n < batch_size:
        raise ValueError(f"only {n} examples for a batch of {batch_size}")
    per_epoch = n // batch_size
    epoch, i = divmod(start, per_epoch)
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(n)
        for j in range(i * batch_size, per_epoch * batch_size, batch_size):
            yield {k: v[order[j : j + batch_size]] for k, v in arrays.items()}
        epoch, i = epoch + 1, 0


def fit(
    step_fn: Callable,
    state: TrainState,
    batches: Iterator[dict],
    steps: int,
    mesh,
    writer: MetricsWriter,
    log_every: int,
    name: str,
    seed: int = 0,
    resume: StageResume | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """Runs updates up to step `steps`, logging every `log_every`; returns the state and the
    last logged metrics. With `resume` it starts after `resume.step` (`batches` must start
    there too) and checkpoints as `resume` says. The step function folds `state.step` into
    `seed`'s key, so restoring the step restores the random stream."""
    rng = jax.random.key(seed)
    first = resume.step + 1 if resume is not None else 1
    last: dict[str, float] = dict(resume.host.get("last", {})) if resume is not None else {}
    start = time.perf_counter()
    for step in range(first, steps + 1):
        batch = jax.device_put(next(batches), sharding.batch_sharding(mesh))
        state, metrics = step_fn(state, batch, rng)
        if step % log_every == 0 or step == steps:
            last = {f"{name}/{k}": float(v) for k, v in jax.device_get(metrics).items()}
            writer.write(step, last)
            elapsed = time.perf_counter() - start
            log.info("%s step %d/%d %s (%.0fs)", name, step, steps, _short(last), elapsed)
        if resume is not None:
            resume.host["last"] = last
            resume.step_done(step, state, last=step == steps)
    return state, last


def _short(metrics: dict[str, float]) -> str:
    keys = [k for k in metrics if k.split("/")[-1] in ("loss", "accuracy", "margin")]
    return " ".join(f"{k.split('/')[-1]}={metrics[k]:.4f}" for k in keys)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------ generation and evaluation


def prompts_of(records: list[dict], tokenizer, max_prompt_len: int) -> tuple[list, list[str]]:
    """(prompt ids, requested function names) of SFT records whose prompt fits."""
    from rlhf.chat import ChatTokens, render_prompt

    tokens = ChatTokens.from_tokenizer(tokenizer)
    out, names = [], []
    for r in records:
        ids = render_prompt(r["messages"], tokenizer, tokens)
        if len(ids) <= max_prompt_len:
            out.append(ids)
            names.append(r["name"])
    return out, names


def generate(
    rollout_fn: Callable,
    params: Any,
    prompts: list,
    prompt_len: int,
    pad_id: int,
    batch_size: int,
    mesh,
    seed: int,
    score_fn: Callable | None = None,
    reward_params=None,
) -> list[dict]:
    """Host-side rollouts (numpy) for every prompt, in batches of a fixed shape; with
    `score_fn(reward_params, tokens, mask)`, each also holds the "score" of every row."""
    from rlhf.rollout import prompt_batch

    results = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        n = len(chunk)
        chunk += [chunk[0]] * (batch_size - n)  # a fixed batch shape: one compilation
        prompts_BP, lengths_B = prompt_batch(chunk, pad_id, prompt_len)
        with sharding.mesh_context(mesh):
            out = rollout_fn(params, prompts_BP, lengths_B, jax.random.key(seed + i))
            if score_fn is not None:
                out["score"] = score_fn(reward_params, out["tokens"], out["mask"])
        results.append({k: np.asarray(v)[:n] for k, v in jax.device_get(out).items()})
    return results


def evaluate_policy(
    rollout_fn: Callable,
    score_fn: Callable,
    policy_params: Any,
    reward_params: Any,
    prompts: list,
    names: list[str],
    tokenizer,
    prompt_len: int,
    batch_size: int,
    mesh,
    seed: int,
) -> dict[str, float]:
    """Ground truth on held-out prompts: parse rate, defines-name rate, mean RM score."""
    from rlhf.chat import ChatTokens
    from rlhf.ground_truth import ground_truth
    from rlhf.rollout import response_ids

    end = ChatTokens.from_tokenizer(tokenizer).end
    answers, scores = [], []
    rollouts = generate(
        rollout_fn,
        policy_params,
        prompts,
        prompt_len,
        tokenizer.pad_id,
        batch_size,
        mesh,
        seed,
        score_fn,
        reward_params,
    )
    for rollout in rollouts:
        answers += [tokenizer.decode(ids) for ids in response_ids(rollout, end)]
        scores += rollout["score"].tolist()
    result = ground_truth(answers, names, scores)
    result["examples"] = answers[:3]
    return result


def stage_main(run: Callable[[ConfigDict, Path], dict], needs: str) -> None:
    """Command-line entry of one post-training stage: `--config`, `--workdir`, print the result."""
    from absl import app, flags
    from ml_collections import config_flags

    from experiments import cli
    from experiments.configs import posttrain_tiny

    config_flags.DEFINE_config_file("config", posttrain_tiny.__file__, "post-training config")
    flags.DEFINE_string("workdir", "runs/pipeline", f"the pipeline workdir (holds {needs})")

    def main(argv):
        del argv
        cli.setup()
        with cli.refusals():
            result = run(flags.FLAGS.config, Path(flags.FLAGS.workdir).absolute())
        print(json.dumps(result, indent=2))

    app.run(main)
