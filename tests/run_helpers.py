"""Tiny end-to-end training runs for the loop's tests: a small real corpus, a char tokenizer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "experiments" / "configs" / "stdlib_tiny.py"
# Real code, small enough that preparing and training take seconds.
STDLIB_MODULES = ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py", "heapq.py")


def make_corpus(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in STDLIB_MODULES:
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, directory / name)
    return directory


def overrides(corpus: Path, data_dir: Path, **train) -> list[str]:
    """A 2-layer model on 32-token rows of characters; every step logged."""
    settings = {
        "data.corpus": f"text:{corpus}",
        "data.dir": str(data_dir),
        "data.tokenizer": "char",
        "data.seq_len": 32,
        "data.vocab_size": 128,
        "model.vocab_size": 256,
        "model.d_model": 32,
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.d_ff": 64,
        "model.max_len": 32,
        "train.global_batch_size": 8,
        "train.log_every": 1,
        "train.eval_every": 10,
        "train.eval_batches": 2,
        "train.checkpoint_every": 4,
        "sample.num_samples": 0,
        "optim.warmup_steps": 2,
        "optim.total_steps": 40,
        **train,
    }
    return [f"--config.{key}={value}" for key, value in settings.items()]


def pretrain_command(workdir: Path, args: list[str], devices: int = 1) -> tuple[list[str], dict]:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONPATH": str(REPO),
    }
    command = [
        sys.executable,
        "-m",
        "experiments.pretrain",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        *args,
    ]
    return command, env


def run_pretrain(workdir: Path, args: list[str], devices: int = 1, timeout: int = 300):
    command, env = pretrain_command(workdir, args, devices)
    return subprocess.run(
        command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
