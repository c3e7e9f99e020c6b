"""The device mesh and the ONE table mapping logical axis names to mesh axes.

Mesh axes:
  data   - pure data parallelism: parameters replicated, batch split.
  fsdp   - data parallelism with parameters and optimizer state split too
           (ZeRO-3 / fully sharded data parallel); the batch is split over it.
  tensor - Megatron-style tensor parallelism: heads, feed-forward width and
           vocabulary split; activations all-reduced inside each block.

The mesh uses `AxisType.Auto`: shardings are given at the jit boundary and as
hints inside the model (`nn.with_logical_constraint`), and XLA's partitioner
places the collectives. That keeps the model code free of mesh details, so
the same code runs on 1 device or a pod.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (or axes, or None for replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("positions", None),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),  # LoRA adapters' rank (train/lora.py): small, kept whole
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {self}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"MeshConfig: axis sizes must be positive or -1, got {self}")
        if -1 in sizes:
            known = math.prod(s for s in sizes if s != -1)
            if n_devices % known:
                raise ValueError(
                    f"MeshConfig {self}: {n_devices} devices are not divisible by {known}"
                )
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ValueError(
                f"MeshConfig {self}: mesh size {math.prod(sizes)} differs from the "
                f"device count {n_devices}"
            )
        return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.shape(len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the data-parallel devices."""
    dp = data_parallel_size(mesh)
    if global_batch_size <= 0:
        raise ValueError(f"the global batch size must be >= 1, got {global_batch_size}")
    if global_batch_size % dp:
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the data-parallel size "
            f"{dp} (mesh axes {BATCH_AXES} = {tuple(mesh.shape[a] for a in BATCH_AXES)})"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data and fsdp; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def sync_processes(name: str) -> None:
    """A barrier across processes (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_global_batch(np_batch: dict, mesh: Mesh) -> dict:
    """Process-local numpy batch -> dict of global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    with jax.transfer_guard_host_to_device("allow"):  # the explicit way in (see train/loop.py)
        return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in np_batch.items()}


def full_to_global(arrays: dict, mesh: Mesh) -> dict:
    """Host arrays that every process holds whole -> global arrays split over the batch axes
    (each device takes its slice)."""
    return {k: _whole_to_global(v, batch_sharding(mesh)) for k, v in arrays.items()}


def host_to_replicated(value: Any, mesh: Mesh) -> jax.Array:
    """A host value that every process holds (e.g. PPO's KL coefficient) -> one array
    replicated over the mesh."""
    return _whole_to_global(value, replicated(mesh))


def _whole_to_global(value: Any, sharding: NamedSharding) -> jax.Array:
    """Each device takes its slice of a host value every process holds whole; an explicit
    copy, allowed where the loop guards a step against implicit ones (train/loop.py)."""
    value = np.asarray(value)
    with jax.transfer_guard_host_to_device("allow"):
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy arrays on every process (gathered across processes)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def logical_to_mesh(logical_specs: Any, mesh: Mesh) -> Any:
    """Tree of logical PartitionSpecs -> tree of NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
    """Fails with the parameter's path if a sharded dimension does not divide evenly."""

    def check(path, leaf, sharding):
        for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
            axes = (axes,) if isinstance(axes, str) else axes or ()
            parts = math.prod(sharding.mesh.shape[a] for a in axes)
            if size % parts:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)} has shape {leaf.shape}: dimension {dim} "
                    f"({size}) is split over mesh axes {axes} of total size {parts}, "
                    "which does not divide it; change the model or the mesh"
                )

    jax.tree_util.tree_map_with_path(check, abstract_tree, shardings)


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[None]:
    """Activates the mesh and the logical axis rules for tracing model code."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield


def jit_sharded(
    fn: Callable,
    mesh: Mesh,
    in_shardings: Any,
    out_shardings: Any,
    donate_argnums: int | tuple[int, ...] = (),
    compiler_options: dict[str, Any] | None = None,
) -> Callable:
    """`jax.jit` with explicit shardings (today's pjit), traced under `mesh_context`;
    `compiler_options`: XLA options for this computation alone.

    Every stage (pretraining, SFT, reward, PPO) compiles its step this way.
    """
    jitted = jax.jit(
        fn,
        in_shardings=in_shardings,
        out_shardings=out_shardings,
        donate_argnums=donate_argnums,
        compiler_options=compiler_options or None,
    )

    def call(*args):
        with mesh_context(mesh):
            return jitted(*args)

    def lower(*args):
        with mesh_context(mesh):
            return jitted.lower(*args)

    call.jitted = jitted
    call.lower = lower  # for compiling ahead (train.launch.CompiledAhead), benchmarks, tests
    return call


def step_compiler_options() -> dict[str, Any]:
    """XLA options for the training steps on a GPU.

    cuBLAS for every matrix product instead of XLA's autotuned Triton GEMM fusions.
    Measured on an H200 with the flag set for the whole process (BENCHMARKS.md, "Speed
    round three", change 18): compile 20-22 -> 13.6 s (gpt2-124m) and 20.7 -> 12.5 s
    (gpt-1.3b), steps as fast or 1% faster, first step 31.3 -> 22.8 s after launch with an
    empty compilation cache. Only the steps: decoding's two-row products ran 1.45x slower
    with cuBLAS.

    No dynamic-slice fusions: with stacked layers (`scan_layers`) XLA wraps the products
    that read one layer's slice of a stacked weight in such a fusion, and those products
    are never autotuned: cuBLAS ran 48 of gpt2-124m's a step with default kernels, 1.0 to
    2.6 ms a step slower (BENCHMARKS.md, "Speed round nineteen", change 78)."""
    if jax.default_backend() != "gpu":
        return {}
    return {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_dynamic_slice_fusion": False}


def jit_step(step_fn: Callable, state_shardings: Any, mesh: Mesh) -> Callable:
    """The one compiled form of every stage's step `(state, batch, rng) -> (state, metrics)`:
    state sharded by the rule table and donated, batch split over the batch axes, key and
    metrics replicated."""
    return jit_sharded(
        step_fn,
        mesh,
        in_shardings=(state_shardings, batch_sharding(mesh), replicated(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=0,
        compiler_options=step_compiler_options(),
    )
