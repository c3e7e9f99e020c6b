"""Resuming an interrupted post-training stage exactly where its last checkpoint left it.

DIR/STAGE/resume/ (beside the final params in DIR/STAGE/checkpoints/, which later stages
read) holds the two newest checkpoints of an unfinished stage, written every
`checkpoint_every` steps (PPO: iterations) and after the last one by
train.checkpoint.Checkpointer:
  state - the whole TrainState: params, optimizer state, step
  data  - JSON `host` state the stage needs to continue exactly: the last logged metrics,
          results measured before training, PPO's KL coefficient and score history
  meta  - the config, so that another experiment's checkpoint is refused
Batches, prompt choices and random keys are pure functions of the step, so restoring the
step restores them. The directory is deleted once the stage has saved its final params.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
from ml_collections import ConfigDict

from train.checkpoint import Checkpointer, abstract_like
from train.workdir import RESUMABLE_PREFIXES, config_differences

log = logging.getLogger(__name__)

# Fields that change logging, checkpoint cadence or the device layout (orbax reshards on
# restore) but not the results: a resumed run may change them, like a pretraining run.
_PER_STAGE = ("log_every", "checkpoint_every")
_ANY_STAGE = ("mesh.", "dpo.enabled", *(f"pretrain.{p}" for p in RESUMABLE_PREFIXES))


class ResumeMismatchError(ValueError):
    pass


class StageResume:
    """The resume checkpoints of one stage directory. Use it as a context manager, so that a
    stage that fails still completes its pending (asynchronous) save.

    After `restore`, `step` is the step to continue after (0: from the start) and `host` the
    JSON state saved with it; the stage keeps `host` up to date and calls `step_done`.
    """

    def __init__(self, stage_dir: str | Path, config: ConfigDict, every: int):
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        self.directory = Path(stage_dir).absolute() / "resume"
        self.every = every
        self.meta = {"config": json.loads(config.to_json())}
        self.step = 0
        self.host: dict[str, Any] = {}
        self._ckpt: Checkpointer | None = None
        if self.directory.is_dir():
            self._check_config()  # before anything is restored, written or moved

    def _checkpointer(self) -> Checkpointer:
        if self._ckpt is None:
            self._ckpt = Checkpointer(self.directory, keep_last=2, keep_best=0)
        return self._ckpt

    def _check_config(self) -> None:
        ckpt = self._checkpointer()
        config = self.meta["config"]
        ignore = _ANY_STAGE + tuple(f"{s}.{f}" for s in config for f in _PER_STAGE)
        for step in reversed(ckpt.steps()):
            try:
                old = ckpt.read_meta(step)["config"]
            except Exception:  # noqa: BLE001 - unreadable: restore_latest reports it, moves it
                continue
            diffs = config_differences(old, config, ignore)
            if diffs:
                raise ResumeMismatchError(
                    f"{self.directory} holds an unfinished run (step {step}) of another "
                    f"config; it differs in {len(diffs)} field(s):\n  "
                    + "\n  ".join(diffs[:20])
                    + f"\nUse the same config to resume it, or delete {self.directory} to "
                    "start this stage over."
                )

    def restore(self, state: Any) -> Any:
        """The newest readable resume checkpoint, restored with `state`'s shapes and
        shardings (and `step`, `host` set); `state` itself when there is none."""
        if not self.directory.is_dir():
            return state
        restored = self._checkpointer().restore_latest(abstract_like(state))
        if restored is None:
            return state
        self.step, state, self.host, _ = restored
        log.info("%s: resumed from step %d (%s)", self.directory.parent.name, self.step, self)
        return state

    def step_done(self, step: int, state: Any, last: bool = False) -> None:
        """Saves after every `every`-th step and after the last one. The save is
        asynchronous: arrays are copied off the device before it returns (the next step
        donates them); `host` is copied now, as the stage goes on changing it."""
        if step % self.every == 0 or last:
            host = json.loads(json.dumps(self.host))
            self._checkpointer().save(step, state, host, self.meta)

    def finish(self) -> None:
        """The stage has saved its final params: its resume checkpoints go."""
        self.close()
        if jax.process_index() == 0:
            shutil.rmtree(self.directory, ignore_errors=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("resume checkpoints deleted")

    def close(self) -> None:
        if self._ckpt is not None:
            self._ckpt.close()
            self._ckpt = None

    def __enter__(self) -> StageResume:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __str__(self) -> str:
        return str(self.directory)
