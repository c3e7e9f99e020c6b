"""LoRA (Hu et al. 2021): fine-tune low-rank adapters beside a frozen base model.

Every targeted kernel W (input dims I, output dims O, after a leading layer axis when the
layers are scanned) gets two adapters,
    A [I, r]  random, std 1/sqrt(fan_in)        B [r, O]  zeros,
and the model runs on  W + (alpha / r) * A @ B,  so at the start it IS the base model.

A LoRA stage's params are {"frozen": base params, "lora": adapters}: train/state.py and
train/gradients.py give the FROZEN entry no gradient, no optimizer state and no update, so the
optimizer holds the adapters' moments only. The adapters carry logical axis names, A W's input
axes + "lora_rank" and B "lora_rank" + W's output axes, so the one rule table
(train/sharding.py) shards each like its kernel.

`LoraModel` wraps the language model and merges in its `apply`, so every step, evaluation and
sampler runs unchanged on it. Checkpoints hold both parts; `train.saved_model.load_model` returns
the merged params, so sampling, the next stage and the HF export see an ordinary model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import Mesh

from model.config import ModelConfig
from train import sharding
from train.state import FROZEN, init_fn, param_shardings

ADAPTERS = "lora"  # the params entry beside FROZEN
RANK_AXIS = "lora_rank"  # the adapters' logical axis; replicated by the rule table
STAGES = ("sft", "dpo", "grpo")  # the stages that train a language model alone

# kernel name -> (the module it lives in, its number of leading input dims)
KERNELS = {
    "query": ("attn", 1),
    "key": ("attn", 1),
    "value": ("attn", 1),
    "out": ("attn", 2),  # [heads, head_dim, embed]
    "gate": ("mlp", 1),
    "up": ("mlp", 1),
    "down": ("mlp", 1),
}
GROUPS = {"attention": ("query", "key", "value", "out"), "mlp": ("gate", "up", "down")}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """A stage's `lora` section. rank 0: off, the stage trains every parameter."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: str = "attention,mlp"  # groups (attention, mlp) or kernel names, comma-separated

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"lora.rank must be an integer >= 0 (0: off), got {self.rank!r}")
        alpha_ok = isinstance(self.alpha, int | float) and math.isfinite(self.alpha)
        if not alpha_ok or self.alpha <= 0:
            raise ValueError(f"lora.alpha must be a finite number > 0, got {self.alpha!r}")
        words = _words(self.targets)
        unknown = [w for w in words if w not in GROUPS and w not in KERNELS]
        if not words or unknown:
            known = ", ".join([*GROUPS, *KERNELS])
            raise ValueError(
                f"lora.targets={self.targets!r} names unknown targets {unknown}; choose from "
                f"{known}"
            )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def kernel_names(self) -> frozenset[str]:
        return frozenset(k for w in _words(self.targets) for k in GROUPS.get(w, (w,)))


def _words(targets: str) -> list[str]:
    return [w.strip() for w in str(targets).split(",") if w.strip()]


def config_of(section: Any) -> LoraConfig:
    """The LoraConfig of a stage section (off when the section has no `lora`)."""
    if "lora" not in section:
        return LoraConfig()
    fields = dict(section["lora"].items())
    known = [f.name for f in dataclasses.fields(LoraConfig)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"lora has unknown fields {unknown}; it has {', '.join(known)}")
    return LoraConfig(**fields)


def _targeted(path: tuple[str, ...], cfg: LoraConfig) -> bool:
    name = path[-1]
    return name in cfg.kernel_names and len(path) > 1 and path[-2] == KERNELS[name][0]


