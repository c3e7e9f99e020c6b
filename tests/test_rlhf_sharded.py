"""SFT, reward, DPO, PPO and GRPO steps: sharded over a mesh they equal the single-device step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.transformer import LanguageModel
from rlhf import chat
from rlhf.dpo import DPOConfig, make_dpo_step, make_reference_log_probs
from rlhf.grpo import GRPOConfig, make_grpo_prepare, make_grpo_step
from rlhf.ppo import PPOConfig, make_ppo_step, make_prepare
from rlhf.reward_model import RewardModel
from rlhf.reward_step import make_reward_step
from rlhf.sft_step import make_sft_step
from tests.helpers import mesh_of, single_device_mesh
from tests.rlhf_helpers import CHAT, TINY, FakeTokenizer, init_lm
from train import sharding
from train.optim import OptimConfig, make_optimizer
from train.state import create_train_state, param_shardings, state_logical_specs

# A small step: Adam divides by sqrt(v), which magnifies rounding in near-zero gradients.
TX = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=0, total_steps=10, schedule="constant"))
EXAMPLE = jnp.zeros((1, 8), jnp.int32)


def _sft_batch():
    tok = FakeTokenizer()
    examples = [
        chat.sft_example(
            [
                {"role": "user", "content": f"q{i}" * (i % 3 + 1)},
                {"role": "assistant", "content": f"answer {i * 7}"},
            ],
            tok,
        )
        for i in range(24)
    ]
    batch = chat.pack_examples(examples, seq_len=32)
    return {k: v[:8] for k, v in batch.items()}


def _pair_batch(seed=0, B=8, L=12, vocab=TINY.vocab_size):
    """Random pairs; the first half right-padded, the second half left-padded."""
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        seqs = [rng.integers(3, vocab, rng.integers(6, L + 1)) for _ in range(B)]
        prompt_len = 3
        right = chat.pad_sequences(seqs[: B // 2], L, 0, "right")
        left = chat.pad_sequences(seqs[B // 2 :], L, 0, "left")
        tokens = np.concatenate([right[0], left[0]])
        mask = np.concatenate([right[1], left[1]])
        first = np.argmax(mask, axis=1)
        loss = mask * (np.arange(L) >= (first + prompt_len)[:, None])
        out.update({f"{side}_tokens": tokens, f"{side}_mask": mask, f"{side}_loss_mask": loss})
    out["margin"] = rng.uniform(0, 1, B).astype(np.float32)
    return out


@functools.cache
def _dpo_batch():
    lm, ref_params = init_lm()
    batch = _pair_batch(1)
    ref = jax.jit(make_reference_log_probs(lm))(ref_params, batch)
    return {**batch, **jax.tree.map(np.asarray, ref)}


@functools.cache
def _ppo_batch():
    """A prepared PPO batch from synthetic rollouts (prompt | response | pad)."""
    rng = np.random.default_rng(2)
    B, L = 16, 14
    lm, rm = LanguageModel(TINY), RewardModel(TINY)
    params = jax.jit(lambda r: nn.unbox(_ppo_init(r)))(jax.random.key(0))
    plen = rng.integers(2, 5, B)
    end = plen + rng.integers(1, L - 4, B)
    i = np.arange(L)
    rollout = {
        "tokens": rng.integers(3, TINY.vocab_size, (B, L)).astype(np.int32),
        "mask": (i < end[:, None]).astype(np.int32),
        "response_mask": ((i >= plen[:, None]) & (i < end[:, None]))[:, 1:].astype(np.int32),
        "no_eos": rng.integers(0, 2, B).astype(bool),
    }
    reward_fn = lambda _, tokens, mask, response: jnp.sum((tokens[:, 1:] == 5) * response, 1)
    prepare = jax.jit(make_prepare(lm, rm, reward_fn, PPO_CFG))
    batch, _ = prepare(params, params["policy"], None, rollout, 0.1)
    return jax.tree.map(np.asarray, batch)


PPO_CFG = PPOConfig(temperature=0.8, epochs=2, num_minibatches=2)


GRPO_CFG = GRPOConfig(group_size=4, kl_beta=0.1, clip_eps_high=0.28, epochs=2, num_minibatches=2)


def _grpo_rollout():
    """Synthetic rollouts (prompt | response | pad), four groups of four, and rewards."""
    rng = np.random.default_rng(3)
    B, L = 16, 14
    plen = rng.integers(2, 5, B)
    end = plen + rng.integers(1, L - 4, B)
    i = np.arange(L)
    rollout = {
        "tokens": rng.integers(3, TINY.vocab_size, (B, L)).astype(np.int32),
        "mask": (i < end[:, None]).astype(np.int32),
        "response_mask": ((i >= plen[:, None]) & (i < end[:, None]))[:, 1:].astype(np.int32),
        "no_eos": rng.integers(0, 2, B).astype(bool),
    }
    return rollout, rng.uniform(0, 1, B).astype(np.float32)


@functools.cache
def _grpo_batch():
    lm, params = init_lm()
    _, ref_params = init_lm(seed=1)
    prepare = jax.jit(make_grpo_prepare(lm, GRPO_CFG))
    batch, _ = prepare(params, ref_params, *_grpo_rollout())
    return jax.tree.map(np.asarray, batch)


def _ppo_init(rng):
    return {
        "policy": LanguageModel(TINY).init(rng, EXAMPLE)["params"],
        "value": RewardModel(TINY).init(jax.random.fold_in(rng, 1), EXAMPLE)["params"],
    }


STAGES = {
    "sft": (
        lambda: make_sft_step(LanguageModel(CHAT), TX),
        lambda r: LanguageModel(CHAT).init(r, EXAMPLE)["params"],
        _sft_batch,
    ),
    "reward": (
        lambda: make_reward_step(RewardModel(TINY), TX),
        lambda r: RewardModel(TINY).init(r, EXAMPLE)["params"],
        _pair_batch,
    ),
    "dpo": (
        lambda: make_dpo_step(LanguageModel(TINY), TX, DPOConfig(beta=0.5)),
        lambda r: LanguageModel(TINY).init(r, EXAMPLE)["params"],
        _dpo_batch,
    ),
    "ppo": (
        lambda: make_ppo_step(LanguageModel(TINY), RewardModel(TINY), TX, PPO_CFG),
        _ppo_init,
        _ppo_batch,
    ),
    "grpo": (
        lambda: make_grpo_step(LanguageModel(TINY), TX, GRPO_CFG),
        lambda r: LanguageModel(TINY).init(r, EXAMPLE)["params"],
        _grpo_batch,
    ),
}


@functools.cache
def _initial_state(stage):
    """The initial state on the host (created once: the init is the same on any mesh)."""
    state, _ = create_train_state(STAGES[stage][1], TX, single_device_mesh(), jax.random.key(0))
    return jax.device_get(state)


def _run(stage, mesh):
    make_step, init_params, make_batch = STAGES[stage]
    with sharding.mesh_context(mesh):
        abstract = jax.eval_shape(init_params, jax.random.key(0))
        shardings = sharding.logical_to_mesh(state_logical_specs(abstract, TX), mesh)
    state = jax.device_put(_initial_state(stage), shardings)
    step = sharding.jit_sharded(
        make_step(),
        mesh,
        in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
    )
    batch = make_batch()
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch, jax.random.key(7))
        losses.append(float(metrics["loss"] if "loss" in metrics else metrics["policy_loss"]))
    return state, losses, metrics


@functools.cache
def _reference(stage):
    return _run(stage, single_device_mesh())


CASES = [
    ("sft", dict(data=2, fsdp=2, tensor=2)),
    ("reward", dict(data=2, fsdp=2, tensor=2)),
    ("dpo", dict(data=2, fsdp=2, tensor=2)),
    ("ppo", dict(data=2, fsdp=2, tensor=2)),
    ("ppo", dict(data=8)),
    ("grpo", dict(data=2, fsdp=2, tensor=2)),
    ("grpo", dict(fsdp=8)),
]


@pytest.mark.parametrize("stage, mesh_shape", CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_sharded_step_matches_single_device(stage, mesh_shape):
    ref_state, ref_losses, ref_metrics = _reference(stage)
    mesh = mesh_of(mesh_shape)
    state, losses, metrics = _run(stage, mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert losses[0] != losses[1]  # the first update changed the model
    for key in ref_metrics:
        np.testing.assert_allclose(
            metrics[key], ref_metrics[key], rtol=2e-4, atol=1e-5, err_msg=key
        )
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(ref_state.params)
    ):
        assert a.sharding.mesh.shape == mesh.shape
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path)
        )


def test_grpo_prepare_sharded_matches_single_device():
    """Groups span devices (rows of a group on different shards): same advantages, same
    log-probs."""
    reference = _grpo_batch()
    mesh = mesh_of(dict(data=2, fsdp=2, tensor=2))
    lm, params = init_lm()
    _, ref_params = init_lm(seed=1)
    params_sh = param_shardings(lambda r: lm.init(r, EXAMPLE)["params"], mesh)
    prepare = sharding.jit_sharded(
        make_grpo_prepare(lm, GRPO_CFG),
        mesh,
        in_shardings=(
            params_sh,
            params_sh,
            sharding.batch_sharding(mesh),
            sharding.batch_sharding(mesh),
        ),
        out_shardings=(sharding.batch_sharding(mesh), sharding.replicated(mesh)),
    )
    batch, _ = prepare(params, ref_params, *_grpo_rollout())
    for key, value in reference.items():
        np.testing.assert_allclose(np.asarray(batch[key]), value, rtol=1e-5, atol=1e-5, err_msg=key)
