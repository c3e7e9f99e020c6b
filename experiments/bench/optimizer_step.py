"""The optimizer update alone: `train.gradients.apply_gradients` (clipping, AdamW, the
non-finite checks and the skip) on a preset's full parameter tree, against its memory
floor: reading params, grads and both moments and writing params and moments once,
7 float32 passes (28 bytes a parameter); and, beside it, optax's clipped AdamW with no
checks and no skip, to show what the checks cost.

python -m experiments.bench.optimizer_step [--preset gpt-1.3b] [--iters 10]
(prints two JSON rows, with and without the checks: ms per update, and the bytes a
parameter would move in that time at the copy rate given)
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax

from experiments.bench import fake_params
from experiments.bench.timing import median, time_calls
from model.config import get_preset
from model.transformer import LanguageModel
from train.gradients import apply_gradients
from train.optim import OptimConfig, make_optimizer
from train.state import TrainState, count_params, init_fn, strip_axis_names

FLOOR_BYTES_PER_PARAM = 28


def _plain(state: TrainState, grads, tx):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state), {"grad_norm": jnp.float32(0)}


def measure(
    preset: str,
    iters: int = 10,
    copy_GBps: float | None = None,
    checks: bool = True,
    scan_layers: bool = False,
) -> dict:
    cfg = get_preset(preset, scan_layers=scan_layers)
    model = LanguageModel(cfg)
    tx = make_optimizer(OptimConfig(total_steps=10_000))

    @jax.jit
    def init():
        params = strip_axis_names(fake_params.replace_values(init_fn(model)(jax.random.key(0))))
        grads = jax.tree.map(lambda p: p * 1e-3, params)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), grads

    state, grads = init()
    n = count_params(state.params)
    if checks:
        fn = lambda s, g: apply_gradients(s, g, tx, jnp.float32(1.0))  # noqa: E731
    else:
        fn = lambda s, g: _plain(s, g, tx)  # noqa: E731
    update = jax.jit(fn, donate_argnums=0)
    holder = {"state": state}

    def call():
        holder["state"], metrics = update(holder["state"], grads)
        return metrics["grad_norm"]

    t = median(time_calls(call, 3, iters))
    row = {
        "bench": "optimizer",
        "variant": preset
        + ("/scan_layers" if scan_layers else "")
        + ("" if checks else "/no_checks"),
        "params": n,
        "update_ms": t * 1e3,
        "floor_ms_at_copy_rate": None,
        "bytes_per_param_at_copy_rate": None,
    }
    if copy_GBps:
        row["floor_ms_at_copy_rate"] = FLOOR_BYTES_PER_PARAM * n / (copy_GBps * 1e9) * 1e3
        row["bytes_per_param_at_copy_rate"] = t * copy_GBps * 1e9 / n
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench.optimizer_step")
    ap.add_argument("--preset", default="gpt-1.3b")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--copy_GBps", type=float, default=None, help="the measured copy rate")
    ap.add_argument(
        "--scan_layers", action="store_true", help="layers stacked: fewer, larger leaves"
    )
    args = ap.parse_args(argv)
    for checks in (True, False):
        row = measure(args.preset, args.iters, args.copy_GBps, checks, args.scan_layers)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
