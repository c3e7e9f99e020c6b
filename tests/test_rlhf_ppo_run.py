"""End to end: PPO with KV-cache rollouts raises a toy reward; log-probs match the sampler's."""

import jax
import jax.numpy as jnp
import numpy as np

from model.sampling import SamplingConfig
from model.transformer import LanguageModel
from rlhf.ppo import KLController, PPOConfig
from rlhf.ppo_iteration import make_ppo_iteration
from rlhf.reward_model import RewardModel
from rlhf.rollout import prompt_batch
from tests.helpers import single_device_mesh
from tests.rlhf_helpers import TINY
from train.optim import OptimConfig, make_optimizer
from train.state import create_train_state

TARGET = 5  # the toy reward counts this token in the response


def count_reward(_, tokens_BL, mask_BL, response_BT):
    return jnp.sum((tokens_BL[:, 1:] == TARGET) * response_BT, axis=1).astype(jnp.float32)


def test_ppo_raises_a_toy_reward():
    mesh = single_device_mesh()
    lm, vm = LanguageModel(TINY), RewardModel(TINY)
    example = jnp.zeros((1, 8), jnp.int32)
    init = lambda r: {
        "policy": lm.init(r, example)["params"],
        "value": vm.init(jax.random.fold_in(r, 1), example)["params"],
    }
    tx = make_optimizer(
        OptimConfig(lr=5e-3, warmup_steps=0, total_steps=100, schedule="constant", weight_decay=0.0)
    )
    state, shardings = create_train_state(init, tx, mesh, jax.random.key(0))
    ref_params = jax.tree.map(jnp.copy, state.params["policy"])
    ppo_cfg = PPOConfig(temperature=1.0, epochs=4, num_minibatches=2, missing_eos_penalty=0.0)
    trainer = make_ppo_iteration(
        lm,
        vm,
        count_reward,
        tx,
        mesh,
        shardings,
        ppo_cfg,
        SamplingConfig(max_new_tokens=8, temperature=1.0, eos_id=None),
        KLController(beta=0.01),
        ref_params,
        None,
    )
    rng = np.random.default_rng(0)
    prompts = [rng.integers(7, TINY.vocab_size, rng.integers(2, 6)).tolist() for _ in range(16)]
    prompts_BP, lengths_B = prompt_batch(prompts, pad_id=0)

    # The sampler's log-probs equal those recomputed for the update (same temperature).
    rollout = trainer.rollout(state.params["policy"], prompts_BP, lengths_B, jax.random.key(1))
    keys = ("tokens", "mask", "response_mask", "no_eos")
    batch, _ = trainer.prepare(state.params, ref_params, None, {k: rollout[k] for k in keys}, 0.01)
    response = np.asarray(rollout["response_mask"]) > 0
    assert response.sum() == 16 * 8
    np.testing.assert_allclose(
        np.asarray(batch["old_logp"])[response],
        np.asarray(rollout["sampler_logp"])[response],
        atol=2e-4,
    )

    scores = []
    for i in range(12):
        batch = {"prompts": prompts_BP, "lengths": lengths_B}
        state, metrics = trainer(state, batch, jax.random.key(100 + i))
        scores.append(metrics["score_mean"])
    for key in (
        "kl",
        "entropy",
        "clip_frac",
        "approx_kl",
        "value_loss",
        "value_explained_variance",
        "response_length",
        "no_eos_frac",
        "time_generate",
    ):
        assert np.isfinite(metrics[key]), key
    print("scores", np.round(scores, 2), "kl", metrics["kl"])
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 1.0, scores
    assert metrics["kl"] > 0  # it moved away from the reference, and the penalty saw it
