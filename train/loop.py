"""THE training loop: every stage (pretraining, SFT, reward model, PPO, DPO, GRPO) runs here.

A stage hands the loop a `Stage`: its state, a jitted step `(state, batch, rng) -> (state,
metrics)`, batches with a saveable position, and optional `evaluate` and `finish`
functions. The loop owns everything else, for every stage alike:
  - progress (units/s, MFU where the stage gives a FLOP count, ETA) on process 0;
  - metrics read one step late, so the host never waits for the device between steps;
    JSONL and TensorBoard every `log_every` steps (train.metrics_writer);
  - evaluation every `eval_every` steps and after the last;
  - checkpoints every `checkpoint_every` steps (train.checkpoint, one layout), and a final
    one holding the stage's results: a stage is finished when that one exists;
  - exact resume: the newest readable checkpoint restores the state, the batch position
    and the stage's host-side state; a run that starts from scratch says so and keeps the
    earlier metrics;
  - SIGTERM / SIGINT: save, then raise `Interrupted` (a stopped stage is not finished;
    in the last step, the stage finishes instead);
  - non-finite steps (the update is never applied, train.gradients): stop with a
    diagnostic, or skip and count them with `train.skip_nonfinite=True`;
  - a profiler trace of `profile_steps` steps from `profile_start` on request;
  - steps run under a host-to-device transfer guard: an implicit copy inside a step (a numpy
    operand, a Python number) is an error, not a blocking copy every step;
  - the step compiled in a background thread while the checkpoint is read (train.launch).
Everything jitted lives in the stages' step functions; this file holds the side effects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict
from tqdm import tqdm

from train import launch, sharding
from train.checkpoint import Checkpointer, abstract_like
from train.metrics_writer import MetricsWriter, keep_history
from train.state import TrainState
from train.workdir import check_same_experiment

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    pass


class Interrupted(RuntimeError):
    """The run was stopped by a signal after saving a checkpoint; rerun to resume."""


class Batches(Protocol):
    """An endless batch iterator whose position can be saved and restored."""

    def __next__(self) -> dict: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The `train` section every stage's config has (the loop's part of it)."""

    num_steps: int
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    keep_best: int = 1
    skip_nonfinite: bool = False  # False: stop at a non-finite loss/grad/update
    seed: int = 0
    peak_flops: float = 0.0  # per device, for MFU; 0 = look the device kind up
    profile_start: int = 0  # 0: no trace; else trace `profile_steps` steps from this one
    profile_steps: int = 3

    def __post_init__(self):
        for name in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")

    @classmethod
    def from_config(cls, train: ConfigDict | dict) -> LoopConfig:
        train = dict(train)
        return cls(**{f.name: train[f.name] for f in dataclasses.fields(cls) if f.name in train})


@dataclasses.dataclass
class Stage:
    """One stage as the loop sees it."""

    name: str
    directory: Path  # the stage directory: checkpoints/, metrics.jsonl, tensorboard/
    state: TrainState  # the initial state, already sharded
    step: Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict]]
    batches: Batches  # numpy batches are split over the mesh's batch axes
    mesh: Any
    meta: dict  # the stage, its config, model config, tokenizer identity
    metrics_prefix: str = "train"
    unit: str = "tokens"  # what `units_per_step` counts, for throughput
    units_per_step: float = 0.0
    flops_per_unit: float = 0.0  # 0: no MFU
    evaluate: Callable[[TrainState], dict[str, float]] | None = None
    finish: Callable[[TrainState], tuple[TrainState, dict]] | None = None
    host_state: Callable[[], dict] | None = None  # algorithm state kept on the host ...
    set_host_state: Callable[[dict], None] | None = None  # ... saved with every checkpoint
    best_metric: str = "eval/loss"
    progress_keys: tuple[str, ...] = ("loss",)


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to save and stop; a second
    SIGINT interrupts at once."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def run(stage: Stage, cfg: LoopConfig) -> dict[str, Any]:
    """Runs `stage` to `cfg.num_steps` (resuming from its checkpoints) and returns its
    results: the last logged metrics and what `stage.finish` returned. Afterwards
    `stage.state` is the final state (the initial one was donated to the first step)."""
    ckpt = Checkpointer(
        stage.directory / "checkpoints", cfg.keep_checkpoints, cfg.keep_best, stage.best_metric
    )
    _compile_ahead(stage, cfg)
    try:
        start, stage.state, final, skipped = _restore(stage, ckpt, cfg)
        if final is not None:
            log.info("%s: already finished at step %d", stage.name, start)
            return final
        run_ = _Run(stage, cfg, ckpt, start, stage.state, skipped)
        try:
            return run_.loop()
        finally:
            stage.state = run_.state
    finally:
        ckpt.close()


