"""The ahead-of-time memory planner: XLA's per-device bytes follow the shardings, and nothing
is allocated (8 fake CPU devices)."""

import jax
import pytest

from experiments.bench.memory import compile_step, fits_h200, floor_GiB, memory_fields, shard_bytes
from model.config import get_preset
from train.sharding import MeshConfig

BATCH, SEQ = 8, 16  # one row per device
BATCH_BYTES_PER_DEVICE = SEQ * (4 + 4 + 4)  # int32 inputs and targets, float32 weights


def _plan(mesh: MeshConfig):
    cfg = get_preset("tiny", n_layers=1)
    compiled, state = compile_step(cfg, mesh, jax.devices(), BATCH, SEQ, microbatches=1)
    return memory_fields(compiled), state


def test_fsdp_splits_the_state_n_fold_without_allocating():
    live_before = {id(x) for x in jax.live_arrays()}
    replicated, full_state = _plan(MeshConfig(data=8))
    sharded, sharded_state = _plan(MeshConfig(data=1, fsdp=8))
    assert {id(x) for x in jax.live_arrays()} <= live_before  # nothing was allocated

    for fields, state in ((replicated, full_state), (sharded, sharded_state)):
        # XLA's argument buffers are exactly the state's shards plus the batch's (the unused
        # dropout key is pruned), and the donated state is reused for the new one.
        assert fields["argument"] == shard_bytes(state) + BATCH_BYTES_PER_DEVICE
        assert fields["alias"] == shard_bytes(state)

    # Every matrix (parameters and both Adam moments) is split 8 ways over fsdp; the norm
    # gains and counters stay replicated. So fsdp=8 saves exactly 7/8 of the matrices.
    matrices = [x for x in jax.tree.leaves(full_state) if x.ndim >= 2]
    matrix_bytes = sum(x.size * x.dtype.itemsize for x in matrices)
    assert replicated["argument"] - sharded["argument"] == matrix_bytes * 7 // 8
    assert shard_bytes(full_state.params) / shard_bytes(sharded_state.params) > 7.5


def test_floor_counts_the_gradient_and_with_microbatches_the_accumulator():
    row = dict(argument_GiB=75.3, output_GiB=75.3, alias_GiB=75.3, params_GiB=25.1)
    one = {**row, "variant": "llama-7b/n4/data4.fsdp1.tensor1/T4096/b4", "total_GiB": 211.7}
    two = {**one, "variant": one["variant"] + "/mb2"}
    assert floor_GiB(one) == pytest.approx(75.3 + 25.1)
    assert floor_GiB(two) == pytest.approx(75.3 + 2 * 25.1)
    assert fits_h200(two) == "?"  # the CPU plan is over 139 GiB, the floor under it
    assert fits_h200({**two, "total_GiB": 130.0}) == "yes"
    assert fits_h200({**two, "params_GiB": 40.0}) == "no"
