"""AdamW with warmup and decay, global-norm clipping, and a weight-decay mask."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 0  # the decay ends here (0: the stage's train.num_steps); end_lr after
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_lr: float = 3e-5
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    decay_embeddings: bool = False  # whether token/position embeddings get weight decay

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(
                f"OptimConfig.schedule={self.schedule!r} is not cosine/linear/constant"
            )
        for name in ("lr", "end_lr", "b1", "b2", "eps", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                bound = "> 0" if name == "lr" else ">= 0"
                raise ValueError(f"optim.{name} must be a finite number {bound}, got {value}")
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise ValueError(
                f"optim.warmup_steps must be >= 0 and total_steps > 0, got {self.warmup_steps} "
                f"and {self.total_steps}"
            )
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"optim.warmup_steps={self.warmup_steps} is more than the {self.total_steps} "
                "steps of the schedule; lower it or raise train.num_steps"
            )


def optim_config(optim: dict, num_steps: int) -> OptimConfig:
    """A stage's OptimConfig, its schedule as long as the stage unless set explicitly."""
    fields = dict(optim)
    fields["total_steps"] = fields.get("total_steps") or num_steps
    return OptimConfig(**fields)


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup to lr, then cosine or linear decay to end_lr.

    Step s uses the rate of s + 1, so the first update is lr / warmup_steps
    rather than a wasted step at rate 0.
    """
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr / cfg.lr)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, cfg.end_lr, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    schedule = optax.join_schedules([warmup, decay], [cfg.warmup_steps])
    return lambda step: schedule(step + 1)


_NO_DECAY_NAMES = ("scale", "bias")  # norm gains and biases
_EMBEDDING_NAMES = ("embedding", "position_embedding")


def weight_decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """True for parameters that get weight decay: matrices, not norms or biases.

    Decided by name, not rank, because scanned layers add a leading axis.
    """

    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in _NO_DECAY_NAMES or name.endswith("_bias"):
            return False
        return decay_embeddings or name not in _EMBEDDING_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all of `tree`'s elements together, in float32. `optax.global_norm`
    also serves complex leaves (squares of the real and imaginary parts), three more
    operations per leaf to trace and compile, for every parameter of a real model."""
    squares = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares, jnp.float32(0)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (same empty state) with `global_norm`, the scale applied
    as one product per leaf: updates * min(1, max_norm / norm)."""

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        scale = jnp.where(norm < max_norm, jnp.float32(1), max_norm / norm)
        return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def all_finite(tree: Any) -> jax.Array:
    """Whether every element of `tree` is finite: one sum per leaf, which any inf or NaN
    makes non-finite (a sum of finite float32 values would overflow only past 3e38)."""
    sums = [jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(tree)]
    return jnp.isfinite(sum(sums, jnp.float32(0)))


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    clip = clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm else optax.identity()
    adamw = optax.adamw(
        learning_rate_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda p: weight_decay_mask(p, cfg.decay_embeddings),
    )
    return optax.chain(clip, adamw)
