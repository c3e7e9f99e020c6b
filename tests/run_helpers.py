"""Tiny end-to-end training runs for the loop's tests: a small real corpus, a char tokenizer."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "experiments" / "configs" / "stdlib_tiny.py"
# Real code, small enough that preparing and training take seconds.
STDLIB_MODULES = ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py", "heapq.py")
# CPU code generation without LLVM's optimisations: the tests' programs are tiny and run for
# moments, so compiling them is most of the suite's time (the whole suite on the 2-core VM:
# 1,257 s at XLA's default level, 852 s with this). XLA's own passes (fusion, layouts,
# sharding) still run: only the machine code of the programs tested is slower.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
# First on the path of the processes the tests start: its torch package fails to import.
WITHOUT_TORCH = REPO / "tests" / "without_torch"


def cpu_env(devices: int = 1) -> dict[str, str]:
    """The environment of a process a test starts: the CPU with `devices` fake devices,
    compiled as the tests compile (conftest.py), this repository importable, torch not
    (tests/without_torch says why)."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAG}",
        # the inherited path last: packages installed outside the environment stay importable
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(WITHOUT_TORCH), str(REPO), os.environ.get("PYTHONPATH")) if p
        ),
    }


def make_corpus(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in STDLIB_MODULES:
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, directory / name)
    return directory


def prepare_char_corpus(root: Path) -> tuple[Path, Path]:
    """(corpus folder, prepared data dir) with a character tokenizer, prepared once."""
    from data.prepare import prepare

    corpus = make_corpus(root / "text")
    data_dir = root / "prepared"
    prepare(
        f"text:{corpus}", data_dir, tokenizer="char", vocab_size=128, num_workers=1, progress=False
    )
    return corpus, data_dir


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
        "optim.total_steps": 40,  # fixed, so that runs of different lengths share a schedule
        **train,
    }
    return [f"--config.{key}={value}" for key, value in settings.items()]


def char_config(root: Path, **train):
    """stdlib_tiny with `overrides` applied in-process (for tests that call train() directly)."""
    from experiments.configs.stdlib_tiny import get_config

    corpus, prepared = prepare_char_corpus(root)
    config = get_config()
    for item in overrides(corpus, prepared, **train):
        key, value = item[len("--config.") :].split("=", 1)
        section, field = key.split(".")
        old = config[section][field]
        config[section][field] = type(old)(value) if old is not None else value
    return config


def pretrain_command(workdir: Path, args: list[str], devices: int = 1) -> tuple[list[str], dict]:
    env = cpu_env(devices)
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


class TrainedRun(NamedTuple):
    corpus: Path
    prepared: Path
    workdir: Path


# The finished run several tests read or copy: evaluated and checkpointed at steps 4 and 8.
TRAINED_RUN_SETTINGS = {"train.num_steps": 8, "train.eval_every": 4}


def built_once(root: Path, name: str, build: Callable[[Path], object]) -> Path:
    """ROOT/NAME, made by `build(ROOT/NAME)` in the first process that asks; pytest-xdist's
    other workers wait on the lock, then reuse it."""
    folder = root / name
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            build(folder)
            (root / f"{name}.done").touch()
    return folder


def shared_trained_run(root: Path) -> TrainedRun:
    """A pretraining run of `TRAINED_RUN_SETTINGS` in ROOT/trained_run, trained once."""

    def train(run: Path) -> None:
        corpus, prepared = prepare_char_corpus(run)
        result = run_pretrain(run / "workdir", overrides(corpus, prepared, **TRAINED_RUN_SETTINGS))
        assert result.returncode == 0, result.stderr[-3000:]

    run = built_once(root, "trained_run", train)
    return TrainedRun(run / "text", run / "prepared", run / "workdir")


