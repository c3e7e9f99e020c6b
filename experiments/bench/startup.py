"""Where the time from launch to the first training step goes, phase by phase.

    PYTHONPATH=. python -m experiments.bench.startup --config=experiments/configs/gpt2_124m.py \
        --data_dir=DIR [--cache=DIR] [--init_only] [--profile_compile=DIR]

The same calls as `train.pretrain.build` and the loop's first step, each phase timed on
its own (device work waited for): imports, data (prepared data opened, eval batches put
on the device), state init (trace + lower, compile, run), step (lower, compile, run).
`--profile_compile` also records where the init's and the step's XLA compiles spend their
time (the HLO passes, LLVM, ptxas: `profile.host_spans`). Prints one JSON line. The
environment picks the variants compared in BENCHMARKS.md ("Speed round two"), e.g.
JAX_DEFAULT_PRNG_IMPL=rbg.
"""

from __future__ import annotations

import contextlib
import json
import time

from train.launch import seconds_since_launch

IMPORTS_BEGAN = seconds_since_launch()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments.bench import profile  # noqa: E402
from model.transformer import LanguageModel  # noqa: E402
from train import launch, sharding  # noqa: E402
from train.data_source import build_data  # noqa: E402
from train.optim import make_optimizer, optim_config  # noqa: E402
from train.pretrain import model_config  # noqa: E402
from train.pretrain_step import StepConfig, make_pretrain_step  # noqa: E402
from train.state import (  # noqa: E402
    _init_state,
    fast_rng_compile,
    init_fn,
    state_shardings,
)

config_flags.DEFINE_config_file("config", None, "experiment config")
flags.DEFINE_string("data_dir", "", "prepared data (data.prepare); '' prepares into /tmp")
flags.DEFINE_string("cache", "", "persistent compilation cache folder; '' none")
flags.DEFINE_bool("init_only", False, "stop after the state init")
flags.DEFINE_string("profile_compile", "", "folder: profile the init and step compiles")
flags.DEFINE_bool("kernel_rng", True, "init as create_train_state does (fast_rng_compile)")
FLAGS = flags.FLAGS


def main(_: list[str]) -> None:
    times = {"python_and_imports_s": seconds_since_launch()}
    if FLAGS.cache:
        launch.enable_compilation_cache(FLAGS.cache)
    config = FLAGS.config
    config.data.dir = FLAGS.data_dir or "/tmp/startup_bench_data"
    tc = config.train

    def phase(name, fn):
        began = time.perf_counter()
        out = jax.block_until_ready(fn())
        times[name] = round(time.perf_counter() - began, 3)
        return out

    def compile_phase(name, lowered):
        if not FLAGS.profile_compile:
            return phase(f"{name}_compile_s", lowered.compile)
        compiled, spans = profile.host_spans(lowered.compile, f"{FLAGS.profile_compile}/{name}")
        times[f"{name}_compile_s"], times[f"{name}_compile_spans"] = spans.get("seconds"), spans
        return compiled

    mesh = phase("backend_and_mesh_s", lambda: sharding.make_mesh(sharding.MeshConfig()))
    data = phase("data_s", lambda: build_data(config, "/tmp/startup_bench", mesh))
    cfg = model_config(config.model, data.tokenizer.vocab_size)
    model = LanguageModel(cfg)
    tx = make_optimizer(optim_config(config.optim, tc.num_steps))
    key = jax.random.key(tc.seed)
    init = init_fn(model)
    shardings = phase("init_shapes_s", lambda: state_shardings(init, tx, mesh, key))
    rng_lowering = fast_rng_compile() if FLAGS.kernel_rng else contextlib.nullcontext()
    with sharding.mesh_context(mesh), rng_lowering:
        jitted = jax.jit(_init_state(init, tx), out_shardings=shardings)
        lowered = phase("init_lower_s", lambda: jitted.lower(key))
        compiled = compile_phase("init", lowered)
        state = phase("init_run_s", lambda: compiled(key))
    if not FLAGS.init_only:
        step = sharding.jit_step(
            make_pretrain_step(model, tx, StepConfig(tc.num_microbatches, tc.z_loss)),
            shardings,
            mesh,
        )
        batch = phase("first_batch_s", data.next_train_batch)
        rng = jax.random.key(0)
        with sharding.mesh_context(mesh):
            lowered = phase("step_lower_s", lambda: step.jitted.lower(state, batch, rng))
            compiled = compile_phase("step", lowered)
            phase("step_run_s", lambda: compiled(state, batch, rng))
    times["total_s"] = round(seconds_since_launch(), 3)
    row = {
        "bench": "startup",
        "prng": str(jax.config.jax_default_prng_impl),
        "kernel_rng": FLAGS.kernel_rng,
        "threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
        "cache": bool(FLAGS.cache),
        "device": jax.devices()[0].device_kind,
        "imports_began_s": round(IMPORTS_BEGAN, 3),
        **times,
    }
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    app.run(main)
