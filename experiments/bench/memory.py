"""Per-device memory of the pretraining step, planned ahead of time on fake CPU devices.

The project's own step (train/pretrain_step.py, AdamW from train/optim.py, the
shardings of train/state.py) is lowered with abstract inputs (ShapeDtypeStructs
carrying their shardings) and compiled for a mesh of N fake CPU devices;
`compiled.memory_analysis()` then gives XLA's buffer assignment for one device.
Nothing is allocated, so a 7B model plans on a laptop.

Three things differ from the GPU and are handled here:
  - cuDNN attention does not compile on CPU: the plan uses
    `attention_backend="xla"`, and the remat policy "dots" becomes
    "dots_no_batch" (cuDNN's kernel is not a dot, so on the GPU "dots" saves
    only the projections, which is what "dots_no_batch" saves here).
  - XLA's attention materialises the [B, H, T, T] scores, which a flash kernel
    never stores. At a fixed number of tokens per device B*T, those buffers
    grow as B*T*T, i.e. linearly in T, and nothing else changes size. So each
    case is compiled at (B, T) and at (2B, T/2), and the temporaries are
    extrapolated linearly to T = 0: temp_flash = 2*temp(T/2) - temp(T).
  - The CPU compiler computes bf16 matmuls in float32 and keeps their float32
    outputs (the buffer assignment shows the saved activations in float32), and
    its fusion and scheduling differ from the GPU's: its temporaries are larger
    than the GPU's (2.2x the total in the one case BENCHMARKS.md measured on a
    GPU). The arguments (state and batch) are exact, and so is `floor_GiB`, what
    any compiler holds: the state, the batch and the gradients.

Run as `python -m experiments.bench.memory` (or `python -m experiments.bench
--only memory`); each device count plans in its own subprocess started with
XLA_FLAGS=--xla_force_host_platform_device_count=N.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from model.config import ModelConfig, get_preset
from model.transformer import LanguageModel
from train.optim import OptimConfig, make_optimizer
from train.pretrain_step import StepConfig, lm_loss_sums, make_pretrain_step
from train.sharding import MeshConfig, batch_sharding, jit_sharded, make_mesh, mesh_context
from train.sharding import replicated as replicated_sharding
from train.state import abstract_train_state, strip_axis_names

GiB = 2**30
H200_USABLE_GiB = 139.0  # an H200 has 141 GB; about 139 GiB usable (the device tool's figure)


@dataclasses.dataclass(frozen=True)
class MemoryCase:
    preset: str
    mesh: tuple[int, int, int]  # (data, fsdp, tensor)
    rows_per_device: int  # global microbatch rows / device count
    seq_len: int
    microbatches: int = 1
    model: tuple[tuple[str, Any], ...] = ()  # ModelConfig overrides

    @property
    def devices(self) -> int:
        return math.prod(self.mesh)

    @property
    def global_batch(self) -> int:
        return self.rows_per_device * self.devices * self.microbatches

    @property
    def name(self) -> str:
        d, f, t = self.mesh
        extra = ",".join(f"{k}={v}" for k, v in self.model)
        mb = f"/mb{self.microbatches}" if self.microbatches > 1 else ""
        return (
            f"{self.preset}/n{self.devices}/data{d}.fsdp{f}.tensor{t}"
            f"/T{self.seq_len}/b{self.rows_per_device}{mb}" + (f"[{extra}]" if extra else "")
        )


def cpu_model_config(case: MemoryCase) -> ModelConfig:
    """The case's model with the CPU substitutions described in the module docstring."""
    cfg = get_preset(case.preset, **dict(case.model))
    return cfg.replace(
        attention_backend="xla",
        remat="dots_no_batch" if cfg.remat == "dots" else cfg.remat,
        max_len=max(cfg.max_len, case.seq_len),
    )


def shard_bytes(abstract_tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(abstract_tree)
    )


def _tree_bytes(abstract_tree: Any) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(abstract_tree))


def saved_activation_bytes(cfg: ModelConfig, rows: int, seq_len: int) -> int:
    """Bytes JAX saves for the backward pass of `rows` x `seq_len` tokens: the residuals of the
    loss's VJP (the leaves of the pullback, traced abstractly) less the parameters among them.
    With remat "dots" they are matmul outputs, which a compiler keeps; without remat most are
    elementwise results, which XLA recomputes inside its fusions instead of storing."""
    model = LanguageModel(cfg)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
    params = strip_axis_names(params)
    batch = {
        "inputs": jax.ShapeDtypeStruct((rows, seq_len), jnp.int32),
        "targets": jax.ShapeDtypeStruct((rows, seq_len), jnp.int32),
        "weights": jax.ShapeDtypeStruct((rows, seq_len), jnp.float32),
    }
    loss_sums = lm_loss_sums(model, 0.0, deterministic=True)
    loss = lambda p, b: loss_sums(p, b, jax.random.key(0))[0]  # noqa: E731
    pullback = jax.eval_shape(lambda p, b: jax.vjp(lambda q: loss(q, b), p)[1], params, batch)
    return _tree_bytes(pullback) - _tree_bytes(params)


