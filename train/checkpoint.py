"""Orbax checkpoints: asynchronous saves, keep-last-N plus keep-best, and safe restore.

A checkpoint holds three items:
  state  - the TrainState (params, optimizer state, step), saved sharded
  data   - the data iterator's position (a small JSON dict)
  meta   - JSON: the model config and anything else needed to check compatibility

The RNG needs no item of its own: every step's key is fold_in(key(seed), step),
so restoring the step restores the random stream.

Restoring walks back from the newest checkpoint: one that cannot be read
(half written, truncated, corrupted) is reported, moved aside to
`<directory>.unreadable/` (kept for inspection, never deleted) and skipped in
favour of the previous one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    """Saves and restores (state, data position, meta) under `directory`."""

    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 2,
        keep_best: int = 1,
        best_metric: str = "eval/loss",
        async_save: bool = True,
    ):
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
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
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # half-written saves of a killed run
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def save(
        self, step: int, state: Any, data_state: dict, meta: dict, metrics: dict | None = None
    ) -> None:
        """Starts an (asynchronous) save; `metrics` ranks it for keep-best."""
        if metrics is not None and self.best_metric not in metrics:
            metrics = None
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=metrics,
            force=True,
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        """The meta item of one checkpoint alone: compatibility is checked before any state
        is restored (a mismatched state would otherwise be taken for a corrupt one)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def restore_latest(
        self, abstract_state: Any, prefer_step: int | None = None
    ) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) of the newest readable checkpoint, or None.

        `abstract_state` (jax.ShapeDtypeStruct leaves with shardings) says
        where each restored array goes. `prefer_step` is tried first (the best one,
        say); if it is unreadable, the newest readable one is returned.
        """
        unreadable = []
        order = list(reversed(self.steps()))
        if prefer_step in order:
            order.remove(prefer_step)
            order.insert(0, prefer_step)
        for step in order:
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                _check_shapes(restored["state"], abstract_state)
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped
                log.warning(
                    "checkpoint at step %d in %s is unreadable (%s: %s); falling back to an "
                    "earlier one",
                    step,
                    self.directory,
                    type(error).__name__,
                    str(error).splitlines()[0][:200] if str(error) else "",
                )
                unreadable.append(step)
                continue
            self._move_aside(unreadable)
            return step, restored["state"], restored["data"], restored["meta"]
        self._move_aside(unreadable)
        return None

    def _move_aside(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints out of the way, so the run can save those steps anew."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory.with_name(self.directory.name + ".unreadable")
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                (self.directory / str(step)).rename(target)
                log.warning("moved the unreadable checkpoint of step %d to %s", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("unreadable checkpoints moved")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_shapes(state: Any, abstract_state: Any) -> None:
    """A restored tree must have the expected structure and shapes."""
    got = jax.tree.map(lambda x: (x.shape, str(x.dtype)), state)
    want = jax.tree.map(lambda x: (x.shape, str(x.dtype)), abstract_state)
    if got != want:
        raise CheckpointError("restored state does not match the model's shapes")


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with shardings, the restore target for `state`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
