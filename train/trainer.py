"""The pretraining loop: data, sharded state, checkpoints, evaluation, logging, samples.

Everything jitted lives elsewhere (the step, the eval step, the sampler);
this file holds the side effects: files, signals, progress, and decisions
such as when to evaluate, save or stop.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict
from tqdm import tqdm

from model.config import ModelConfig
from model.sampling import SamplingConfig, make_sampler, sample_texts
from model.transformer import LanguageModel
from train import flops, sharding
from train.checkpoint import Checkpointer, abstract_like
from train.data_source import DataSource, build_data
from train.evaluate import evaluate, make_eval_step
from train.metrics_writer import MetricsWriter, plot_loss_curves, read_metrics
from train.optim import OptimConfig, make_optimizer
from train.pretrain_step import StepConfig, make_pretrain_step
from train.state import create_train_state
from train.workdir import config_differences, prepare_workdir

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    pass


def model_config(config: ConfigDict) -> ModelConfig:
    return ModelConfig(**config.model.to_dict())


@dataclasses.dataclass
class _Run:
    """What the loop needs, built once."""

    model: LanguageModel
    mesh: Any
    state: Any
    step_fn: Any
    eval_fn: Any
    data: DataSource
    checkpointer: Checkpointer
    meta: dict


def _build(config: ConfigDict, workdir: Path) -> _Run:
    cfg = model_config(config)
    mesh = sharding.make_mesh(sharding.MeshConfig(**config.mesh.to_dict()))
    sharding.check_batch_size(config.train.global_batch_size, mesh)
    data = build_data(config, workdir, mesh)
    if data.tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {data.tokenizer.vocab_size} tokens but the model's vocab_size "
            f"is {cfg.vocab_size}; raise config.model.vocab_size"
        )
    if config.data.seq_len > cfg.max_len and cfg.positional == "learned":
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_len={cfg.max_len}")
    model = LanguageModel(cfg)
    tx = make_optimizer(OptimConfig(**config.optim.to_dict()))
    example = jnp.zeros((1, 8), jnp.int32)
    state, shardings = create_train_state(
        lambda rng: model.init(rng, example)["params"], tx, mesh, jax.random.key(config.train.seed)
    )
    step_cfg = StepConfig(config.train.num_microbatches, config.train.z_loss)
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    step_fn = sharding.jit_sharded(
        make_pretrain_step(model, tx, step_cfg),
        mesh,
        in_shardings=(shardings, batch_sh, repl),
        out_shardings=(shardings, repl),
        donate_argnums=0,
    )
    eval_fn = sharding.jit_sharded(
        make_eval_step(model), mesh, in_shardings=(shardings.params, batch_sh), out_shardings=repl
    )
    checkpointer = Checkpointer(
        workdir / "checkpoints", config.train.keep_checkpoints, config.train.keep_best
    )
    meta = {"model": dataclasses.asdict(cfg), "seed": config.train.seed}
    return _Run(model, mesh, state, step_fn, eval_fn, data, checkpointer, meta)


def _restore(run: _Run, prefer_step: int | None = None) -> int:
    """Loads the newest readable checkpoint (or `prefer_step`) into `run`; returns its step
    (0 if none)."""
    restored = run.checkpointer.restore_latest(abstract_like(run.state), prefer_step)
    if restored is None:
        return 0
    step, state, data_state, meta = restored
    diffs = config_differences(meta.get("model", {}), run.meta["model"])
    if diffs:
        raise ValueError(
            f"the checkpoint at step {step} in {run.checkpointer.directory} was written for a "
            "different model config:\n  " + "\n  ".join(diffs)
        )
    run.state = state
    run.data.train_iter.set_state(data_state)
    log.info("resumed from step %d", step)
    return step


class _StopFlag:
    """Set by SIGTERM (preemption): the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(config: ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Trains until config.train.num_steps (resuming if WORKDIR has checkpoints).

    Returns the last logged train and eval metrics.
    """
    workdir = prepare_workdir(workdir, config)
    run = _build(config, workdir)
    tc = config.train
    start = _restore(run)
    writer = MetricsWriter(workdir, resume_step=start)  # no duplicate rows of re-run steps
    cfg = run.model.cfg
    seq_len, batch_size = config.data.seq_len, tc.global_batch_size
    peak = tc.peak_flops or flops.peak_flops_of(jax.devices()[0].device_kind)
    flops_per_token = flops.flops_per_token(cfg, seq_len)
    base_rng = jax.random.key(tc.seed)
    stop = _StopFlag()
    progress = tqdm(
        total=tc.num_steps,
        initial=start,
        disable=jax.process_index() != 0,
        unit="step",
        dynamic_ncols=True,
    )
    last: dict[str, float] = {}
    skipped = 0
    pending = None  # (step, metrics on device): read one step late so the device stays busy
    window_start, window_steps = time.perf_counter(), 0

    def handle(step: int, metrics: dict) -> None:
        nonlocal skipped, window_start, window_steps
        metrics = jax.device_get(metrics)
        window_steps += 1
        bad = [q for q in ("loss", "grad") if metrics[f"nonfinite_{q}"]]
        if bad:
            detail = f"loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])}"
            if not tc.skip_nonfinite:
                raise NonFiniteError(
                    f"non-finite {' and '.join(bad)} at step {step} ({detail}); the update was "
                    "not applied and no checkpoint was written after it. Set "
                    "--config.train.skip_nonfinite=True to skip such steps instead."
                )
            skipped += 1
            log.warning("skipped step %d: non-finite %s (%s)", step, bad, detail)
        if step % tc.log_every == 0 or step == tc.num_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_steps * batch_size * seq_len / max(elapsed, 1e-9)
            record = {
                "train/loss": float(metrics["loss"]),
                "train/grad_norm": float(metrics["grad_norm"]),
                "train/tokens_per_s": tokens_per_s,
                "train/skipped_steps": skipped,
            }
            if peak:
                record["train/mfu"] = flops_per_token * tokens_per_s / (peak * jax.device_count())
            writer.write(step, record)
            last.update(record)
            progress.set_postfix(
                loss=f"{record['train/loss']:.3f}",
                tok_s=f"{tokens_per_s:,.0f}",
                **({"mfu": f"{record['train/mfu']:.1%}"} if peak else {}),
            )
            window_start, window_steps = time.perf_counter(), 0

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            handle(*pending)
            pending = None

    def save(step: int, metrics: dict | None = None) -> None:
        run.checkpointer.save(
            step, run.state, run.data.train_iter.get_state(), run.meta, metrics=metrics
        )

    try:
        for step in range(start + 1, tc.num_steps + 1):
            batch = run.data.next_train_batch()
            run.state, metrics = run.step_fn(run.state, batch, base_rng)
            flush()
            pending = (step, metrics)
            progress.update(1)
            is_last = step == tc.num_steps
            eval_metrics = None
            if step % tc.eval_every == 0 or is_last:
                flush()
                eval_metrics = evaluate(
                    run.eval_fn, run.state.params, run.data.eval_batches, run.data.bytes_per_token
                )
                writer.write(step, eval_metrics)
                last.update(eval_metrics)
                progress.write(
                    f"step {step}: eval loss {eval_metrics['eval/loss']:.4f}, "
                    f"bits/byte {eval_metrics.get('eval/bits_per_byte', float('nan')):.4f}"
                )
            if step % tc.checkpoint_every == 0 or is_last or stop.requested:
                flush()  # never save a state whose step was not checked
                save(step, eval_metrics)
            if stop.requested:
                log.warning("SIGTERM: saved a checkpoint at step %d; exiting", step)
                break
        flush()
    finally:
        progress.close()
        stop.restore()
        run.checkpointer.close()
        writer.close()
    if not stop.requested and jax.process_index() == 0:
        plot_loss_curves(workdir / "metrics.jsonl", workdir / "loss_curve.png")
        _print_samples(run, config)
    return last


def best_eval_step(metrics_path: str | Path, steps: list[int]) -> int | None:
    """The step among `steps` (the checkpoints kept) with the lowest logged eval loss, or None
    when none of them was evaluated."""
    path = Path(metrics_path)
    if not path.exists():
        return None
    kept = set(steps)
    losses = {
        r["step"]: r["eval/loss"]
        for r in read_metrics(path)
        if "eval/loss" in r and r["step"] in kept
    }
    return min(losses, key=losses.__getitem__) if losses else None


def load_for_inference(config: ConfigDict, workdir: str | Path, checkpoint: str = "latest"):
    """(model, params, tokenizer, mesh, step) from a readable checkpoint of `workdir`:
    the newest (`checkpoint="latest"`) or the one with the lowest eval loss ("best";
    a run that overfits its data is better taken from before it did)."""
    if checkpoint not in ("latest", "best"):
        raise ValueError(f"checkpoint must be 'latest' or 'best', got {checkpoint!r}")
    workdir = Path(workdir)
    run = _build(config, workdir)
    best = None
    if checkpoint == "best":
        best = best_eval_step(workdir / "metrics.jsonl", run.checkpointer.steps())
        if best is None:
            log.warning("no evaluated checkpoint in %s; taking the newest", workdir)
    step = _restore(run, best)
    run.checkpointer.close()
    if step == 0:
        raise FileNotFoundError(f"no readable checkpoint in {workdir / 'checkpoints'}")
    return run.model, run.state.params, run.data.tokenizer, run.mesh, step


def _print_samples(run: _Run, config: ConfigDict) -> None:
    sc = config.sample
    if not sc.num_samples:
        return
    sampling = SamplingConfig(
        max_new_tokens=min(sc.max_new_tokens, run.model.cfg.max_len - 16),
        temperature=sc.temperature,
        top_k=sc.top_k,
        top_p=sc.top_p,
        eos_id=run.data.tokenizer.eos_id,
        pad_id=run.data.tokenizer.pad_id,
    )
    with sharding.mesh_context(run.mesh):
        texts = sample_texts(
            make_sampler(run.model, sampling),
            run.state.params,
            run.data.tokenizer,
            [sc.prompt] * sc.num_samples,
            jax.random.key(config.train.seed + 1),
        )
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{sc.prompt}{text}")