def compile_ahead(
    step: Callable, abstract_state: Any, batches: Batches, mesh: Mesh, seed: int, name: str
) -> launch.CompiledAhead:
    """`step` (a `train.sharding.jit_sharded` step) compiling in the background for the
    arguments this loop will pass it: the state's shapes and shardings, the next batch's
    (peeked) and the step key."""
    batch = _on_mesh(launch.peek(batches), mesh)
    return launch.CompiledAhead(
        step, abstract_state, launch.abstract(batch), step_key(seed, mesh), name=name
    )


def _compile_ahead(stage: Stage, cfg: LoopConfig) -> None:
    """A jitted step compiles while the checkpoint is read; pretraining starts it sooner
    itself, before its state init. A restored state has the initial one's shapes and
    shardings."""
    if hasattr(stage.step, "lower") and not isinstance(stage.step, launch.CompiledAhead):
        stage.step = compile_ahead(
            stage.step,
            launch.abstract(stage.state),
            stage.batches,
            stage.mesh,
            cfg.seed,
            f"{stage.name} step",
        )


def _restore(stage: Stage, ckpt: Checkpointer, cfg: LoopConfig):
    restored = ckpt.restore_latest(abstract_like(stage.state))
    if restored is None:
        moved = keep_history(stage.directory)
        if moved is not None:
            log.warning(
                "%s: no readable checkpoint in %s: starting from scratch; the earlier "
                "metrics are kept in %s",
                stage.name,
                ckpt.directory,
                moved,
            )
        return 0, stage.state, None, 0
    step, state, data_state, meta = restored
    check_same_experiment(f"the checkpoint of step {step} in {stage.directory}", meta, stage.meta)
    if meta.get("final") is not None and step >= cfg.num_steps:
        return step, state, meta["final"], 0
    if step > cfg.num_steps:
        raise ValueError(
            f"{stage.name}: the newest checkpoint in {ckpt.directory} is of step {step}, past "
            f"train.num_steps={cfg.num_steps}: set train.num_steps to {step} or more to "
            "resume, or use a new workdir"
        )
    stage.batches.set_state(data_state["batches"])
    if stage.set_host_state is not None:
        stage.set_host_state(data_state.get("host", {}))
    log.info("%s: resumed from step %d", stage.name, step)
    return step, state, None, data_state.get("skipped_steps", 0)


