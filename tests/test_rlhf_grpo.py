"""GRPO: the math against direct numpy formulas, prepare, and the step against autodiff."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf import grpo
from rlhf.grpo import GRPOConfig
from tests.rlhf_helpers import TINY, init_lm
from train.state import TrainState


def _response_mask(rng, N, T):
    """Rows of prompt (0) | response (1) | padding (0)."""
    start = rng.integers(1, T // 2, N)
    end = np.minimum(start + rng.integers(1, T // 2, N), T)
    t = np.arange(T)
    return ((t >= start[:, None]) & (t < end[:, None])).astype(np.float32)


# --------------------------------------------------------------------------- math


@pytest.mark.parametrize("std_normalize", [True, False])
def test_group_advantages_match_numpy(std_normalize):
    G = 4
    rewards = np.random.default_rng(0).normal(size=3 * G).astype(np.float32)
    rewards[G : 2 * G] = 0.7  # a group whose rewards are all equal
    got = np.asarray(grpo.group_advantages(jnp.asarray(rewards), G, std_normalize))
    expected = []
    for group in rewards.reshape(3, G):
        a = group - group.mean()
        expected.append(a / (group.std(ddof=1) + grpo.ADVANTAGE_EPS) if std_normalize else a)
    np.testing.assert_allclose(got, np.concatenate(expected), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(got)) and not got[G : 2 * G].any()  # equal group: exactly 0


def test_k3_kl_and_clipped_surrogate_match_numpy():
    rng = np.random.default_rng(1)
    logp, old, ref = (-rng.uniform(0.1, 3.0, (3, 4, 7))).astype(np.float32)
    adv = rng.normal(size=(4, 7)).astype(np.float32)
    kl = np.asarray(grpo.k3_kl(jnp.asarray(logp), jnp.asarray(ref)))
    np.testing.assert_allclose(kl, np.exp(ref - logp) - (ref - logp) - 1, rtol=1e-5, atol=1e-6)
    assert (kl >= 0).all() and np.asarray(
        grpo.k3_kl(jnp.asarray(logp), jnp.asarray(logp))
    ).max() == 0
    lo, hi = 0.2, 0.28
    got = np.asarray(grpo.clipped_surrogate(*map(jnp.asarray, (logp, old, adv)), lo, hi))
    ratio = np.exp(logp - old)
    expected = -np.minimum(ratio * adv, np.clip(ratio, 1 - lo, 1 + hi) * adv)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_asymmetric_clip_bounds_the_gradient_on_each_side():
    def loss(logp, adv):
        return grpo.clipped_surrogate(logp, jnp.zeros(()), adv, 0.2, 0.28)

    assert jax.grad(loss)(jnp.log(1.25), 1.0) != 0.0  # inside 1 + 0.28
    assert jax.grad(loss)(jnp.log(1.30), 1.0) == 0.0  # beyond it, A > 0: clipped
    assert jax.grad(loss)(jnp.log(0.75), -1.0) == 0.0  # below 1 - 0.2, A < 0: clipped
    assert jax.grad(loss)(jnp.log(0.75), 1.0) != 0.0  # the pessimistic side is never clipped


@pytest.mark.parametrize("normalization", grpo.LOSS_NORMALIZATIONS)
def test_loss_normalizations_match_numpy_and_add_over_rows(normalization):
    rng = np.random.default_rng(2)
    N, T, max_new = 6, 9, 8
    loss = rng.normal(size=(N, T)).astype(np.float32)
    mask = _response_mask(rng, N, T)
    total, weight = grpo.normalized_sums(
        jnp.asarray(loss), jnp.asarray(mask), normalization, max_new
    )
    if normalization == "sequence":
        expected = np.mean([(x * m).sum() / m.sum() for x, m in zip(loss, mask)])
    elif normalization == "token":
        expected = (loss * mask).sum() / mask.sum()
    else:
        expected = (loss * mask).sum() / (N * max_new)
    np.testing.assert_allclose(total / weight, expected, rtol=1e-5)
    halves = [
        grpo.normalized_sums(loss[s], mask[s], normalization, max_new)
        for s in (slice(0, 2), slice(2, N))
    ]
    np.testing.assert_allclose(sum(h[0] for h in halves), total, rtol=1e-5)
    np.testing.assert_allclose(sum(h[1] for h in halves), weight, rtol=1e-6)


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="group_size >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="max_new_tokens >= 1 with loss_normalization='constant'"):
        GRPOConfig(loss_normalization="constant")
    with pytest.raises(ValueError, match="loss_normalization in"):
        GRPOConfig(loss_normalization="mean")
    with pytest.raises(ValueError, match="kl_beta >= 0"):
        GRPOConfig(kl_beta=-0.1)


# ------------------------------------------------------------------ on a tiny model


def _rollout(seed=3, N=8, L=12):
    """Synthetic rollouts: prompt | response | pad, responses of different lengths."""
    rng = np.random.default_rng(seed)
    plen = rng.integers(2, 4, N)
    end = plen + rng.integers(1, L - 4, N)
    i = np.arange(L)
    return {
        "tokens": rng.integers(3, TINY.vocab_size, (N, L)).astype(np.int32),
        "mask": (i < end[:, None]).astype(np.int32),
        "response_mask": ((i >= plen[:, None]) & (i < end[:, None]))[:, 1:].astype(np.int32),
        "no_eos": rng.integers(0, 2, N).astype(bool),
    }


@functools.partial(jax.jit, static_argnums=(0, 4))
def _direct_log_probs(lm, params, tokens, mask, temperature):
    """log pi(token t+1 | ..t) written out: positions from the mask, softmax at temperature."""
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    logits = lm.apply({"params": params}, tokens, positions, mask)[:, :-1] / temperature
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_all, tokens[:, 1:, None], axis=-1)[..., 0]


@functools.cache
def _prepared(kl_beta, std_normalize, missing_eos_penalty=0.0):
    lm, params = init_lm()
    _, ref_params = init_lm(seed=1)
    cfg = GRPOConfig(
        group_size=4,
        kl_beta=kl_beta,
        std_normalize=std_normalize,
        temperature=0.7,
        missing_eos_penalty=missing_eos_penalty,
    )
    rewards = np.asarray([0.0, 1.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2], np.float32)
    prepare = jax.jit(grpo.make_grpo_prepare(lm, cfg))
    batch, stats = prepare(params, ref_params if kl_beta else None, _rollout(), rewards)
    return jax.tree.map(np.asarray, (batch, stats)), rewards, ref_params


def test_prepare_log_probs_advantages_and_reference_only_when_needed():
    lm, params = init_lm()
    (batch, stats), rewards, ref_params = _prepared(0.1, True)
    rollout = _rollout()
    direct = _direct_log_probs(lm, params, rollout["tokens"], rollout["mask"], 0.7)
    np.testing.assert_allclose(batch["old_logp"], direct, rtol=1e-5, atol=1e-5)
    ref = _direct_log_probs(lm, ref_params, rollout["tokens"], rollout["mask"], 0.7)
    np.testing.assert_allclose(batch["ref_logp"], ref, rtol=1e-5, atol=1e-5)
    expected = grpo.group_advantages(jnp.asarray(rewards), 4, True)
    np.testing.assert_allclose(batch["advantages"], expected, rtol=1e-6)
    assert not batch["advantages"][4:].any()  # the second group's rewards are all equal
    assert stats["frac_groups_all_equal"] == 0.5 and stats["reward_mean"] == pytest.approx(0.35)
    m = rollout["response_mask"]
    kl = (np.exp(ref - direct) - (ref - direct) - 1) * m
    assert float(stats["kl"]) == pytest.approx(float(kl.sum() / m.sum()), rel=1e-4)
    (batch0, stats0), _, _ = _prepared(0.0, True)
    assert "ref_logp" not in batch0 and "kl" not in stats0  # beta = 0: no reference pass


def test_an_answer_cut_off_at_the_length_limit_is_penalised():
    (batch, stats), rewards, _ = _prepared(0.0, True, missing_eos_penalty=1.0)
    no_eos = _rollout()["no_eos"]
    expected = grpo.group_advantages(jnp.asarray(rewards - no_eos.astype(np.float32)), 4, True)
    np.testing.assert_allclose(batch["advantages"], expected, rtol=1e-6)
    assert stats["reward_mean"] == pytest.approx(0.35)  # the verifier's reward, as logged


def test_repeat_for_groups_keeps_each_group_in_consecutive_rows():
    prompts, lengths = np.arange(6).reshape(3, 2), np.asarray([2, 1, 2])
    rep_prompts, rep_lengths = grpo.repeat_for_groups(prompts, lengths, 2)
    assert rep_prompts.tolist() == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5]]
    assert rep_lengths.tolist() == [2, 2, 1, 1, 2, 2]


def _direct_loss(lm, params, batch, cfg):
    """The GRPO objective written from its formula, per response then normalised."""
    logp = _direct_log_probs(lm, params, batch["tokens"], batch["mask"], cfg.temperature)
    m = batch["response_mask"]
    adv = batch["advantages"][:, None]
    ratio = jnp.exp(logp - batch["old_logp"])
    clipped = jnp.clip(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    if cfg.kl_beta:
        d = batch["ref_logp"] - logp
        per_token += cfg.kl_beta * (jnp.exp(d) - d - 1)
    per_token = per_token * m
    if cfg.loss_normalization == "sequence":
        return jnp.mean(per_token.sum(1) / m.sum(1))
    if cfg.loss_normalization == "token":
        return per_token.sum() / m.sum()
    return per_token.sum() / (m.shape[0] * cfg.max_new_tokens)


STEP_CASES = [
    dict(kl_beta=0.1, std_normalize=True, loss_normalization="sequence", num_microbatches=1),
    dict(kl_beta=0.0, std_normalize=True, loss_normalization="token", num_microbatches=2),
    dict(
        kl_beta=0.1,
        std_normalize=False,
        loss_normalization="constant",
        max_new_tokens=10,
        clip_eps_high=0.28,
        num_microbatches=4,
    ),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: c["loss_normalization"])
def test_first_update_is_the_gradient_of_the_formula(case):
    lm, params = init_lm()
    (batch, _), _, _ = _prepared(case["kl_beta"], case["std_normalize"])
    # Move the old log-probs off the current ones so that ratios differ from 1 and
    # some tokens fall outside the clip range on either side.
    noise = np.random.default_rng(4).normal(0, 0.3, batch["old_logp"].shape)
    batch = {**batch, "old_logp": (batch["old_logp"] + noise).astype(np.float32)}
    cfg = GRPOConfig(group_size=4, temperature=0.7, **case)
    lr = 0.5
    tx = optax.sgd(lr)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    new_state, metrics = jax.jit(grpo.make_grpo_step(lm, tx, cfg))(state, batch, jax.random.key(0))
    loss, grads = jax.jit(jax.value_and_grad(lambda p: _direct_loss(lm, p, batch, cfg)))(params)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5, abs=1e-7)
    assert 0 < metrics["clip_frac_low"] + metrics["clip_frac_high"] < 1
    for new, old, g in zip(*map(jax.tree.leaves, (new_state.params, params, grads))):
        np.testing.assert_allclose((old - new) / lr, g, rtol=2e-4, atol=2e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4


def test_padding_cannot_overflow_the_loss():
    lm, params = init_lm()
    (batch, _), _, _ = _prepared(0.1, True)
    cfg = GRPOConfig(group_size=4, kl_beta=0.1, temperature=0.7)
    loss_sums = jax.jit(grpo.make_grpo_loss_sums(lm, cfg))
    outside = batch["response_mask"] == 0
    garbage = {
        k: np.where(outside, -500.0, batch[k]).astype(np.float32) for k in ("old_logp", "ref_logp")
    }
    clean = loss_sums(params, batch, jax.random.key(0))
    dirty = loss_sums(params, {**batch, **garbage}, jax.random.key(0))
    np.testing.assert_allclose(clean[0], dirty[0], rtol=1e-6)
    grads = jax.jit(jax.grad(lambda p: loss_sums(p, {**batch, **garbage}, None)[0]))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
