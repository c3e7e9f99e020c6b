"""What every kernel shares: running on sharded arrays, interpret mode off the GPU, the
SM count, and the tensor-core product.

XLA cannot split a Pallas custom call across devices: given sharded operands
it would gather them whole onto every device. So a kernel that works row by
row is run under `jax.shard_map` over the active mesh, each device handling its
own rows (and heads), with specs derived from the same logical axis names and
rules as everything else (`train/sharding.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu


def interpret_mode() -> bool:
    """Pallas' Triton backend needs a GPU; elsewhere the kernels are interpreted."""
    return jax.devices()[0].platform != "gpu"


def on_hopper() -> bool:
    """Whether the local accelerator is a Hopper GPU (compute capability 9.x), the one the
    Mosaic GPU kernels are written for."""
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    return device.platform == "gpu" and capability.startswith("9.")


def active_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh kernels split over: None without one or with a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def num_sms() -> int:
    """Streaming multiprocessors of the local GPU; an H100 SXM's 132 when lowering off it."""
    device = jax.devices()[0]
    return getattr(device, "core_count", 132) if device.platform == "gpu" else 132


def fit_logical(shape: Sequence[int], logical: Sequence[str | None]) -> tuple[str | None, ...]:
    """`logical` with the names whose mesh split does not divide their dimension
    replaced by None (not split): shard_map needs even splits, and e.g. a
    one-sequence decoding batch cannot be split over the data axes."""
    mesh = active_mesh()
    if mesh is None:
        return tuple(logical)
    fitted = []
    for size, name in zip(shape, logical):
        axes = nn.logical_to_mesh_axes((name,))[0] if name is not None else None
        axes = (axes,) if isinstance(axes, str) else axes or ()
        fitted.append(name if size % math.prod(mesh.shape[a] for a in axes) == 0 else None)
    return tuple(fitted)


def row_logical(shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical names of the leading (row) dimensions of an [..., D] array: batch, then
    length, fitted to the mesh (`fit_logical`)."""
    names = ("batch", "length") + (None,) * len(shape)
    return fit_logical(shape[:-1], names[: len(shape) - 1])


def run_sharded(
    kernel: Callable,
    args: Sequence[jax.Array],
    logical_in: Sequence[tuple[str | None, ...]],
    logical_out: tuple[str | None, ...] | Sequence[tuple[str | None, ...]],
) -> Any:
    """kernel(*args), per device under the active mesh; directly without one.

    `logical_in` / `logical_out` name each dimension of each argument / output
    with a logical axis (or None: not split).
    """
    mesh = active_mesh()
    if mesh is None:
        return kernel(*args)
    to_spec = lambda axes: nn.logical_to_mesh_axes(axes)  # noqa: E731  (uses the active rules)
    in_specs = tuple(to_spec(axes) for axes in logical_in)
    if logical_out and isinstance(logical_out[0], tuple):
        out_specs = tuple(to_spec(axes) for axes in logical_out)
    else:
        out_specs = to_spec(logical_out)
    # check_vma=False: pallas_call cannot infer how its outputs vary over the
    # mesh axes (it would need that spelled out on every out_shape, differently
    # across JAX versions); the out specs given here say it instead. Kernels
    # are differentiated by their own custom_vjp outside this shard_map, never
    # by transposing it.
    return jax.shard_map(
        kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )(*args)


def dot(a: jax.Array, b: jax.Array, trans_b: bool = False) -> jax.Array:
    """a @ b (or a @ b^T) on the tensor cores inside a kernel, float32 accumulation; float32
    inputs get float32 products (TF32 would round them to 10 mantissa bits)."""
    return plgpu.dot(a, b, trans_b=trans_b, allow_tf32=a.dtype != jnp.float32)
