"""Small builders shared by the tests."""

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxpr_as_fun

from model.kernels import flash_attention as fa
from model.transformer import LanguageModel, init_cache
from train import sharding
from train.optim import OptimConfig, make_optimizer
from train.pretrain_step import StepConfig, make_pretrain_step
from train.state import create_train_state, init_fn

# Flash-attention blocks of 16 (Triton's smallest product) and 32, so that short test rows
# span several blocks of each kernel and get padded to whole blocks.
SMALL_FLASH_BLOCKS = fa.Tuning(
    fwd_block_q=32, fwd_block_k=16, dq_block_q=16, dq_block_k=32, dkv_block_q=16, dkv_block_k=16
)


def random_lm_batch(seed: int, batch: int, length: int, vocab: int, packed: bool = True) -> dict:
    """Random tokens; with `packed`, each row holds two documents and some padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length + 1))
    out = {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "weights": np.ones((batch, length), np.float32),
    }
    if packed:
        cut = rng.integers(2, length - 3, batch)
        pad = rng.integers(0, 3, batch)
        idx = np.arange(length)
        segments = np.where(idx < cut[:, None], 1, 2)
        segments = np.where(idx >= length - pad[:, None], 0, segments).astype(np.int32)
        positions = np.where(idx < cut[:, None], idx, idx - cut[:, None]).astype(np.int32)
        out.update(segment_ids=segments, positions=positions)
        out["weights"] = (segments > 0).astype(np.float32)
    return out


def build_training(
    cfg,
    mesh,
    optim=OptimConfig(total_steps=100, warmup_steps=5),
    step_cfg=StepConfig(),
    tx=None,
):
    """(jitted step, state, state shardings) for a LanguageModel on `mesh`."""
    model = LanguageModel(cfg)
    tx = tx or make_optimizer(optim)
    state, shardings = create_train_state(init_fn(model), tx, mesh, jax.random.key(0))
    step = sharding.jit_step(make_pretrain_step(model, tx, step_cfg), shardings, mesh)
    return step, state, shardings


def mesh_of(axes: dict):
    """A mesh with these axis sizes over the first devices it needs; the test is skipped
    where there are fewer (the CPU suite fakes 8 devices, a GPU machine may have one)."""
    need, have = int(np.prod(list(axes.values()))), jax.device_count()
    if need > have:
        pytest.skip(f"the mesh {axes} needs {need} devices, this machine has {have}")
    return sharding.make_mesh(sharding.MeshConfig(**axes), devices=jax.devices()[:need])


def one_pretraining_step(cfg, mesh, batch: dict, z_loss: float = 0.0) -> tuple[float, dict, dict]:
    """(loss, parameters before, parameters after) of one pretraining step of a fresh
    state (key 0) on `mesh`, the parameters copied to the host as float32."""
    with sharding.mesh_context(mesh):
        step, state, _ = build_training(cfg, mesh, step_cfg=StepConfig(z_loss=z_loss))
        before = jax.tree.map(np.float32, state.params)  # the step donates the state
        state, metrics = step(state, batch, jax.random.key(1))
    return float(metrics["loss"]), before, jax.tree.map(np.float32, state.params)


def single_device_mesh():
    return sharding.make_mesh(sharding.MeshConfig(data=1), devices=jax.devices()[:1])


def assert_trees_close(got, want, check_dtype: bool = True, **tol) -> None:
    """Leaf by leaf: same shape (and dtype), values close in float32 (`tol` as numpy's)."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape and (not check_dtype or a.dtype == b.dtype)
        np.testing.assert_allclose(np.float32(a), np.float32(b), **tol)


def lm_value_and_grad(model, tokens):
    """jit(params -> ((mean squared logit, logits), gradients)): a loss that depends on every
    logit, for holding a kernel's model equal to the plain one."""

    def loss(params):
        logits = model.apply({"params": params}, tokens)
        return jax.numpy.mean(logits**2), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


class TritonKernel(NamedTuple):
    name: str
    grid: tuple[int, int, int]
    ttir: bytes


def cached_decoding_logits(model, params, tokens_BL: jax.Array, prefill: int) -> jax.Array:
    """[B, 1 + L - prefill, V]: the last logits of a prefill of `prefill` tokens, then those
    of one-token cached steps over the rest of `tokens_BL`."""
    B, L = tokens_BL.shape
    variables = {"params": params}
    logits, cache = model.apply(
        variables, tokens_BL[:, :prefill], cache=init_cache(model.cfg, B, L)
    )
    steps = [logits[:, -1:]]
    for t in range(prefill, L):
        positions = jnp.full((B, 1), t, jnp.int32)
        logits, cache = model.apply(variables, tokens_BL[:, t : t + 1], positions, cache=cache)
        steps.append(logits)
    return jnp.concatenate(steps, axis=1)


# The GPU that lowering for CUDA targets where there is none: jax 0.11's Pallas lowering asks
# for one ("No supported GPU devices found, please specify an abstract GPU device"), 0.10's
# assumes compute capability 9.0. One device, so no kernel sees a mesh to split over.
_ABSTRACT_GPU = dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


def lower_for_cuda(jitted, *args) -> jax.stages.Lowered:
    """`jitted(*args)` traced and lowered for CUDA, on a machine with or without a GPU."""
    device = jax.sharding.AbstractDevice(**_ABSTRACT_GPU)
    # Auto axes, as the project's meshes have (train/sharding.py): jax 0.11's AbstractMesh
    # defaults to Explicit ones, under which reshapes inside the kernels' wrappers fail.
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), axis_types=auto, abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jitted.trace(*args).lower(lowering_platforms=("cuda",))