def posttrain_config(corpus: Path, data_dir: Path):
    """posttrain_tiny shrunk to seconds on a CPU: a 1-layer model pretrained for 2 steps on
    the char corpus, short SFT and PPO that log every step and checkpoint every 2."""
    from data.prepare import load_prepared_tokenizer
    from experiments.configs import posttrain_tiny

    c = posttrain_tiny.get_config()
    p = c.pretrain
    p.data.update(corpus=f"text:{corpus}", dir=str(data_dir), tokenizer="char", vocab_size=128)
    p.data.seq_len = 32
    # Exactly the tokenizer's vocabulary: sampled ids must all decode.
    vocab = load_prepared_tokenizer(data_dir).vocab_size
    p.model.update(vocab_size=vocab, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=96)
    p.train.update(global_batch_size=8, num_steps=2, eval_every=2, eval_batches=1)
    p.train.checkpoint_every = 2
    p.optim.update(warmup_steps=1, total_steps=2)
    c.sft.data.update(seq_len=96, eval_rows=8)
    c.sft.train.update(
        global_batch_size=8, num_steps=6, log_every=1, eval_every=3, checkpoint_every=2
    )
    c.sft.optim.warmup_steps = 1
    c.reward.data.update(seq_len=96, normalization_samples=8)
    c.reward.train.update(global_batch_size=8, num_steps=4, log_every=1, checkpoint_every=2)
    c.reward.optim.warmup_steps = 1
    c.ppo.data.update(max_prompt_len=48, max_new_tokens=16)
    c.ppo.train.update(global_batch_size=8, num_steps=4, log_every=1, checkpoint_every=2)
    c.ppo.algorithm.update(epochs=1, num_minibatches=1)
    c.grpo.data.update(max_prompt_len=48, max_new_tokens=16)
    c.grpo.train.update(global_batch_size=2, num_steps=4, log_every=1, checkpoint_every=2)
    c.dpo.data.seq_len = 96
    c.dpo.train.update(global_batch_size=8, num_steps=4, log_every=1, checkpoint_every=2)
    c.dpo.optim.warmup_steps = 1
    c.eval.update(num_prompts=8, max_prompt_len=48, max_new_tokens=16, batch_size=8)
    return c


def synthetic_posttrain_data(directory: Path, n: int = 24) -> None:
    """Short chat tasks (the mined ones are too long for a 96-token model), in the JSONL files
    rlhf.datasets.load reads instead of mining."""
    from rlhf import stdlib_tasks

    sft = []
    for i in range(n):
        name = f"f{i}"
        ask = f"Write the Python function `{name}`:\n\ndef {name}(x):"
        answer = f"def {name}(x):\n    return x + {i}"
        sft.append(
            {
                "messages": [
                    {"role": "user", "content": ask},
                    {"role": "assistant", "content": answer},
                ],
                "name": name,
                "file": "synthetic.py",
            }
        )
    pairs = [
        {
            "prompt": r["messages"][:1],
            "chosen": r["messages"][1]["content"],
            "rejected": r["messages"][1]["content"].replace("+", "-"),
            "kind": "other_body",
            "name": r["name"],
            "file": r["file"],
        }
        for r in sft
    ]
    for name, records in (
        ("sft_train", sft),
        ("sft_eval", sft[:8]),
        ("pairs_train", pairs),
        ("pairs_eval", pairs[:8]),
    ):
        stdlib_tasks.write_jsonl(directory / f"{name}.jsonl", records)


def pretrained_pipeline(root: Path, corpus: Path, data_dir: Path):
    """(config, ROOT) with ROOT/pretrain trained and ROOT/posttrain_data written."""
    from train.pretrain import train

    config = posttrain_config(corpus, data_dir)
    root.mkdir(parents=True, exist_ok=True)
    train(config.pretrain, root / "pretrain")
    synthetic_posttrain_data(root / "posttrain_data")
    return config, root


class PretrainedPipeline(NamedTuple):
    corpus: Path
    data_dir: Path
    root: Path  # ROOT/pretrain trained, ROOT/posttrain_data written


def shared_pretrained_pipeline(root: Path) -> PretrainedPipeline:
    """`pretrained_pipeline` on the char corpus in ROOT/posttrain, built once; its config is
    `posttrain_config(corpus, data_dir)`."""

    def build(folder: Path) -> None:
        corpus, data_dir = prepare_char_corpus(folder / "corpus")
        pretrained_pipeline(folder / "pipeline", corpus, data_dir)

    folder = built_once(root, "posttrain", build)
    return PretrainedPipeline(
        folder / "corpus" / "text", folder / "corpus" / "prepared", folder / "pipeline"
    )
