"""Checkpoints: ONE layout for every stage, asynchronous saves, safe restore.

STAGE_DIR/checkpoints/STEP/ holds four orbax items:
  params  the parameters, saved sharded: all that inference needs (a LoRA stage's are
          {"frozen": base, "lora": adapters}, merged by `load_model`: train/lora.py)
  opt     {"step", "opt_state"}: the rest of the TrainState
  data    JSON: the batch iterator's position and the stage's host-side state
  meta    JSON: the stage, its full config, the model config, the tokenizer's identity,
          and, in the checkpoint a stage ends with, "final": the stage's results
STAGE_DIR/tokenizer/ holds a copy of the tokenizer files whose sha256 the meta records, so
a checkpoint is never decoded with another tokenizer and inference needs no data. What reads
a stage directory as a whole (its model for inference, its tokenizer, its results) is in
train/saved_model.py; this module writes and restores the checkpoints themselves.

The RNG needs no item: every step's key is fold_in(key(seed), step), so restoring the step
restores the random stream. Restoring walks back from the newest checkpoint: one that
cannot be read is reported in one line, moved aside to `checkpoints.unreadable/` (kept,
never deleted) and skipped in favour of the previous one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from train import sharding
from train.state import TrainState

log = logging.getLogger(__name__)
ITEMS = ("params", "opt", "data", "meta")


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    """Saves and restores (TrainState, data position, meta) under STAGE_DIR/checkpoints."""

    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 2,
        keep_best: int = 1,
        best_metric: str = "eval/loss",
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        self.read_only = read_only
        self.manager: ocp.CheckpointManager | None = None
        preserve = [policies.LatestN(n=keep_last)]
        if keep_best:
            preserve.append(
                policies.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=True,  # lower is better: sort descending, keep the tail
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        if keep_best and not read_only:
            # orbax reads every kept checkpoint's metrics to rank them, as it opens them
            unranked = [int(d.name) for d in _numbered(self.directory) if not _ranked(d)]
            for step in unranked:
                log.warning(
                    "the checkpoint of step %d in %s is unreadable (its metrics); falling back "
                    "to an earlier one",
                    step,
                    self.directory,
                )
            self._move_aside(unranked)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            # best_fn makes orbax write each save's metrics to disk: without them a resumed
            # run would know no checkpoint's rank, and keep-best would drop the best one
            best_fn=(lambda m: m[best_metric]) if keep_best else None,
            best_mode="min",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # half-written saves of a killed run
            read_only=read_only,
            # a reader needs no ranking: it never reads the saved metrics, so an unreadable
            # metrics file cannot stop it from reading the checkpoints beside it
            lightweight_initialize=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._saving: int | None = None

    def save(
        self,
        step: int,
        state: TrainState,
        data_state: dict,
        meta: dict,
        metrics: dict | None = None,
    ) -> None:
        """Starts an (asynchronous) save; `metrics` ranks it for keep-best. A save that
        failed in the background is reported here or by `check`, whichever comes first."""
        self.check()
        if metrics is not None and self.best_metric not in metrics:
            metrics = None
        self._saving = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.PyTreeSave(state.params),
                    opt=ocp.args.PyTreeSave({"step": state.step, "opt_state": state.opt_state}),
                    data=ocp.args.JsonSave(data_state),
                    meta=ocp.args.JsonSave(meta),
                ),
                metrics=metrics,
                force=True,
            )
        except Exception as error:  # noqa: BLE001 - one line for the user, cause chained
            raise self._failed(step, error) from error

    def check(self) -> None:
        """Raises CheckpointError if an asynchronous save has failed (a full disk, say)."""
        try:
            self.manager.check_for_errors()
        except Exception as error:  # noqa: BLE001
            raise self._failed(self._saving, error) from error

    def _failed(self, step: int | None, error: Exception) -> CheckpointError:
        cause = _first_line(error)
        return CheckpointError(
            f"saving the checkpoint of step {step} to {self.directory} failed ({cause}); "
            "free disk space or fix the directory's permissions, then rerun the same command "
            "to resume from the last complete checkpoint"
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def delete(self, step: int) -> None:
        """Deletes the checkpoint of `step`, so that another can be saved as that step."""
        self.manager.wait_until_finished()
        self.manager.delete(step)

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def restore_latest(
        self, abstract_state: TrainState, prefer_step: int | None = None
    ) -> tuple[int, TrainState, dict, dict] | None:
        """(step, state, data_state, meta) of the newest readable checkpoint, or None.

        `abstract_state` (ShapeDtypeStruct leaves with shardings) says where each restored
        array goes. `prefer_step` is tried first; if unreadable, the newest readable one."""

        def read(step: int):
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    params=_restore_args(abstract_state.params),
                    opt=_restore_args(
                        {"step": abstract_state.step, "opt_state": abstract_state.opt_state}
                    ),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            opt = restored["opt"]
            state = TrainState(opt["step"], restored["params"], opt["opt_state"])
            _check_shapes(state, abstract_state)
            return state, restored["data"], restored["meta"]

        found = self._first_readable(read, prefer_step)
        if found is None:
            return None
        step, (state, data_state, meta) = found
        return step, state, data_state, meta

    def restore_params(
        self, abstract_params: Any, step: int | None = None
    ) -> tuple[int, Any, dict]:
        """(step, params, meta): the parameters alone (no optimizer state is read) of `step`
        or the newest readable checkpoint. `abstract_params` may be a subtree of the saved
        params (a PPO stage saves {"policy", "value"}; sampling reads {"policy"})."""

        def read(step: int):
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    params=_restore_args(abstract_params, partial=True),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            _check_shapes(restored["params"], abstract_params)
            return restored["params"], restored["meta"]

        found = self._first_readable(read, step)
        if found is None:
            raise FileNotFoundError(
                f"no readable checkpoint in {self.directory}; run that stage first"
            )
        step, (params, meta) = found
        return step, params, meta

    def _first_readable(self, read, prefer_step: int | None):
        unreadable = []
        order = list(reversed(self.steps()))
        if prefer_step in order:
            order.remove(prefer_step)
            order.insert(0, prefer_step)
        for step in order:
            try:
                result = read(step)
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped
                log.warning(
                    "the checkpoint of step %d in %s is unreadable (%s); falling back to an "
                    "earlier one",
                    step,
                    self.directory,
                    _first_line(error),
                )
                unreadable.append(step)
                continue
            self._move_aside(unreadable)
            return step, result
        self._move_aside(unreadable)
        return None

    def _move_aside(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints out of the way, so the run can save those steps anew."""
        if not steps:
            return
        if self.read_only:  # a reader never moves a trainer's files
            return
        if jax.process_index() == 0:
            aside = self.directory.with_name(self.directory.name + ".unreadable")
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                (self.directory / str(step)).rename(target)
                log.warning("moved the unreadable checkpoint of step %d to %s", step, target)
        sharding.sync_processes("unreadable checkpoints moved")
        if self.manager is not None:  # None while __init__ checks the folders
            self.manager.reload()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
            self.check()
        finally:
            self.manager.close()


def _numbered(directory: Path) -> list[Path]:
    """The step folders of a checkpoint directory."""
    return [p for p in directory.glob("*") if p.is_dir() and p.name.isdigit()]


def _ranked(step_dir: Path) -> bool:
    """Whether keep-best can read the step's metrics (absent ones are fine: unranked)."""
    path = step_dir / "metrics" / "metrics"
    try:
        json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        return False
    return True


def _restore_args(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    return ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=partial,
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _check_shapes(tree: Any, abstract: Any) -> None:
    """A restored tree must have the expected structure and shapes."""
    got = jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)
    want = jax.tree.map(lambda x: (x.shape, str(x.dtype)), abstract)
    if got != want:
        raise CheckpointError("the restored arrays do not match the model's shapes")


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with shardings: the restore target for `tree`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
