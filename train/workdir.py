"""The stage directory: one experiment per directory, one run at a time, nothing overwritten.

A stage directory holds `config.json` (the config that made it), `checkpoints/`,
`tokenizer/`, `metrics.jsonl` and `tensorboard/`. Reusing it with a config that differs in
anything but the fields a resumed run may change is refused with the list of differences,
unless the directory holds no results yet (no checkpoint, no metrics): a first run that
stopped on a mistake before training must not tie its directory to the mistake.
While a run uses it, `.lock` is held (an advisory `flock`, released by the kernel when the
process dies, so a killed run never leaves a stale lock); a second run is refused with the
holder's pid and command.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

import jax
from ml_collections import ConfigDict

from train import sharding

log = logging.getLogger(__name__)

# The model's kernel choices: the same function and the same parameters by another
# implementation (tests hold them equal), so a run may resume under another choice, or
# under a new default ("auto").
KERNEL_FIELDS = (
    "attention_backend",
    "norm_impl",
    "activation_impl",
    "cross_entropy_impl",
    "decode_attention",
    "decode_matmul",
)
# Fields a resumed run may change without becoming a different experiment: how long, how
# often it logs, evaluates and saves, the device layout (orbax reshards on restore), the
# kernels.
RESUMABLE_PREFIXES = (
    *(f"model.{name}" for name in KERNEL_FIELDS),
    "train.num_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.keep_best",
    "train.skip_nonfinite",
    "train.peak_flops",
    "train.profile_",
    "mesh.",
    "sample.",
    "data.dir",
)


class WorkdirError(ValueError):
    pass


class WorkdirBusy(WorkdirError):
    pass


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _with_schedule_length(flat: dict[str, object]) -> dict[str, object]:
    """`optim.total_steps=0` means "the stage's train.num_steps": compared resolved, since
    more steps would otherwise stretch the learning-rate schedule of a run half done."""
    out = dict(flat)
    for name, value in flat.items():
        if name.endswith("optim.total_steps") and value == 0:
            section = name[: -len("optim.total_steps")]
            steps = flat.get(f"{section}train.num_steps")
            if steps is not None:
                out[name] = steps
    return out


def config_differences(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """'field: old -> new' for every field that differs, except ignored prefixes (also
    inside a stage's section: "train.num_steps" ignores "sft.train.num_steps" too). The
    schedule's length is compared resolved (`_with_schedule_length`)."""
    old_flat, new_flat = _with_schedule_length(flatten(old)), _with_schedule_length(flatten(new))
    lines = []
    for name in sorted(set(old_flat) | set(new_flat)):
        if name.startswith(ignore) or name.partition(".")[2].startswith(ignore):
            continue
        a, b = old_flat.get(name, "<absent>"), new_flat.get(name, "<absent>")
        if a != b:
            lines.append(f"{name}: {a!r} -> {b!r}")
    return lines


def differences_message(where: str, diffs: list[str]) -> str:
    hint = ""
    if any("optim.total_steps" in line for line in diffs):
        hint = (
            " To train longer on the same schedule, set optim.total_steps to its old value"
            " (the steps after it run at optim.end_lr)."
        )
    return (
        f"{where} holds another experiment (its config differs in {len(diffs)} field(s)):\n  "
        + "\n  ".join(diffs[:20])
        + "\nUse a new --workdir, or the same config to resume."
        + hint
    )


def check_same_experiment(where: str, old_meta: dict, new_meta: dict) -> None:
    """Refuses to resume `where` (a checkpoint, meta `old_meta`) as a run of `new_meta` if
    its tokenizer or its config differs beyond what a resumed run may change."""
    old_tok, new_tok = old_meta.get("tokenizer", {}), new_meta.get("tokenizer", {})
    if old_tok.get("sha256") != new_tok.get("sha256"):
        raise ValueError(
            f"{where} was written with another tokenizer (sha256 "
            f"{str(old_tok.get('sha256'))[:12]}, now {str(new_tok.get('sha256'))[:12]}); the "
            "prepared data changed since: restore it, or use a new workdir"
        )
    diffs = config_differences(
        old_meta.get("config", {}), new_meta.get("config", {}), RESUMABLE_PREFIXES
    )
    diffs += config_differences(old_meta.get("model", {}), new_meta.get("model", {}), KERNEL_FIELDS)
    if diffs:
        raise ValueError(differences_message(where, diffs))


def holds_results(path: Path) -> bool:
    """Whether a stage directory holds anything a run produced: a checkpoint (readable or
    moved aside) or metrics."""
    saved = [path / "checkpoints", path / "checkpoints.unreadable"]
    return any(path.glob("metrics*.jsonl")) or any(d.is_dir() and any(d.iterdir()) for d in saved)


class Workdir:
    """An open stage directory: checked, locked and with its config recorded. Use it as a
    context manager; the lock is released on exit."""

    def __init__(self, path: str | Path, config: ConfigDict | dict):
        self.path = Path(path).expanduser().absolute()
        self.config = json.loads(config.to_json()) if isinstance(config, ConfigDict) else config
        self._lock = None

    def __enter__(self) -> Workdir:
        if jax.process_index() == 0:  # process 0 checks and writes; the others wait for it
            self._open()
        sharding.sync_processes(f"workdir {self.path} ready")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def _open(self) -> None:
        if not self.path.parent.is_dir():
            raise WorkdirError(f"the parent directory {self.path.parent} does not exist")
        if self.path.exists() and not self.path.is_dir():
            raise WorkdirError(f"{self.path} is a file, not a directory; choose another workdir")
        config_path = self.path / "config.json"
        if config_path.exists():
            old = json.loads(config_path.read_text())
            diffs = config_differences(old, self.config, RESUMABLE_PREFIXES)
            if diffs and holds_results(self.path):
                raise WorkdirError(differences_message(str(self.path), diffs))
            if diffs:
                log.warning(
                    "%s holds no results of its config yet: replacing it (%s)",
                    self.path,
                    "; ".join(diffs[:3]) + ("; ..." if len(diffs) > 3 else ""),
                )
        elif self.path.exists() and any(p.name != ".lock" for p in self.path.iterdir()):
            raise WorkdirError(
                f"{self.path} is not empty and holds no config.json: it is not a workdir of "
                "this project; choose a new or empty directory"
            )
        try:
            self.path.mkdir(exist_ok=True)
            self._acquire()
            tmp = config_path.with_name(f".config.json.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, config_path)  # atomic: a crash leaves the old file or the new one
        except OSError as error:  # no permission, a read-only or special file system
            raise WorkdirError(
                f"cannot write to {self.path} ({error.strerror or error}); choose a writable "
                "--workdir"
            ) from error

    def _acquire(self) -> None:
        lock = open(self.path / ".lock", "a+")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise WorkdirBusy(
                f"{self.path} is in use by {holder}; wait for it to finish, stop it, or "
                "choose another --workdir"
            ) from None
        lock.seek(0)
        lock.truncate()
        command = " ".join(sys.argv)[:300]
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} ({command})\n")
        lock.flush()
        self._lock = lock
