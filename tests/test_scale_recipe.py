"""The multi-GPU recipe (experiments/bench/scale_gpu.sh) and its weak-scaling table.

The script itself runs end to end on CPU with `--dry-run` (8 fake devices, tiny presets; a
few minutes on two cores, so not here); these tests keep its parts honest cheaply.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from experiments.bench.scaling import weak_scaling

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "scale_gpu.sh"


def test_every_xla_flag_in_the_recipe_is_known_to_xla():
    flags = sorted(set(re.findall(r"--xla_gpu_[a-z_]+=\S+", SCRIPT.read_text())))
    assert len(flags) >= 8
    # XLA aborts the process on an unknown flag, on any backend.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(f.strip('"') for f in flags)}
    run = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.device_count())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_bad_arguments_get_one_line_and_exit_2():
    run = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "waek"], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "scale_gpu.sh: unknown argument 'waek'; takes --dry-run and stages weak, flags, 7b"
    ]


def _row(mesh: str, devices: int, tokens_per_device: float, tag: str = "lhs") -> dict:
    return {
        "bench": "train",
        "variant": f"gpt-1.3b/T2048/b{8 * devices}/{mesh}[attention_backend=cudnn]",
        "devices": devices,
        "step_ms": 8 * 2048 / tokens_per_device * 1e3,
        "tokens_per_s_per_device": tokens_per_device,
        "tag": tag,
    }


def test_weak_scaling_is_per_device_throughput_against_one_device_of_the_same_tag():
    rows = [
        _row("data1.fsdp1.tensor1", 1, 60_000.0),
        _row("data1.fsdp4.tensor1", 4, 55_800.0),
        _row("data1.fsdp2.tensor2", 4, 48_000.0),
        _row("data1.fsdp4.tensor1", 4, 57_000.0, tag="other"),  # no 1-device row in its tag
        {"bench": "train", "variant": "gpt-1.3b/T2048/b8", "step_ms": 1.0},  # not a mesh row
        {"bench": "train", "variant": "gpt-1.3b/T2048/b32/data1.fsdp8.tensor1", "error": "x"},
    ]
    eff = {(e["tag"], e["mesh"]): e["efficiency"] for e in weak_scaling(rows)}
    assert eff == {
        ("lhs", "data1.fsdp1.tensor1"): 1.0,
        ("lhs", "data1.fsdp4.tensor1"): 0.93,
        ("lhs", "data1.fsdp2.tensor2"): 0.8,
        ("other", "data1.fsdp4.tensor1"): None,
    }
