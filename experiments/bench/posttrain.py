"""SFT, reward-model and PPO step benchmarks: the project's own steps on synthetic data.

SFT is the pretraining step on packed rows (several documents a row, prompt
tokens weighted 0), so attention takes the masked path; reward is the
Bradley-Terry step on pairs; PPO is the whole update on one rollout batch
(epochs x minibatches in one jitted call), with the scoring pass that prepares
it (reference and policy log-probs, values, rewards, GAE) timed apart.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import fake_params
from experiments.bench.timing import compile_timed, median, program_bytes, spread, time_calls
from model.config import get_preset
from model.transformer import LanguageModel
from rlhf.ppo import PPOConfig, make_ppo_step, make_prepare
from rlhf.reward_model import RewardModel
from rlhf.reward_step import make_reward_step
from rlhf.sft_step import make_sft_step
from train import sharding
from train.flops import mfu
from train.optim import OptimConfig, make_optimizer
from train.state import create_train_state


@dataclasses.dataclass(frozen=True)
class PosttrainVariant:
    stage: str  # sft | reward | ppo
    preset: str
    batch: int  # rows (SFT), pairs (reward), rollouts (PPO)
    seq_len: int
    model: tuple[tuple[str, object], ...] = (("attention_backend", "cudnn"),)

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.preset}/b{self.batch}/T{self.seq_len}"


def _packed_sft_batch(rng, vocab, B, L, doc_len=200, prompt_len=60) -> dict:
    """Rows of back-to-back examples; loss weight on the answer part of each."""
    idx = np.arange(L)
    tokens = rng.integers(3, vocab, (B, L + 1))
    segments = (idx // doc_len + 1)[None].repeat(B, 0).astype(np.int32)
    positions = (idx % doc_len)[None].repeat(B, 0).astype(np.int32)
    weights = (positions >= prompt_len).astype(np.float32)
    return {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
        "weights": weights,
        "positions": positions,
        "segment_ids": segments,
    }


def _pair_batch(rng, vocab, B, L) -> dict:
    out = {}
    for side in ("chosen", "rejected"):
        lengths = rng.integers(L // 2, L + 1, B)
        mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
        out[f"{side}_tokens"] = (rng.integers(3, vocab, (B, L)) * mask).astype(np.int32)
        out[f"{side}_mask"] = mask
        out[f"{side}_loss_mask"] = mask
    out["margin"] = np.zeros(B, np.float32)
    return out


def _rollout(rng, vocab, B, L) -> dict:
    prompt = L // 2
    end = prompt + rng.integers(L // 4, L - prompt + 1, B)
    i = np.arange(L)
    return {
        "tokens": rng.integers(3, vocab, (B, L)).astype(np.int32),
        "mask": (i < end[:, None]).astype(np.int32),
        "response_mask": ((i >= prompt) & (i < end[:, None]))[:, 1:].astype(np.int32),
        "no_eos": np.zeros(B, bool),
    }


def run(v: PosttrainVariant, peak: float | None, warmup: int, iters: int) -> dict:
    cfg = get_preset(
        v.preset, max_len=max(v.seq_len, get_preset(v.preset).max_len), **dict(v.model)
    )
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
    tx = make_optimizer(OptimConfig(total_steps=10_000))  # the schedule does not change the timing
    lm, rm = LanguageModel(cfg), RewardModel(cfg)
    example = jnp.zeros((1, 8), jnp.int32)
    rng = np.random.default_rng(0)
    extra = {}
    if v.stage == "sft":
        step, init = make_sft_step(lm, tx), lambda r: lm.init(r, example)["params"]
        batch, tokens = (
            _packed_sft_batch(rng, cfg.vocab_size, v.batch, v.seq_len),
            v.batch * v.seq_len,
        )
    elif v.stage == "reward":
        step, init = make_reward_step(rm, tx), lambda r: rm.init(r, example)["params"]
        batch, tokens = (
            _pair_batch(rng, cfg.vocab_size, v.batch, v.seq_len),
            2 * v.batch * v.seq_len,
        )
    else:
        ppo_cfg = PPOConfig(epochs=2, num_minibatches=2)
        step = make_ppo_step(lm, rm, tx, ppo_cfg)

        def init(r):
            return {
                "policy": lm.init(r, example)["params"],
                "value": rm.init(jax.random.fold_in(r, 1), example)["params"],
            }

        tokens = v.batch * v.seq_len
    boxed_init = lambda r: fake_params.replace_values(init(r))  # noqa: E731
    state, shardings = jax.block_until_ready(
        create_train_state(boxed_init, tx, mesh, jax.random.key(0))
    )
    if v.stage == "ppo":
        # The scoring pass of an iteration: policy/reference log-probs, values, GAE.
        reward_fn = lambda _, toks, mask, response: jnp.sum(response, axis=1).astype(jnp.float32)  # noqa: E731
        prepare = sharding.jit_sharded(
            make_prepare(lm, rm, reward_fn, ppo_cfg), mesh, in_shardings=None, out_shardings=None
        )
        rollout = _rollout(rng, cfg.vocab_size, v.batch, v.seq_len)
        args = (state.params, state.params["policy"], None, rollout, 0.05)
        with sharding.mesh_context(mesh):
            compiled_prepare, _ = compile_timed(prepare.jitted, *args)
        batch = jax.block_until_ready(compiled_prepare(*args))[0]
        prep_times = time_calls(lambda: compiled_prepare(*args)[0]["advantages"], warmup, iters)
        extra["score_ms"] = median(prep_times) * 1e3
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    jitted = sharding.jit_step(step, shardings, mesh)
    key = jax.random.key(1)
    with sharding.mesh_context(mesh):
        compiled, compile_s = compile_timed(jitted.jitted, state, batch, key)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch, key)
        return metrics["grad_norm"]

    times = time_calls(one_step, warmup, iters)
    t = median(times)
    row = {
        "bench": "posttrain",
        "variant": v.name,
        "step_ms": t * 1e3,
        "spread": spread(times),
        "tokens_per_s": tokens / t,
        "mem_GiB": (program_bytes(compiled) or 0) / 2**30,
        "compile_s": compile_s,
        **extra,
    }
    if v.stage == "sft" and peak:
        row["mfu"] = mfu(cfg, v.seq_len, tokens / t, peak)
    if v.stage == "ppo":
        # 2 epochs over the batch: each token goes through policy and value 2x fwd+bwd.
        row["tokens_per_s_per_epoch"] = 2 * tokens / t
    holder.clear()
    return row
