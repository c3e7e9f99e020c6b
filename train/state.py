"""Train state created directly sharded over the mesh.

The parameters and optimizer state are produced by a jitted init whose
output shardings come from the logical axis names, so the full model never
exists on one device or on the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from train import sharding

# A params entry that is never trained: no gradient, no optimizer state, no update (LoRA's
# base model, train/lora.py). Every other entry is trainable.
FROZEN = "frozen"


def split_frozen(params: Any) -> tuple[Any, Any]:
    """(the FROZEN entry or None, the trainable rest) of a params tree."""
    if isinstance(params, Mapping) and FROZEN in params:
        return params[FROZEN], {k: v for k, v in params.items() if k != FROZEN}
    return None, params


def with_frozen(frozen: Any, trainable: Any) -> Any:
    """The inverse of `split_frozen`."""
    return trainable if frozen is None else {FROZEN: frozen, **trainable}


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of optimizer updates applied
    params: Any
    opt_state: Any


def strip_axis_names(boxed: Any) -> Any:
    """The plain arrays inside logically partitioned boxes (no sharding constraint)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda x: x.value if is_box(x) else x, boxed, is_leaf=is_box)


def state_logical_specs(abstract_boxed_params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Logical PartitionSpecs for every leaf of the train state.

    Optimizer moments take their parameter's spec; scalars (counts) are replicated.
    """
    param_specs = nn.get_partition_spec(abstract_boxed_params)
    abstract_params = strip_axis_names(abstract_boxed_params)
    abstract_opt = jax.eval_shape(tx.init, split_frozen(abstract_params)[1])
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    opt_specs = optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        abstract_opt,
        split_frozen(param_specs)[1],
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=is_spec,
    )
    return TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs)


def _init_state(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation):
    def init(rng):
        params = nn.unbox(init_params(rng))
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(split_frozen(params)[1]))

    return init


def state_shardings(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
) -> TrainState:
    """NamedShardings of every train-state leaf (nothing allocated); checks they divide evenly."""
    with sharding.mesh_context(mesh):
        abstract_boxed = jax.eval_shape(init_params, rng)
    shardings = sharding.logical_to_mesh(state_logical_specs(abstract_boxed, tx), mesh)
    sharding.check_divisible(strip_axis_names(abstract_boxed), shardings.params)
    return shardings


@contextlib.contextmanager
def fast_rng_compile(enabled: bool = True) -> Iterator[None]:
    """Threefry lowered to one GPU kernel (JAX's jax_threefry_gpu_kernel_lowering) while
    a state init is traced and compiled. The default GPU lowering unrolls threefry's 20
    rounds into every random tensor's fusion, and each of those compiles for about
    0.75 s on an H200: most of gpt2-124m's ~60 s init (BENCHMARKS.md, "Speed round two").
    The bits are the same (the same function), so the parameters are too; the kernel
    costs some memory for broadcast keys while it runs. No effect off the GPU.
    `enabled=False` leaves the lowering alone: callers pass it for sharded inits, since
    the kernel is a custom call that XLA's partitioner would run whole on every device."""
    name = "jax_threefry_gpu_kernel_lowering"
    previous = getattr(jax.config, name)
    jax.config.update(name, enabled or previous)
    try:
        yield
    finally:
        jax.config.update(name, previous)


def create_train_state(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
    shardings: TrainState | None = None,
) -> tuple[TrainState, TrainState]:
    """Returns (state, state_shardings), the state created sharded by jit.

    `init_params(rng)` returns the boxed (logically annotated) parameters,
    e.g. `lambda r: model.init(r, tokens)["params"]`; `shardings`, when known already
    (`abstract_train_state`), saves working them out again.
    """
    if shardings is None:
        shardings = state_shardings(init_params, tx, mesh, rng)
    with sharding.mesh_context(mesh), fast_rng_compile(enabled=mesh.size == 1):
        state = jax.jit(_init_state(init_params, tx), out_shardings=shardings)(rng)
    return state, shardings


def abstract_train_state(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
) -> tuple[TrainState, TrainState]:
    """(state, state_shardings) like `create_train_state`, the state as ShapeDtypeStructs
    carrying their shardings: enough to lower and compile a step without allocating it."""
    shardings = state_shardings(init_params, tx, mesh, rng)
    with sharding.mesh_context(mesh):
        shapes = jax.eval_shape(_init_state(init_params, tx), rng)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return abstract, shardings


def param_shardings(init_params: Callable[[jax.Array], Any], mesh: Mesh) -> Any:
    """NamedShardings for the parameters `init_params` would create (nothing allocated)."""
    with sharding.mesh_context(mesh):
        abstract_boxed = jax.eval_shape(init_params, jax.random.key(0))
    return sharding.logical_to_mesh(nn.get_partition_spec(abstract_boxed), mesh)


def init_fn(model: nn.Module) -> Callable[[jax.Array], Any]:
    """`rng -> boxed params` of `model`: the one model init every stage uses. The example
    input is made inside the call, so importing this touches no JAX backend."""
    return lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]


def abstract_params(model: nn.Module, mesh: Mesh) -> Any:
    """ShapeDtypeStructs, with the rule table's shardings, of `model`'s parameters."""
    init = init_fn(model)
    shardings = param_shardings(init, mesh)
    with sharding.mesh_context(mesh):
        shapes = strip_axis_names(jax.eval_shape(init, jax.random.key(0)))
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def copy_to(tree: Any, shardings: Any) -> Any:
    """A copy of `tree` placed by `shardings`: the steps donate their state, so a state must
    never share buffers with params used later (a frozen reference, say)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def state_with_params(
    init_params: Callable[[jax.Array], Any],
    params: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[TrainState, TrainState]:
    """(state, shardings) holding copies of `params` and a fresh optimizer state (Adam's
    initial moments do not depend on the parameter values)."""
    state, shardings = create_train_state(init_params, tx, mesh, jax.random.key(0))
    return state.replace(params=copy_to(params, shardings.params)), shardings


def count_params(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