def init_adapters(base: Any, cfg: LoraConfig, rng: jax.Array) -> dict:
    """Boxed adapters {kernel path: {"a": A, "b": B}} for the boxed (logically named) `base`."""
    flat = traverse_util.flatten_dict(base)
    paths = sorted(p for p in flat if _targeted(p, cfg))
    if not paths:
        raise ValueError(f"lora.targets={cfg.targets!r} matches no kernel of this model")
    adapters = {}
    for path, key in zip(paths, jax.random.split(rng, len(paths))):
        w: nn.LogicallyPartitioned = flat[path]
        lead = 1 if w.names[0] == "layers" else 0  # scanned layers: stacked on axis 0
        split = lead + KERNELS[path[-1]][1]  # W's dims: [layers | input dims | output dims]
        a_shape = (*w.value.shape[:split], cfg.rank)
        fan_in = math.prod(w.value.shape[lead:split])
        a = jax.random.normal(key, a_shape, jnp.float32) * fan_in**-0.5
        b = jnp.zeros((*w.value.shape[:lead], cfg.rank, *w.value.shape[split:]), w.value.dtype)
        adapters[path + ("a",)] = nn.LogicallyPartitioned(
            a.astype(w.value.dtype), (*w.names[:split], RANK_AXIS)
        )
        adapters[path + ("b",)] = nn.LogicallyPartitioned(
            b, (*w.names[:lead], RANK_AXIS, *w.names[split:])
        )
    return traverse_util.unflatten_dict(adapters)


def merge(base: Any, adapters: Any, cfg: LoraConfig) -> Any:
    """`base` with W + scale * A @ B in every adapted kernel (pure; the base gets no gradient)."""
    base = jax.lax.stop_gradient(base)
    flat = traverse_util.flatten_dict(base)
    for path, pair in traverse_util.flatten_dict(adapters, is_leaf=_is_pair).items():
        w, a, b = flat[path], pair["a"], pair["b"]
        lead = a.ndim - 1 - KERNELS[path[-1]][1]
        a_LIR = a.reshape(*a.shape[:lead], -1, cfg.rank).astype(jnp.float32)
        b_LRO = b.reshape(*b.shape[:lead], cfg.rank, -1).astype(jnp.float32)
        delta = jnp.matmul(a_LIR, b_LRO).reshape(w.shape)
        flat[path] = (w.astype(jnp.float32) + cfg.scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def _is_pair(_, x) -> bool:
    return isinstance(x, dict) and set(x) == {"a", "b"}


@dataclasses.dataclass(frozen=True)
class LoraModel:
    """`base` (a LanguageModel) with adapters: init gives {FROZEN: base, "lora": adapters}
    boxed params, apply runs the base on the merged weights. Anything that calls
    `model.init` / `model.apply` (steps, evaluation, samplers, state helpers) takes it as is."""

    base: nn.Module
    lora: LoraConfig

    @property
    def cfg(self) -> ModelConfig:
        return self.base.cfg

    def init(self, rng: jax.Array, *args, **kwargs) -> dict:
        variables = self.base.init(rng, *args, **kwargs)
        base = variables["params"]
        adapters = init_adapters(base, self.lora, jax.random.fold_in(rng, 1))
        return {**variables, "params": {FROZEN: base, ADAPTERS: adapters}}

    def apply(self, variables: dict, *args, **kwargs) -> Any:
        merged = self.merged(variables["params"])
        return self.base.apply({**variables, "params": merged}, *args, **kwargs)

    def merged(self, params: dict) -> Any:
        return merge(params[FROZEN], params[ADAPTERS], self.lora)

    def inference_form(self, params: dict, transposed: bool = False) -> tuple[nn.Module, Any]:
        """The base model's decoding form of the merged params: a sampler merges once, not
        at every decoded token."""
        return self.base.inference_form(self.merged(params), transposed)


def with_fresh_adapters(model: LoraModel, base_params: Any, mesh: Mesh, rng: jax.Array) -> dict:
    """{FROZEN: base_params, "lora": new adapters placed by the rule table}."""
    init = init_fn(model)
    shardings = param_shardings(init, mesh)[ADAPTERS]
    with sharding.mesh_context(mesh):
        # Only the adapters are outputs: XLA drops the base's (unused) initialisation.
        adapters = jax.jit(lambda r: nn.unbox(init(r))[ADAPTERS], out_shardings=shardings)(rng)
    return {FROZEN: base_params, ADAPTERS: adapters}


def merged_params(params: dict, cfg: LoraConfig, base_shardings: Any) -> Any:
    """The ordinary params of a LoRA checkpoint's {FROZEN, "lora"}, placed as `base_shardings`."""
    return jax.jit(lambda p: merge(p[FROZEN], p[ADAPTERS], cfg), out_shardings=base_shardings)(
        params
    )
