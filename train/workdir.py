"""The stage directory: one experiment per directory, one run at a time, nothing overwritten.

A stage directory holds `config.json` (the config that made it), `checkpoints/`,
`tokenizer/`, `metrics.jsonl` and `tensorboard/`. Reusing it with a config that differs in
anything but the fields a resumed run may change is refused with the list of differences.
While a run uses it, `.lock` is held (an advisory `flock`, released by the kernel when the
process dies, so a killed run never leaves a stale lock); a second run is refused with the
holder's pid and command.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path

import jax
from ml_collections import ConfigDict

from train import sharding

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


def config_differences(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """'field: old -> new' for every field that differs, except ignored prefixes (also
    inside a stage's section: "train.num_steps" ignores "sft.train.num_steps" too)."""
    old_flat, new_flat = flatten(old), flatten(new)
    lines = []
    for name in sorted(set(old_flat) | set(new_flat)):
        if name.startswith(ignore) or name.partition(".")[2].startswith(ignore):
            continue
        a, b = old_flat.get(name, "<absent>"), new_flat.get(name, "<absent>")
        if a != b:
            lines.append(f"{name}: {a!r} -> {b!r}")
    return lines


def differences_message(where: str, diffs: list[str]) -> str:
    return (
        f"{where} holds another experiment (its config differs in {len(diffs)} field(s)):\n  "
        + "\n  ".join(diffs[:20])
        + "\nUse a new --workdir, or the same config to resume."
    )


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
            if diffs:
                raise WorkdirError(differences_message(str(self.path), diffs))
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
