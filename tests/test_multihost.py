"""Two processes with 4 CPU devices each train like one process with 8 devices."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import numpy as np

from tests.run_helpers import (
    REPO,
    cpu_env,
    overrides,
    prepare_char_corpus,
    pretrain_command,
    run_pretrain,
)
from train.metrics_writer import read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    return [r["train/loss"] for r in read_metrics(workdir / "metrics.jsonl") if "train/loss" in r]


def test_two_processes_match_one(tmp_path):
    corpus, prepared = prepare_char_corpus(tmp_path)
    args = overrides(
        corpus,
        prepared,
        **{
            "train.num_steps": 4,
            "train.checkpoint_every": 2,
            "mesh.data": 2,
            "mesh.fsdp": 4,
        },
    )
    single = run_pretrain(tmp_path / "single", args, devices=8)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "compiled in the background" in single.stderr

    port = _free_port()
    processes = []
    for process_id in range(2):
        command, env = pretrain_command(
            tmp_path / "multi",
            [
                *args,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={process_id}",
            ],
            devices=4,
        )
        processes.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
        # each process ran the step compiled ahead for its part of the global arrays
        assert "compiled in the background" in err and "compiled for other" not in err
    # Equal up to float32 reduction order (gloo's all-reduce sums in another order).
    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"), rtol=1e-5)
    assert sorted(int(p.name) for p in (tmp_path / "multi" / "checkpoints").iterdir()) == [2, 4]


def _pipeline_command(config_file, workdir, devices: int, extra=()):
    env = cpu_env(devices)
    command = [
        sys.executable,
        "-m",
        "experiments.pipeline",
        f"--config={config_file}",
        f"--workdir={workdir}",
        *extra,
    ]
    return command, env


def test_sft_as_two_processes_matches_one(pretrained, tmp_path):
    """Post-training starts as a multi-process job too (nothing touches a JAX backend before
    jax.distributed.initialize): SFT on 2 processes x 4 devices equals 1 process x 8."""
    corpus, data_dir, root = pretrained
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "from pathlib import Path\n"
        "from tests.run_helpers import posttrain_config\n\n\n"
        "def get_config():\n"
        f"    c = posttrain_config(Path({str(corpus)!r}), Path({str(data_dir)!r}))\n"
        "    c.stages = 'sft'\n"
        "    c.sft.mesh.update(data=2, fsdp=4)\n"
        "    return c\n"
    )
    single, multi = (
        shutil.copytree(root, tmp_path / "single"),
        shutil.copytree(root, tmp_path / "multi"),
    )
    command, env = _pipeline_command(config_file, single, devices=8)
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the loop compiled SFT's step in the background, for the arguments it then got
    assert "sft step compiled in the background" in done.stderr
    assert "compiled for other" not in done.stderr

    port = _free_port()
    processes = []
    for process_id in range(2):
        flags = (
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={process_id}",
        )
        command, env = _pipeline_command(config_file, multi, devices=4, extra=flags)
        processes.append(
            subprocess.Popen(
                command,
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=400) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "compiled for other" not in err

    def sft_losses(directory):
        rows = read_metrics(directory / "sft" / "metrics.jsonl")
        return [r["sft/loss"] for r in rows if "sft/loss" in r]

    assert len(sft_losses(single)) == 6
    np.testing.assert_allclose(sft_losses(multi), sft_losses(single), rtol=1e-5)
