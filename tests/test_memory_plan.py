"""The ahead-of-time memory planner: XLA's per-device bytes follow the shardings, and nothing
is allocated (8 fake CPU devices)."""

import jax

from experiments.bench.memory import compile_step, memory_fields, shard_bytes
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