def triton_kernels(jitted, *args) -> list[TritonKernel]:
    """Every Triton kernel of `jitted(*args)` lowered for CUDA, without a GPU (Pallas'
    Triton lowering runs on the CPU): what the interpreter accepts but Triton does not
    (tensor shapes, dtypes) fails here rather than on the GPU."""
    module = lower_for_cuda(jitted, *args).compiler_ir("stablehlo")
    kernels = []

    def walk(op):
        op = op.operation
        if op.name == "stablehlo.custom_call" and "triton" in str(
            op.attributes["call_target_name"]
        ):
            config = op.attributes["mhlo.backend_config"]
            grid = tuple(config[f"grid_{a}"].value for a in "xyz")
            kernels.append(TritonKernel(config["name"].value, grid, config["ir"].value_bytes))
        for region in op.regions:
            for block in region:
                for child in block:
                    walk(child)

    walk(module.operation)
    return kernels


def verify_triton_ir(kernels: list[TritonKernel]) -> list[str]:
    """Each kernel's Triton IR passes its dialect's verifier (e.g. power-of-two tensor
    sizes); skipped, not failed, if the JAX internals it needs move. Returns the IRs as
    text, in the kernels' order."""
    try:
        from jax._src.interpreters import mlir
        from jax._src.lib import triton
        from jax._src.lib.mlir import ir
    except ImportError as e:
        pytest.skip(f"Triton dialect bindings not importable: {e}")
    ctx = ir.Context()
    ctx.append_dialect_registry(mlir.upstream_dialects)
    triton.dialect.register_dialect(ctx)
    ctx.load_all_available_dialects()
    texts = []
    for kernel in kernels:
        module = ir.Module.parse(kernel.ttir, context=ctx)
        assert module.operation.verify(), kernel.name
        texts.append(str(module))
    return texts


def pallas_blocks_out_of_bounds(fn, *args) -> list[str]:
    """Every block that a Pallas call in `fn(*args)` (the backward pass's too, if `fn`
    differentiates) reads or writes outside its array, as 'kernel: operand i at grid point g'.

    The interpreter the CPU tests run kernels in clamps a block's start into its array, as
    `dynamic_slice` does, so an index map that points past the end reads the wrong rows on
    the GPU yet passes every CPU test; this finds such maps by evaluating each one at every
    grid point (keep the test's grids small)."""

    def pallas_calls(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                yield eqn
            for param in eqn.params.values():
                for sub in param if isinstance(param, list | tuple) else [param]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from pallas_calls(inner)

    problems = []
    calls = list(pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr))
    assert calls, "no Pallas call to check"
    for eqn in calls:
        mapping = eqn.params["grid_mapping"]
        for i, block in enumerate(mapping.block_mappings):
            sizes = [getattr(b, "block_size", 1) for b in block.block_shape]
            index_map = jaxpr_as_fun(block.index_map_jaxpr)
            for point in itertools.product(*(range(n) for n in mapping.grid)):
                starts = [int(x) * s for x, s in zip(index_map(*point), sizes)]
                dims = block.array_aval.shape
                if any(a < 0 or a + s > d for a, s, d in zip(starts, sizes, dims)):
                    problems.append(f"{eqn.params['name']}: operand {i} at grid point {point}")
    return problems


def write_bpe_tokenizer(directory, special_tokens=("<|endoftext|>",)) -> int:
    """A small byte-level BPE tokenizer.json like GPT-2's in `directory`; returns the id
    of its first special token (GPT-2's eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = (
        "def add(a, b):\n    return a + b\n" * 20 + "the quick brown fox jumps over the lazy dog\n"
    )
    backend.train_from_iterator([text], trainer)
    backend.save(str(directory / "tokenizer.json"))
    return backend.token_to_id(special_tokens[0])