class _Run:
    """The state of one run of the loop (split out of `run` to keep each part short)."""

    def __init__(
        self, stage: Stage, cfg: LoopConfig, ckpt: Checkpointer, start: int, state, skipped: int
    ):
        self.stage, self.cfg, self.ckpt, self.start, self.state = stage, cfg, ckpt, start, state
        self.writer = MetricsWriter(stage.directory, resume_step=start)
        self.began = time.perf_counter()
        self.last: dict[str, float] = {}
        self.last_eval: tuple[int, dict] | None = None  # (step, metrics) of the latest
        self.skipped = skipped  # non-finite steps skipped, since step 0
        self.pending: tuple[int, dict, float] | None = None  # metrics still on the device
        self.window = (time.perf_counter(), 0)  # (start, steps) of the throughput window
        self.window_end = self.window[0]
        peak = cfg.peak_flops or _peak_flops(jax.devices()[0].device_kind)
        self.flops_per_s = peak * jax.device_count() if stage.flops_per_unit else 0.0
        self.progress = tqdm(
            total=cfg.num_steps,
            initial=start,
            disable=jax.process_index() != 0,
            desc=stage.name,
            unit="step",
            dynamic_ncols=True,
        )

    def loop(self) -> dict[str, Any]:
        stage, cfg = self.stage, self.cfg
        rng = step_key(cfg.seed, stage.mesh)
        signals = StopSignals()
        try:
            for step in range(self.start + 1, cfg.num_steps + 1):
                self.ckpt.check()  # a failed background save stops the run now
                began = time.perf_counter()
                with self._maybe_profile(step):
                    batch = _on_mesh(next(stage.batches), stage.mesh)
                    with jax.profiler.StepTraceAnnotation(stage.name, step_num=step):
                        # a numpy or Python operand copied to the devices inside a step (a
                        # blocking copy every step) is an error, not a slowdown; explicit
                        # `jax.device_put` and `sharding.to_global_batch` stay allowed. The
                        # device-to-host direction is not guarded: the CPU backend, where the
                        # tests run, cannot check it (no copy happens there).
                        with jax.transfer_guard_host_to_device("disallow"):
                            self.state, metrics = stage.step(self.state, batch, rng)
                if step == self.start + 1:
                    self._first_step_done(began, metrics)
                self._flush()
                self.pending = (step, metrics, time.perf_counter())
                self.progress.update(1)
                last = step == cfg.num_steps
                eval_metrics = self._evaluate(step) if step % cfg.eval_every == 0 else None
                # a signal during the last step finishes the stage instead (its final save)
                stop = signals.received and not last
                if stop or (step % cfg.checkpoint_every == 0 and not last):
                    self._flush()  # never save a state whose step was not checked
                    self._save(step, eval_metrics)
                if stop:
                    raise Interrupted(
                        f"{stage.name} stopped by {signals.received} after step {step}; a "
                        f"checkpoint was saved in {self.ckpt.directory}: run the same command "
                        "to resume"
                    )
            return self._finish()
        finally:
            signals.restore()
            self.progress.close()
            self.writer.close()

    def _first_step_done(self, began: float, metrics: dict) -> None:
        """Waits for the first step once and says how long the start took: the time users
        wait for (BENCHMARKS.md, "Speed round two")."""
        jax.block_until_ready(metrics)
        # throughput counts from here: the first step's compile is not training. Its own
        # metrics arrive next, so it starts the count at -1.
        self.window = (time.perf_counter(), -1)
        log.info(
            "%s: first step done %.1f s after launch (%.1f s in the step, compiling included)",
            self.stage.name,
            launch.seconds_since_launch(),
            time.perf_counter() - began,
        )

    def _finish(self) -> dict[str, Any]:
        self._flush()
        stage, cfg = self.stage, self.cfg
        if cfg.num_steps % cfg.eval_every:
            self._evaluate(cfg.num_steps)
        results: dict[str, Any] = dict(self.last)
        if stage.finish is not None:
            self.state, extra = stage.finish(self.state)
            results.update(extra)
        results[f"{stage.metrics_prefix}/skipped_steps"] = self.skipped
        results[f"{stage.name}/seconds"] = time.perf_counter() - self.began  # this run's part
        if self.start == cfg.num_steps:  # resumed from the last step's unfinished checkpoint
            self.ckpt.delete(cfg.num_steps)  # which the final one replaces
        evaluated = (
            self.last_eval[1] if self.last_eval and self.last_eval[0] == cfg.num_steps else None
        )
        self._save(cfg.num_steps, evaluated, final=results)  # ranked for keep-best too
        return results

    def _evaluate(self, step: int) -> dict[str, float] | None:
        if self.stage.evaluate is None:
            return None
        self._flush()
        began = time.perf_counter()
        metrics = self.stage.evaluate(self.state)
        self._pause(time.perf_counter() - began)
        self.writer.write(step, metrics)
        self.last.update(metrics)
        self.last_eval = (step, metrics)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        self.progress.write(f"{self.stage.name} step {step}: {shown}")
        return metrics

    def _save(self, step: int, eval_metrics: dict | None, final: dict | None = None) -> None:
        stage = self.stage
        data = {"batches": stage.batches.get_state(), "skipped_steps": self.skipped}
        if stage.host_state is not None:
            data["host"] = stage.host_state()
        meta = {**stage.meta, "final": final} if final is not None else stage.meta
        began = time.perf_counter()
        self.ckpt.save(step, self.state, _plain(data), _plain(meta), metrics=eval_metrics)
        self._pause(time.perf_counter() - began)

    def _flush(self) -> None:
        """Reads the pending step's metrics (by now the device has moved on), checks them,
        logs every `log_every` steps."""
        if self.pending is None:
            return
        step, metrics, returned = self.pending
        self.pending = None
        on_device = any(isinstance(v, jax.Array) for v in metrics.values())
        metrics = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        # When the step finished: once its metrics arrived (asynchronous steps), or when the
        # call returned (steps that wait for the device themselves, like PPO's iteration).
        self.window_end = time.perf_counter() if on_device else returned
        self._check_finite(step, metrics)
        start, steps = self.window
        self.window = (start, steps + 1)
        if step % self.cfg.log_every == 0 or step == self.cfg.num_steps:
            self._log(step, metrics)

    def _check_finite(self, step: int, metrics: dict[str, float]) -> None:
        bad = [q for q in ("loss", "grad", "update") if metrics.get(f"nonfinite_{q}")]
        if not bad:
            return
        detail = ", ".join(f"{k}={metrics[k]}" for k in ("loss", "grad_norm") if k in metrics)
        if not self.cfg.skip_nonfinite:
            raise NonFiniteError(
                f"{self.stage.name}: non-finite {' and '.join(bad)} at step {step} ({detail}); "
                "the update was not applied and no checkpoint was written after it. Lower the "
                "learning rate, or set --config.train.skip_nonfinite=True (for a pipeline "
                "stage: --config.STAGE.train.skip_nonfinite=True) to skip such steps"
            )
        self.skipped += 1
        log.warning("%s: skipped step %d: non-finite %s (%s)", self.stage.name, step, bad, detail)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        stage = self.stage
        start, steps = self.window
        elapsed = max(self.window_end - start, 1e-9)
        record = {f"{stage.metrics_prefix}/{k}": v for k, v in metrics.items()}
        record[f"{stage.metrics_prefix}/skipped_steps"] = self.skipped
        postfix = {k: f"{metrics[k]:.4g}" for k in stage.progress_keys if k in metrics}
        if stage.units_per_step and steps > 0:
            rate = steps * stage.units_per_step / elapsed
            record[f"{stage.metrics_prefix}/{stage.unit}_per_s"] = rate
            postfix[f"{stage.unit}/s"] = f"{rate:,.0f}"
            if self.flops_per_s:
                mfu = stage.flops_per_unit * rate / self.flops_per_s
                record[f"{stage.metrics_prefix}/mfu"] = mfu
                postfix["mfu"] = f"{mfu:.1%}"
        self.writer.write(step, record)
        self.last.update(record)
        self.progress.set_postfix(postfix)
        self.window = (self.window_end, 0)

    def _pause(self, seconds: float) -> None:
        """Evaluation and saving are not training: their time leaves the throughput."""
        start, steps = self.window
        self.window = (start + seconds, steps)

    @contextlib.contextmanager
    def _maybe_profile(self, step: int) -> Iterator[None]:
        first, n = self.cfg.profile_start, self.cfg.profile_steps
        if first and step == first:
            self._flush()
            jax.profiler.start_trace(str(self.stage.directory / "profile"))
        try:
            yield
        finally:
            if first and step == first + n - 1:
                jax.block_until_ready(self.state)
                jax.profiler.stop_trace()
                self.progress.write(
                    f"profile of steps {first}-{step} in {self.stage.directory}/profile"
                )


def step_key(seed: int, mesh: Mesh) -> jax.Array:
    """The key every step gets (steps fold in their step number), replicated on the mesh:
    the sharding a step compiled ahead of time expects (train.launch.CompiledAhead). Made by
    a jitted call, since a multi-process mesh is not addressable by `device_put`."""
    return jax.jit(lambda: jax.random.key(seed), out_shardings=sharding.replicated(mesh))()


def _on_mesh(batch: dict, mesh) -> dict:
    """Process-local numpy rows become global arrays split over the batch axes."""
    if all(isinstance(v, jax.Array) for v in batch.values()):
        return batch
    return sharding.to_global_batch(batch, mesh)


def _plain(tree: Any) -> Any:
    """JSON-safe copy (numpy scalars to Python numbers); also detaches it from later edits."""
    if isinstance(tree, dict):
        return {str(k): _plain(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_plain(v) for v in tree]
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def _peak_flops(device_kind: str) -> float:
    from train.flops import peak_flops_of

    return peak_flops_of(device_kind) or 0.0
