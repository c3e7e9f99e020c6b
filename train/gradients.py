"""Gradient accumulation over microbatches and the optimizer update, shared by every stage.

A stage supplies `loss_sums(params, microbatch, rng) -> (loss_sum, sums)`
where `sums` is a dict of additive statistics that includes "weight_sum".
Gradients of the summed loss are accumulated over microbatches in a
`lax.scan` and divided once by the total weight, so k microbatches give the
same update as one pass over the whole batch.

A params tree's FROZEN entry (train/state.py; LoRA's base model) is only read: the
gradients, the optimizer and its update cover the trainable rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from train.optim import all_finite, global_norm
from train.state import TrainState, split_frozen, with_frozen

LossSums = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def split_microbatches(batch: dict, num_microbatches: int) -> dict:
    """[B, ...] -> [k, B/k, ...], taking every k-th row so each device's rows
    spread over all microbatches (no resharding of a batch split by rows)."""

    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"batch size {x.shape[0]} is not divisible by num_microbatches={num_microbatches}"
            )
        x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(
    loss_sums: LossSums, params: Any, batch: dict, rng: jax.Array, num_microbatches: int
) -> tuple[Any, dict[str, jax.Array]]:
    """Returns (gradient of the weight-normalised loss w.r.t. the trainable params, summed
    statistics)."""
    frozen, params = split_frozen(params)
    # The frozen part is a constant of the differentiated function: no gradient is computed.
    grad_fn = jax.grad(lambda p, b, r: loss_sums(with_frozen(frozen, p), b, r), has_aux=True)

    if num_microbatches == 1:
        grads, sums = grad_fn(params, batch, rng)
    else:
        micro = split_microbatches(batch, num_microbatches)

        def body(carry, xs):
            grads_acc, sums_acc = carry
            index, microbatch = xs
            grads, sums = grad_fn(params, microbatch, jax.random.fold_in(rng, index))
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            sums_acc = jax.tree.map(jnp.add, sums_acc, sums)
            return (grads_acc, sums_acc), None

        zeros_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        # the statistics' shapes from the loss alone: tracing its gradient too would cost
        # a second trace of the backward pass
        first = jax.tree.map(lambda x: x[0], micro)
        abstract_sums = jax.eval_shape(
            lambda: loss_sums(with_frozen(frozen, params), first, rng)[1]
        )
        zeros_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_sums)
        (grads, sums), _ = jax.lax.scan(
            body, (zeros_grads, zeros_sums), (jnp.arange(num_microbatches), micro)
        )
    denominator = jnp.maximum(sums["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, params)
    return grads, sums


def select_leaves(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` if `ok` else `old`, leaf by leaf: each select fuses into the pass that computes
    its new leaf, with no wait on the device."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def select_branch(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` if `ok` else `old` as one conditional."""
    return jax.lax.cond(ok, lambda: new, lambda: old)


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` if the scalar `ok` else `old`, for whole trees (the params and optimizer state).

    On a GPU or TPU the selection is made leaf by leaf (`select_leaves`): a conditional
    would make the host wait for `ok` in every step. XLA's CPU compiler, though, copies
    the scalar `ok` and everything it is computed from (a sum per parameter) into every
    leaf's select, so compile time grew with the square of the parameter count (the update
    of gpt2-124m's 196 arrays, dimensions shrunk: 42 s against 2 s without the check);
    there the selection is one conditional (`select_branch`), and it compiles in 3 s.
    """
    return jax.lax.platform_dependent(ok, new, old, cpu=select_branch, default=select_leaves)


def apply_gradients(
    state: TrainState, grads: Any, tx: optax.GradientTransformation, loss: jax.Array | None = None
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update, skipped when the loss, the gradients or the update itself are
    not finite (a NaN learning rate makes a finite gradient's update NaN).

    A skipped update leaves params and optimizer state untouched (the step counter still
    advances, so data and RNG stay aligned); the metrics `nonfinite_loss`,
    `nonfinite_grad` and `nonfinite_update` say which quantity was bad, and the training
    loop decides whether to stop or to count and carry on.
    """
    frozen, trainable = split_frozen(state.params)
    grad_norm = global_norm(grads)
    loss_ok = jnp.isfinite(loss) if loss is not None else jnp.bool_(True)
    grad_ok = jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    update_ok = all_finite(updates)
    params = optax.apply_updates(trainable, updates)
    ok = loss_ok & grad_ok & update_ok
    params, opt_state = keep_if(ok, (params, opt_state), (trainable, state.opt_state))
    new_state = state.replace(
        step=state.step + 1, params=with_frozen(frozen, params), opt_state=opt_state
    )
    return new_state, {
        "grad_norm": grad_norm,
        "nonfinite_loss": (~loss_ok).astype(jnp.float32),
        "nonfinite_grad": (~grad_ok).astype(jnp.float32),
        "nonfinite_update": (~update_ok & loss_ok & grad_ok).astype(jnp.float32),
    }


def minibatch_epochs(
    update: Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]],
    epochs: int,
    num_minibatches: int,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """The step of the on-policy RL stages (PPO, GRPO): `epochs` passes over a rollout batch,
    each a `lax.scan` of `num_minibatches` calls `update(state, minibatch, rng)` over rows
    shuffled anew every epoch. Returns `step(state, batch, rng)`; metrics are means over
    all the updates."""

    def minibatch(state, mb_and_rng):
        mb, rng = mb_and_rng
        # Keep each minibatch split over the batch axes after the shuffle.
        mb = jax.tree.map(
            lambda x: nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1)), mb
        )
        return update(state, mb, rng)

    def step(state: TrainState, batch: dict, rng: jax.Array):
        B = jax.tree.leaves(batch)[0].shape[0]
        M = num_minibatches
        if B % M:
            raise ValueError(f"rollout batch {B} is not divisible by num_minibatches={M}")
        rng = jax.random.fold_in(rng, state.step)

        def one_epoch(state, epoch_rng):
            perm_rng, step_rng = jax.random.split(epoch_rng)
            perm = jax.random.permutation(perm_rng, B)
            mbs = jax.tree.map(lambda x: x[perm].reshape(M, B // M, *x.shape[1:]), batch)
            return jax.lax.scan(minibatch, state, (mbs, jax.random.split(step_rng, M)))

        state, metrics = jax.lax.scan(one_epoch, state, jax.random.split(rng, epochs))
        return state, jax.tree.map(jnp.mean, metrics)

    return step
