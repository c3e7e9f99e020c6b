"""Running a kernel on sharded arrays.

XLA cannot split a Pallas custom call across devices: given sharded operands
it would gather them whole onto every device. So a kernel that works row by
row is run under `jax.shard_map` over the active mesh, each device handling its
own rows (and heads), with specs derived from the same logical axis names and
rules as everything else (`train/sharding.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax


def interpret_mode() -> bool:
    """Pallas' Triton backend needs a GPU; elsewhere the kernels are interpreted."""
    return jax.devices()[0].platform != "gpu"


def run_sharded(
    kernel: Callable,
    args: Sequence[jax.Array],
    logical_in: Sequence[tuple[str | None, ...]],
    logical_out: tuple[str | None, ...] | Sequence[tuple[str | None, ...]],
):
    """kernel(*args), per device under the active mesh; directly without one.

    `logical_in` / `logical_out` name each dimension of each argument / output
    with a logical axis (or None: not split).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*args)
    to_spec = lambda axes: nn.logical_to_mesh_axes(axes)  # noqa: E731  (uses the active rules)
    in_specs = tuple(to_spec(axes) for axes in logical_in)
    if logical_out and isinstance(logical_out[0], tuple):
        out_specs = tuple(to_spec(axes) for axes in logical_out)
    else:
        out_specs = to_spec(logical_out)
    # check_vma=False: a pallas_call's outputs carry no record of how they vary over
    # the mesh axes; the specs above already say it.
    return jax.shard_map(
        kernel, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )(*args)
