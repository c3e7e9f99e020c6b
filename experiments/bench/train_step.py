"""Pretraining-step benchmark: the project's own step (train/pretrain_step.py), one config a row."""

from __future__ import annotations

import dataclasses
import gc
import math
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from experiments.bench import fake_params, packed_rows, profile
from experiments.bench.timing import (
    compile_timed,
    median,
    process_peak_bytes,
    program_bytes,
    spread,
    time_calls,
)
from model.config import get_preset
from model.transformer import LanguageModel
from train.flops import flops_per_token, mfu
from train.optim import OptimConfig, make_optimizer
from train.pretrain_step import StepConfig, make_pretrain_step
from train.sharding import (
    MeshConfig,
    batch_sharding,
    jit_step,
    make_mesh,
    mesh_context,
)
from train.state import create_train_state


@dataclasses.dataclass(frozen=True)
class TrainVariant:
    preset: str
    seq_len: int
    batch: int
    microbatches: int = 1
    model: tuple[tuple[str, object], ...] = ()  # ModelConfig overrides, e.g. (("remat", "dots"),)
    # (data, fsdp, tensor) over the first data*fsdp*tensor devices; None: data over all devices
    mesh: tuple[int, int, int] | None = None
    rows: str = "synthetic"  # "synthetic": whole rows, no segment ids; "packed": packed_rows

    def __post_init__(self):
        # a misplaced positional argument once made every gpt2 variant's mesh "synthetic"
        if self.mesh is not None and (
            len(self.mesh) != 3 or not all(isinstance(n, int) and n >= 1 for n in self.mesh)
        ):
            raise ValueError(f"mesh must be (data, fsdp, tensor) positive ints, got {self.mesh!r}")
        if self.rows not in ("synthetic", "packed"):
            raise ValueError(f"rows must be 'synthetic' or 'packed', got {self.rows!r}")

    @property
    def name(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.model)
        mb = f"/mb{self.microbatches}" if self.microbatches > 1 else ""
        mesh = "/data{}.fsdp{}.tensor{}".format(*self.mesh) if self.mesh else ""
        packed = "/packed" if self.rows == "packed" else ""
        return f"{self.preset}/T{self.seq_len}/b{self.batch}{mb}{packed}{mesh}" + (
            f"[{extra}]" if extra else ""
        )

    def make_mesh(self) -> Mesh:
        if self.mesh is None:
            return make_mesh(MeshConfig(data=-1))
        n, have = math.prod(self.mesh), len(jax.devices())
        if n > have:
            raise ValueError(f"{self.name} needs {n} devices; this host has {have}")
        return make_mesh(MeshConfig(*self.mesh), jax.devices()[:n])


def synthetic_batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict:
    """Random tokens, every row one full document (segment_ids absent: the fast path)."""
    tokens = jax.random.randint(jax.random.key(seed), (batch, seq_len + 1), 0, vocab, jnp.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": jnp.ones((batch, seq_len), jnp.float32),
    }


def build(v: TrainVariant) -> tuple:
    """(compiled step, state, batch, rng, cfg, compile seconds) on all local devices."""
    max_len = max(v.seq_len, get_preset(v.preset).max_len)
    cfg = get_preset(v.preset, max_len=max_len, **dict(v.model))
    model = LanguageModel(cfg)
    tx = make_optimizer(OptimConfig(total_steps=10_000))  # the schedule does not change the timing
    mesh = v.make_mesh()
    rng = jax.random.key(0)
    tokens = jnp.zeros((1, v.seq_len), jnp.int32)
    init = lambda r: fake_params.replace_values(model.init(r, tokens)["params"])  # noqa: E731
    t0 = time.perf_counter()
    state, shardings = jax.block_until_ready(create_train_state(init, tx, mesh, rng))
    init_s = time.perf_counter() - t0
    step = make_pretrain_step(model, tx, StepConfig(num_microbatches=v.microbatches))
    if v.rows == "packed":
        batch = packed_rows.packed_batch(cfg.vocab_size, v.batch, v.seq_len)
    else:
        batch = synthetic_batch(cfg.vocab_size, v.batch, v.seq_len)
    batch = jax.device_put(batch, batch_sharding(mesh))
    jitted = jit_step(step, shardings, mesh)  # as every stage compiles its step
    with mesh_context(mesh):
        compiled, compile_s = compile_timed(jitted.jitted, state, batch, rng)
    return compiled, state, batch, rng, cfg, compile_s, init_s, mesh


def run(
    v: TrainVariant, peak: float | None, warmup: int, iters: int, profile_dir: str | None = None
) -> dict:
    compiled, state, batch, rng, cfg, compile_s, init_s, mesh = build(v)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch, rng)
        return metrics["loss"]

    times = time_calls(one_step, warmup, iters)
    loss = float(one_step())
    t = median(times)
    tokens_per_s = v.batch * v.seq_len / t
    per_device = tokens_per_s / mesh.size  # MFU, TFLOP/s and memory are per device
    row = {
        "bench": "train",
        "variant": v.name,
        "devices": mesh.size,
        "step_ms": t * 1e3,
        "spread": spread(times),
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": per_device,
        "mfu": mfu(cfg, v.seq_len, per_device, peak) if peak else None,
        "TFLOPs": flops_per_token(cfg, v.seq_len) * per_device / 1e12,
        "mem_GiB": (program_bytes(compiled) or 0) / 2**30,
        "process_peak_GiB": (process_peak_bytes(mesh.devices.flat) or 0) / 2**30,
        "compile_s": compile_s,
        "init_s": init_s,
        "loss": loss,
        "iters": iters,
        **(packed_rows.describe(batch["segment_ids"]) if "segment_ids" in batch else {}),
    }
    if profile_dir:
        row["profile"] = profile.trace(one_step, 3, profile_dir, compiled.as_text())
    holder.clear()
    gc.collect()
    return row
