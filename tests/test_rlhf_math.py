"""PPO, reward-model and DPO math: GAE, whitening, KL sign, zero gradients, reward index, masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.sampling import SamplingConfig
from rlhf import ppo
from rlhf.dpo import dpo_sums
from rlhf.reward_model import fold_normalization, normalization, sequence_reward
from rlhf.reward_step import bradley_terry_sums
from rlhf.rollout import check_on_policy_sampling, join_prompt_and_response
from rlhf.sequences import last_token_index, lm_logits, log_probs_and_entropy, sequence_log_probs
from tests.rlhf_helpers import TINY, init_lm, init_rm


def _response_mask(rng, B, T):
    """Rows of prompt (0) | response (1) | padding (0)."""
    start = rng.integers(0, T // 2, B)
    end = np.minimum(start + rng.integers(1, T // 2, B), T)
    t = np.arange(T)
    return ((t >= start[:, None]) & (t < end[:, None])).astype(np.float32)


@pytest.mark.strict_ranks
def test_gae_matches_direct_backward_recursion():
    rng = np.random.default_rng(0)
    B, T, gamma, lam = 5, 12, 0.9, 0.8
    rewards, values = rng.normal(size=(2, B, T)).astype(np.float32)
    mask = _response_mask(rng, B, T)
    adv, ret = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    expected = np.zeros((B, T), np.float32)
    for b in range(B):
        idx = np.flatnonzero(mask[b])
        next_value = next_adv = 0.0
        for t in idx[::-1]:  # the response, backwards; terminal after its last token
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            expected[b, t] = next_adv
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, (expected + values) * mask, rtol=1e-5, atol=1e-5)


@pytest.mark.strict_ranks
def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rng = np.random.default_rng(1)
    rewards, values = rng.normal(size=(2, 3, 6)).astype(np.float32)
    mask = np.ones((3, 6), np.float32)
    adv, _ = ppo.gae(rewards, values, mask, 1.0, 1.0)
    to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(adv, to_go - values, rtol=1e-5, atol=1e-5)


@pytest.mark.strict_ranks
def test_whiten_over_mask():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 5.0, (4, 10)).astype(np.float32)
    mask = _response_mask(rng, 4, 10)
    w = np.asarray(ppo.whiten(jnp.asarray(x), jnp.asarray(mask)))
    assert abs(w[mask > 0].mean()) < 1e-5 and abs(w[mask > 0].std() - 1) < 1e-3
    assert not w[mask == 0].any()


@pytest.mark.strict_ranks
def test_kl_penalty_sign_and_score_at_last_response_token():
    mask = jnp.asarray([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], jnp.float32)
    logp = jnp.full((2, 5), -1.0)
    ref = jnp.full((2, 5), -2.0)  # the policy is more confident than the reference
    rewards, kl = ppo.kl_penalized_rewards(logp, ref, jnp.asarray([10.0, 20.0]), mask, beta=0.5)
    np.testing.assert_allclose(kl, mask)  # log pi - log ref = +1 on response tokens
    expected = -0.5 * np.asarray(mask)  # drifting from the reference costs reward
    expected[0, 3] += 10.0
    expected[1, 2] += 20.0
    np.testing.assert_allclose(rewards, expected)


def test_kl_reward_has_the_policy_gradient_of_the_kl():
    """The score-function gradient of the per-token KL reward, summed exactly over a small
    vocabulary, is -grad KL(pi || ref): the penalty pulls the policy towards the reference.
    (k3 as a reward would give grad KL(pi || ref) - grad KL(ref || pi) instead.)"""
    theta = jnp.asarray([0.3, -1.2, 0.8, 0.1])
    ref_logp = jax.nn.log_softmax(jnp.asarray([1.0, 0.2, -0.5, 0.4]))

    def kl(th):
        logp = jax.nn.log_softmax(th)
        return jnp.sum(jnp.exp(logp) * (logp - ref_logp))

    logp = jax.nn.log_softmax(theta)
    rewards, _ = ppo.kl_penalized_rewards(
        logp[:, None], ref_logp[:, None], jnp.zeros(4), jnp.ones((4, 1)), beta=1.0
    )  # one row per possible token: its reward
    grad_logp = jax.jacobian(lambda th: jax.nn.log_softmax(th))(theta)  # [token, theta]
    policy_gradient = jnp.sum(jnp.exp(logp)[:, None] * rewards * grad_logp, axis=0)
    np.testing.assert_allclose(policy_gradient, -jax.grad(kl)(theta), rtol=1e-5, atol=1e-7)


def test_a_huge_log_ratio_on_padding_leaves_everything_finite():
    """exp of a log-ratio outside the response must never run: inf * 0 would be NaN and
    spread through GAE, whitening and the KL controller."""
    mask = jnp.asarray([[1, 1, 0], [1, 1, 1]], jnp.float32)
    logp = jnp.asarray([[-1.0, -1.0, -1.0], [-1.0, -2.0, -1.0]])
    ref = logp.at[1, 1].set(-3.0)  # row 1: 1 nat more likely under the policy
    pad = (0, 2)  # outside the response, the policy 199 nats below the reference and old
    stats = ppo.kl_statistics(logp.at[pad].set(-200.0), ref, mask)
    assert all(np.isfinite(float(v)) for v in stats.values())
    np.testing.assert_allclose(stats["kl"], 0.5)  # row 1's 1 nat, averaged over 2 rows
    zeros = jnp.zeros_like(logp)
    old_logp = logp.at[pad].set(-200.0)  # and here the old policy 199 nats below the new
    terms = ppo.ppo_token_losses(logp, old_logp, zeros + 1.0, zeros, zeros, zeros, mask, 0.2, 0.2)
    assert all(bool(jnp.isfinite(v).all()) for v in terms.values())
    assert float(terms["policy_loss"][pad]) == 0.0


@pytest.mark.strict_ranks
def test_kl_controller():
    adaptive = ppo.KLController(beta=0.1, target=1.0, horizon=100)
    assert adaptive.update(kl=5.0, n_steps=10) == pytest.approx(0.1 * 1.02)  # clipped at +20%
    assert adaptive.update(kl=0.5, n_steps=10) < 0.1 * 1.02  # below target: loosen
    beta = adaptive.beta
    assert adaptive.update(kl=float("nan"), n_steps=10) == beta  # a non-finite KL is ignored
    fixed = ppo.KLController(beta=0.1)
    assert fixed.update(kl=100.0, n_steps=10) == 0.1


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(lm, params, tokens, mask):
    return log_probs_and_entropy(lm_logits(lm, params, tokens, mask, 0.7), tokens)[0]


def _ppo_minibatch(lm, params, rm, rparams, advantages_scale):
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(3, TINY.vocab_size, (4, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12) < np.asarray([12, 10, 9, 12])[:, None], jnp.int32)
    response = jnp.asarray(_response_mask(rng, 4, 11)) * mask[:, 1:]
    old_logp = _log_probs(lm, params, tokens, mask)
    return {
        "tokens": tokens,
        "mask": mask,
        "response_mask": response,
        "old_logp": old_logp,
        "old_values": jnp.zeros((4, 11)),
        "advantages": advantages_scale * jnp.asarray(rng.normal(size=(4, 11)), jnp.float32),
        "returns": jnp.asarray(rng.normal(size=(4, 11)), jnp.float32),
    }


def test_policy_gradient_is_zero_when_ratio_is_one_and_advantages_are_zero():
    lm, params = init_lm()
    rm, rparams = init_rm()
    cfg = ppo.PPOConfig(temperature=0.7)
    loss_sums = ppo.make_ppo_loss_sums(lm, rm, cfg)
    all_params = {"policy": params, "value": rparams}

    @jax.jit
    def policy_grads(mb):
        return jax.grad(lambda p: loss_sums(p, mb, jax.random.key(0))[0])(all_params)["policy"]

    zero = policy_grads(_ppo_minibatch(lm, params, rm, rparams, advantages_scale=0.0))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(zero))
    nonzero = policy_grads(_ppo_minibatch(lm, params, rm, rparams, advantages_scale=1.0))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(nonzero)) > 1e-4


def test_ppo_loss_ignores_tokens_outside_the_response():
    lm, params = init_lm()
    rm, rparams = init_rm()
    loss_sums = ppo.make_ppo_loss_sums(lm, rm, ppo.PPOConfig())
    all_params = {"policy": params, "value": rparams}
    mb = _ppo_minibatch(lm, params, rm, rparams, 1.0)
    outside = mb["response_mask"] == 0
    garbage = {k: jnp.where(outside, 1e3, mb[k]) for k in ("advantages", "returns", "old_logp")}
    loss_sums = jax.jit(loss_sums)
    a = loss_sums(all_params, mb, jax.random.key(0))
    b = loss_sums(all_params, {**mb, **garbage}, jax.random.key(0))
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    assert float(a[1]["weight_sum"]) == float(mb["response_mask"].sum())


@pytest.mark.strict_ranks
def test_clipped_objective_has_no_gradient_beyond_the_clip():
    def loss(logp, adv):
        terms = ppo.ppo_token_losses(logp, jnp.zeros(()), adv, 0.0, 0.0, 0.0, 1.0, 0.2, 0.2)
        return terms["policy_loss"]

    assert jax.grad(loss)(jnp.log(1.5), 1.0) == 0.0  # ratio 1.5 > 1.2 with A > 0: clipped
    assert jax.grad(loss)(jnp.log(1.1), 1.0) != 0.0  # inside the clip
    assert jax.grad(loss)(jnp.log(1.5), -1.0) != 0.0  # pessimistic side is never clipped


def test_reward_read_at_last_real_token_for_left_and_right_padding():
    model, params = init_rm()
    reward = jax.jit(lambda t, m: sequence_reward(model, params, t, m))
    seq = np.asarray([5, 9, 13, 22, 7], np.int32)
    alone = reward(jnp.asarray(seq[None]), jnp.ones((1, 5), jnp.int32))
    right = np.zeros((1, 9), np.int32)
    right[0, :5] = seq
    left = np.zeros((1, 9), np.int32)
    left[0, 4:] = seq
    tokens = jnp.asarray(np.concatenate([right, left]))
    mask = (tokens != 0).astype(jnp.int32)
    np.testing.assert_array_equal(last_token_index(mask), [4, 8])
    rewards = reward(tokens, mask)
    np.testing.assert_allclose(rewards, [alone[0], alone[0]], rtol=1e-5, atol=1e-6)
    # The classic bug, mask.sum() - 1, reads a pad token in the left-padded row.
    assert int(mask[1].sum() - 1) != int(last_token_index(mask)[1])


def test_normalization_folds_into_the_head():
    model, params = init_rm()
    tokens = jax.random.randint(jax.random.key(0), (16, 6), 3, TINY.vocab_size)
    mask = jnp.ones_like(tokens)
    reward = jax.jit(lambda p: sequence_reward(model, p, tokens, mask))
    gain, bias = normalization(reward(params))
    normed = reward(fold_normalization(params, gain, bias))
    assert abs(float(normed.mean())) < 1e-4 and abs(float(normed.std()) - 1) < 1e-3


def test_sequence_log_probs_count_only_answer_tokens():
    lm, params = init_lm()
    tokens = jnp.asarray([[1, 4, 9, 5, 11, 12, 6, 0, 0]], jnp.int32)
    mask = (tokens != 0).astype(jnp.int32)
    answer = jnp.asarray([[0, 0, 0, 0, 1, 1, 1, 0, 0]], jnp.int32)
    seq_logp = jax.jit(lambda t: sequence_log_probs(lm, params, t, mask, answer))
    logp = seq_logp(tokens)
    # Changing padding tokens changes nothing.
    np.testing.assert_allclose(seq_logp(tokens.at[0, 7:].set(33)), logp, rtol=1e-6)
    logits = jax.jit(lm.apply)({"params": params}, tokens[:, :7])
    lp = jax.nn.log_softmax(logits[0])
    direct = sum(lp[t - 1, int(tokens[0, t])] for t in (4, 5, 6))
    np.testing.assert_allclose(logp[0], direct, rtol=1e-5)


@pytest.mark.strict_ranks
def test_bradley_terry_and_dpo_losses():
    ones = jnp.ones((2,))
    bt = bradley_terry_sums(jnp.asarray([2.0, 0.0]), jnp.asarray([1.0, 1.0]), 0.5 * ones, ones)
    expected = np.log1p(np.exp(-(1.0 - 0.5))) + np.log1p(np.exp(-(-1.0 - 0.5)))
    np.testing.assert_allclose(bt["loss_sum"], expected, rtol=1e-6)
    assert float(bt["correct_sum"]) == 1.0 and float(bt["margin_sum"]) == 0.0
    # DPO at the reference: log 2 per pair, no preference either way.
    same = dpo_sums(-ones, -2 * ones, -ones, -2 * ones, ones, beta=0.1)
    np.testing.assert_allclose(same["loss_sum"], 2 * np.log(2.0), rtol=1e-6)
    # Raising the chosen answer's likelihood relative to the reference lowers the loss.
    better = dpo_sums(-0.5 * ones, -2 * ones, -ones, -2 * ones, ones, beta=0.1)
    assert float(better["loss_sum"]) < float(same["loss_sum"])
    assert float(better["correct_sum"]) == 2.0


def test_dpo_nll_term_is_the_chosen_answers_mean_token_nll():
    chosen, rejected = jnp.asarray([-6.0, -3.0]), jnp.asarray([-8.0, -1.0])
    ref_chosen, ref_rejected = jnp.asarray([-7.0, -2.0]), jnp.asarray([-7.5, -2.5])
    weight, tokens = jnp.asarray([1.0, 0.5]), jnp.asarray([3.0, 2.0])
    plain = dpo_sums(chosen, rejected, ref_chosen, ref_rejected, weight, beta=0.2)
    rpo = dpo_sums(chosen, rejected, ref_chosen, ref_rejected, weight, 0.2, 0.0, tokens, 0.7)
    nll = np.asarray([6.0 / 3.0, 3.0 / 2.0])  # -logp / answer tokens
    np.testing.assert_allclose(rpo["nll_sum"], 1.0 * nll[0] + 0.5 * nll[1], rtol=1e-6)
    np.testing.assert_allclose(
        rpo["loss_sum"], plain["loss_sum"] + 0.7 * float(rpo["nll_sum"]), rtol=1e-6
    )
    assert float(plain["nll_sum"]) == 0.0


@pytest.mark.strict_ranks
def test_join_prompt_and_response_is_contiguous():
    prompts = jnp.asarray([[1, 2, 3, 0], [1, 2, 0, 0]], jnp.int32)
    response = jnp.asarray([[7, 8, 0], [9, 6, 0]], jnp.int32)
    out = join_prompt_and_response(prompts, jnp.asarray([3, 2]), response, jnp.asarray([2, 2]), 0)
    np.testing.assert_array_equal(out["tokens"], [[1, 2, 3, 7, 8, 0, 0], [1, 2, 9, 6, 0, 0, 0]])
    np.testing.assert_array_equal(out["mask"], [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(
        out["response_mask"], [[0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0]]
    )


def test_on_policy_sampling_is_checked():
    """PPO and GRPO recompute log-probs at their temperature over the whole vocabulary:
    a sampler at another temperature, or truncated by top-k/top-p, is refused."""
    check_on_policy_sampling("PPO", 0.7, SamplingConfig(temperature=0.7))
    for cfg in (
        SamplingConfig(temperature=1.0),
        SamplingConfig(temperature=0.7, top_k=50),
        SamplingConfig(temperature=0.7, top_p=0.9),
    ):
        with pytest.raises(ValueError, match="GRPO samples at its algorithm.temperature"):
            check_on_policy_sampling("GRPO", 0.7, cfg)


@pytest.mark.strict_ranks
def test_strict_ranks_mark_makes_rank_promotion_an_error():
    """The mark the tests above carry (tests/conftest.py) really refuses broadcasting
    that adds dimensions ([3] against [2, 3]), and only that."""
    with pytest.raises(ValueError, match="rank_promotion"):
        jnp.ones(3) * jnp.ones((2, 3))
    assert (jnp.ones((1, 3)) * jnp.ones((2, 3))).shape == (2, 3)  # same rank: allowed
