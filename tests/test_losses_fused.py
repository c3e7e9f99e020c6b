"""The fused cross-entropy (custom VJP) equals plain autodiff through logsumexp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import losses


def _inputs(dtype, seed=0, shape=(3, 7, 101)):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    logits = (4 * jax.random.normal(k1, shape)).astype(dtype)
    targets = jax.random.randint(k2, shape[:2], 0, shape[2])
    weights = (jax.random.uniform(k3, shape[:2]) > 0.3).astype(jnp.float32)
    return logits, targets, weights


def _plain_sums(logits, targets, weights, z_loss):
    target, log_z = losses.reference_target_logit_and_log_z(logits, targets)
    ce = jnp.sum(weights * (log_z - target))
    return ce + z_loss * jnp.sum(weights * log_z**2), ce


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_fused_cross_entropy_matches_plain(dtype, tol, z_loss):
    logits, targets, weights = _inputs(dtype, seed=int(z_loss * 1e3))

    def fused(lg):
        sums = losses.cross_entropy_sums(lg, targets, weights, z_loss)
        return sums["loss_sum"], sums["ce_sum"]

    (loss, ce), fused_grad = jax.value_and_grad(fused, has_aux=True)(logits)
    (ref_loss, ref_ce), ref_grad = jax.value_and_grad(
        lambda lg: _plain_sums(lg, targets, weights, z_loss), has_aux=True
    )(logits)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(ce, ref_ce, rtol=1e-6)
    assert fused_grad.dtype == logits.dtype
    f, r = np.asarray(fused_grad, np.float32), np.asarray(ref_grad, np.float32)
    assert np.linalg.norm(f - r) / np.linalg.norm(r) < tol


def test_fused_token_log_probs_gradient_matches_plain():
    logits, targets, weights = _inputs(jnp.float32, seed=3)
    ct = jax.random.normal(jax.random.key(4), targets.shape)

    def plain(lg):
        target, log_z = losses.reference_target_logit_and_log_z(lg, targets)
        return jnp.sum(ct * (target - log_z))

    got = jax.grad(lambda lg: jnp.sum(ct * losses.token_log_probs(lg, targets)))(logits)
    np.testing.assert_allclose(got, jax.grad(plain)(logits), rtol=1e-5, atol=1e-6)


def test_vocab_size_leaves_the_padding_columns_out():
    """Unmasked logits with `vocab_size` give what the model's masked logits give."""
    logits, targets, _ = _inputs(jnp.float32, seed=5)
    vocab = logits.shape[-1] - 5
    targets = targets % vocab
    ct = [jax.random.normal(jax.random.key(i), targets.shape) for i in (6, 7)]

    def value_and_grad(fn):
        out, vjp = jax.vjp(lambda lg: fn(lg, targets), logits)
        return out, vjp(tuple(ct))[0]

    got = value_and_grad(lambda lg, t: losses.target_logit_and_log_z(lg, t, vocab))
    want = value_and_grad(lambda lg, t: losses.reference_masked_statistics(lg, t, vocab))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
