"""The experiment directory: refuses to mix experiments, never overwrites another run's files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

# Fields a resumed run may change without becoming a different experiment.
RESUMABLE_PREFIXES = (
    "train.num_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.keep_best",
    "train.skip_nonfinite",
    "train.peak_flops",
    "mesh.",  # orbax reshards on restore
    "sample.",
    "data.dir",
)


class WorkdirError(ValueError):
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
    """'field: old -> new' for every field that differs, except ignored prefixes."""
    old_flat, new_flat = flatten(old), flatten(new)
    lines = []
    for name in sorted(set(old_flat) | set(new_flat)):
        if name.startswith(ignore):
            continue
        a, b = old_flat.get(name, "<absent>"), new_flat.get(name, "<absent>")
        if a != b:
            lines.append(f"{name}: {a!r} -> {b!r}")
    return lines


def prepare_workdir(workdir: str | Path, config: ConfigDict) -> Path:
    """Checks `workdir` and records the config in WORKDIR/config.json.

    A new or empty workdir is created (its parent must exist). An existing
    one must hold the same experiment: only the fields in RESUMABLE_PREFIXES
    may differ, otherwise nothing is touched and the differences are listed.
    """
    workdir = Path(workdir).expanduser().absolute()
    if jax.process_index() != 0:  # process 0 checks and writes; the others wait for it
        multihost_utils.sync_global_devices("workdir ready")
        return workdir
    if not workdir.parent.is_dir():
        raise WorkdirError(f"the parent directory {workdir.parent} of workdir does not exist")
    config_path = workdir / "config.json"
    new = json.loads(config.to_json())
    if config_path.exists():
        old = json.loads(config_path.read_text())
        diffs = config_differences(old, new, RESUMABLE_PREFIXES)
        if diffs:
            raise WorkdirError(
                f"{workdir} holds another experiment (its config.json differs in "
                f"{len(diffs)} field(s)):\n  "
                + "\n  ".join(diffs[:20])
                + "\nUse a new --workdir, or the same config to resume."
            )
    elif workdir.exists() and any(workdir.iterdir()):
        raise WorkdirError(
            f"{workdir} is not empty and holds no config.json: it is not a workdir of this "
            "project; choose a new or empty directory"
        )
    workdir.mkdir(exist_ok=True)
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_path)  # atomic: a crash leaves the old file or the new one
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("workdir ready")
    return workdir