def saved_activations_per_device(case: MemoryCase) -> int:
    """`saved_activation_bytes` for one device: the rows of one data-parallel group and
    microbatch, divided over tensor (a lower bound: not every activation is split over it),
    the attention scores removed by the same extrapolation in T as the temporaries."""
    cfg = cpu_model_config(case)
    rows = case.rows_per_device * case.mesh[2]
    full = saved_activation_bytes(cfg, rows, case.seq_len)
    half = saved_activation_bytes(cfg, 2 * rows, case.seq_len // 2)
    return (2 * half - full) // case.mesh[2]


def compile_step(
    cfg: ModelConfig,
    mesh_cfg: MeshConfig,
    devices: Sequence[jax.Device],
    batch: int,
    seq_len: int,
    microbatches: int,
) -> tuple[Any, Any]:
    """(compiled step, abstract train state) for abstract inputs: nothing is allocated."""
    model = LanguageModel(cfg)
    tx = make_optimizer(OptimConfig(total_steps=10_000))  # the schedule does not change the timing
    mesh = make_mesh(mesh_cfg, devices)
    rng = jax.eval_shape(jax.random.key, 0)
    init = lambda r: model.init(r, jnp.zeros((1, seq_len), jnp.int32))["params"]  # noqa: E731
    state, shardings = abstract_train_state(init, tx, mesh, rng)
    rows = batch_sharding(mesh)
    abstract_batch = {
        "inputs": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=rows),
        "targets": jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=rows),
        "weights": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=rows),
    }
    step = make_pretrain_step(model, tx, StepConfig(num_microbatches=microbatches))
    replicated = replicated_sharding(mesh)
    jitted = jit_sharded(
        step,
        mesh,
        in_shardings=(shardings, rows, replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    with mesh_context(mesh):
        compiled = jitted.jitted.lower(state, abstract_batch, rng).compile()
    return compiled, state


def memory_fields(compiled: Any) -> dict[str, int]:
    stats = compiled.memory_analysis()
    return {
        "argument": stats.argument_size_in_bytes,
        "output": stats.output_size_in_bytes,
        "alias": stats.alias_size_in_bytes,
        "temp": stats.temp_size_in_bytes,
        "code": stats.generated_code_size_in_bytes,
    }


def plan(case: MemoryCase, devices: Sequence[jax.Device] | None = None) -> dict:
    """One row: per-device bytes of the step at (B, T) and extrapolated to a flash attention."""
    devices = list(jax.devices() if devices is None else devices)[: case.devices]
    if len(devices) < case.devices:
        raise ValueError(
            f"{case.name} needs {case.devices} devices, this process has {len(devices)}; "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={case.devices}"
        )
    if case.seq_len % 2:
        raise ValueError(f"{case.name}: seq_len must be even (it is also planned at T/2)")
    cfg = cpu_model_config(case)
    mesh_cfg = MeshConfig(*case.mesh)
    rows = case.global_batch
    t0 = time.perf_counter()
    compiled, state = compile_step(cfg, mesh_cfg, devices, rows, case.seq_len, case.microbatches)
    full = memory_fields(compiled)
    compile_s = time.perf_counter() - t0
    del compiled
    half_compiled, _ = compile_step(
        cfg, mesh_cfg, devices, 2 * rows, case.seq_len // 2, case.microbatches
    )
    half = memory_fields(half_compiled)
    del half_compiled
    gc.collect()
    temp_flash = 2 * half["temp"] - full["temp"]
    saved = saved_activations_per_device(case)
    total = full["argument"] + full["output"] - full["alias"] + temp_flash
    row = {
        "bench": "memory",
        "variant": case.name,
        "devices": case.devices,
        "mesh": list(case.mesh),
        "state_GiB": shard_bytes(state) / GiB,
        "params_GiB": shard_bytes(state.params) / GiB,
        "argument_GiB": full["argument"] / GiB,
        "output_GiB": full["output"] / GiB,
        "alias_GiB": full["alias"] / GiB,
        "temp_GiB": temp_flash / GiB,
        "temp_xla_attention_GiB": full["temp"] / GiB,
        "temp_half_T_GiB": half["temp"] / GiB,
        "code_GiB": full["code"] / GiB,
        "total_GiB": total / GiB,
        "total_xla_attention_GiB": (total - temp_flash + full["temp"]) / GiB,
        "saved_activations_GiB": saved / GiB,
        "compile_s": compile_s,
        "bytes": {"full_T": full, "half_T": half},
    }
    return {**row, "floor_GiB": floor_GiB(row), "fits_h200": fits_h200(row)}


def floor_GiB(row: dict) -> float:
    """What any compiler holds at once: the arguments (state, batch) and outputs, one whole
    gradient (clipping by the global norm reads every gradient before any update), and with
    microbatches the float32 gradient accumulator too (parameters are float32)."""
    gradients = 2 if re.search(r"/mb\d+", row["variant"]) else 1
    return (
        row["argument_GiB"] + row["output_GiB"] - row["alias_GiB"] + gradients * row["params_GiB"]
    )


def fits_h200(row: dict) -> str:
    """ "yes" if even the CPU plan fits, "no" if not even the floor does, else "?"."""
    if row["total_GiB"] <= H200_USABLE_GiB:
        return "yes"
    return "no" if floor_GiB(row) > H200_USABLE_GiB else "?"


# ---- one subprocess per device count ------------------------------------------------


def _case_to_json(case: MemoryCase) -> dict:
    return {**dataclasses.asdict(case), "model": [list(kv) for kv in case.model]}


def _case_from_json(d: dict) -> MemoryCase:
    return MemoryCase(
        d["preset"],
        tuple(d["mesh"]),
        d["rows_per_device"],
        d["seq_len"],
        d["microbatches"],
        tuple(tuple(kv) for kv in d["model"]),
    )


def plan_in_subprocesses(cases: Sequence[MemoryCase], timeout_s: float = 3600) -> Iterator[dict]:
    """Rows for `cases`, each device count planned in a fresh CPU process with N fake devices.

    A failed subprocess gives "error" rows for its cases that did not report.
    """
    by_devices: dict[int, list[MemoryCase]] = {}
    for case in cases:
        by_devices.setdefault(case.devices, []).append(case)
    for n, group in sorted(by_devices.items()):
        flags = os.environ.get("XLA_FLAGS", "")
        flags = " ".join(f for f in flags.split() if "host_platform_device_count" not in f)
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip(),
        }
        payload = json.dumps([_case_to_json(c) for c in group])
        command = [sys.executable, "-m", "experiments.bench.memory", "--worker", payload]
        reported: set[str] = set()
        try:
            proc = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            start = time.monotonic()
            for line in proc.stdout:
                if line.startswith("{"):
                    row = json.loads(line)
                    reported.add(row["variant"])
                    yield row
                if time.monotonic() - start > timeout_s:
                    proc.kill()
                    break
            stderr = proc.stderr.read()
            rc = proc.wait()
        except OSError as e:
            rc, stderr = -1, repr(e)
        for case in group:
            if case.name not in reported:
                tail = stderr.strip().splitlines()[-1:] if stderr else []
                yield {
                    "bench": "memory",
                    "variant": case.name,
                    "error": f"planner subprocess exited {rc}: {' '.join(tail)[:300]}",
                }


def _worker(payload: str) -> int:
    for d in json.loads(payload):
        case = _case_from_json(d)
        try:
            row = plan(case)
        except Exception as e:  # noqa: BLE001 - one failed case must not end the others
            row = {"bench": "memory", "variant": case.name, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(row), flush=True)
    return 0


def markdown_table(rows: Sequence[dict]) -> str:
    """The BENCHMARKS.md table: GiB per device."""
    lines = [
        "| model | devices | mesh (data, fsdp, tensor) | rows × T per device | state "
        "| argument | output | temp | **total** | total, XLA attention | saved activations "
        "| floor | fits 139 GiB |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | ERROR {r['error']} |")
            continue
        preset, _, _, seq, rows_mb = r["variant"].split("/")[:5]
        lines.append(
            f"| {preset} | {r['devices']} | {tuple(r['mesh'])} | {rows_mb[1:]} × {seq[1:]} | "
            f"{r['state_GiB']:.1f} | {r['argument_GiB']:.1f} | {r['output_GiB']:.1f} | "
            f"{r['temp_GiB']:.1f} | **{r['total_GiB']:.1f}** | "
            f"{r['total_xla_attention_GiB']:.1f} | {r['saved_activations_GiB']:.1f} | "
            f"{floor_GiB(r):.1f} | {fits_h200(r)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from experiments.bench import suites  # the case lists live with the other suites

    ap = argparse.ArgumentParser(prog="python -m experiments.bench.memory", description=__doc__)
    ap.add_argument("--suite", choices=sorted(suites.MEMORY), default="gpu")
    ap.add_argument("--match", default="", help="comma-separated substrings of case names")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"))
    ap.add_argument("--table", metavar="FILE.jsonl", help="reprint the table of saved rows")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    if args.table:
        if not os.path.isfile(args.table):
            print(f"no such file: {args.table}; pass a memory.jsonl of a run", file=sys.stderr)
            return 2
        print(markdown_table([json.loads(line) for line in open(args.table) if line.strip()]))
        return 0
    wanted = [m for m in args.match.split(",") if m]
    cases = [c for c in suites.MEMORY[args.suite] if not wanted or any(m in c.name for m in wanted)]
    if not cases:
        print(f"no memory case matches --match {args.match!r}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for row in plan_in_subprocesses(cases):
        rows.append(row)
        with open(os.path.join(args.out, "memory.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
