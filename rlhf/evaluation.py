"""Generation on the host side and the held-out ground truth of a policy.

`generate` runs the jitted KV-cache sampler over a list of prompts in batches of one fixed
shape (one compilation); `ground_truth_of` decodes the answers and checks them with
`rlhf.ground_truth` (parsed, never executed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from rlhf.chat import ChatTokens, Tokenizer
from rlhf.ground_truth import ground_truth
from rlhf.rollout import prompt_batch, response_ids
from rlhf.stage import StageContext
from rlhf.verifier import Reference
from train import sharding


def generate(
    rollout_fn: Callable,
    params: Any,
    prompts: list,
    prompt_len: int,
    pad_id: int,
    batch_size: int,
    mesh: Mesh,
    seed: int,
    score_fn: Callable | None = None,
    reward_params: Any = None,
) -> list[dict]:
    """Rollouts (numpy, on every process) for every prompt; with
    `score_fn(reward_params, tokens, mask)` each also holds the "score" of every row."""
    results = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        n = len(chunk)
        chunk += [chunk[0]] * (batch_size - n)  # a fixed batch shape: one compilation
        prompts_BP, lengths_B = prompt_batch(chunk, pad_id, prompt_len)
        batch = sharding.full_to_global({"prompts": prompts_BP, "lengths": lengths_B}, mesh)
        with sharding.mesh_context(mesh):
            out = rollout_fn(params, batch["prompts"], batch["lengths"], jax.random.key(seed + i))
            if score_fn is not None:
                out["score"] = score_fn(reward_params, out["tokens"], out["mask"])
        results.append({k: np.asarray(v)[:n] for k, v in sharding.to_host(out).items()})
    return results


def ground_truth_of(
    rollout_fn: Callable,
    params: Any,
    records: list[dict],
    prompts: list,
    tokenizer: Tokenizer,
    prompt_len: int,
    batch_size: int,
    mesh: Mesh,
    seed: int,
    score_fn: Callable | None = None,
    reward_params: Any = None,
) -> dict[str, Any]:
    """Ground truth on held-out prompts (parse rate, defines the requested name, ... and the
    reward model's mean score when `score_fn` is given), with three example answers."""
    end = ChatTokens.from_tokenizer(tokenizer).end
    rollouts = generate(
        rollout_fn,
        params,
        prompts,
        prompt_len,
        tokenizer.pad_id,
        batch_size,
        mesh,
        seed,
        score_fn,
        reward_params,
    )
    answers = [tokenizer.decode(ids) for r in rollouts for ids in response_ids(r, end)]
    scores = np.concatenate([r["score"] for r in rollouts]).tolist() if score_fn else None
    references = [Reference.from_sft_record(r) for r in records]
    stopped = np.concatenate([~np.asarray(r["no_eos"]) for r in rollouts]).tolist()
    result = ground_truth(
        answers, [r["name"] for r in records], scores, references, stopped=stopped
    )
    result["examples"] = answers[:3]
    return result


def eval_metrics(ground_truth: dict[str, Any]) -> dict[str, float]:
    """A ground-truth result's numbers as the loop's `eval/` metrics."""
    return {f"eval/{k}": v for k, v in ground_truth.items() if isinstance(v, float)}


def check_eval_config(ec: Any) -> None:
    """The `eval` section's values, checked before any stage trains (the evaluation runs
    after training, where a bad value would cost the whole stage)."""
    problems = [
        f"eval.{name} must be >= 1, got {ec[name]}"
        for name in ("num_prompts", "batch_size", "max_prompt_len", "max_new_tokens")
        if ec[name] < 1
    ]
    if ec.temperature < 0:
        problems.append(f"eval.temperature must be >= 0, got {ec.temperature}")
    if problems:
        raise ValueError("; ".join(problems))


def held_out_evaluator(
    ctx: StageContext, data: dict, lm: nn.Module, tokenizer: Tokenizer
) -> Callable[[Any], dict[str, Any]]:
    """`policy_params -> ground truth` on the first `eval.num_prompts` held-out prompts,
    greedy at `eval.temperature`, scored by DIR/reward's model when that stage exists."""
    from model.sampling import SamplingConfig
    from rlhf import datasets
    from rlhf.reward_model import RewardModel, sequence_reward
    from rlhf.rollout import make_rollout

    ec = ctx.config.eval
    check_eval_config(ec)
    prompts, records = datasets.prompts_of(data["sft_eval"], tokenizer, ec.max_prompt_len)
    prompts, records = prompts[: ec.num_prompts], records[: ec.num_prompts]
    sampling = SamplingConfig(
        max_new_tokens=ec.max_new_tokens,
        temperature=ec.temperature,
        eos_id=ChatTokens.from_tokenizer(tokenizer).end,
        pad_id=tokenizer.pad_id,
    )
    rollout = make_rollout(lm, sampling)
    score_fn = reward_params = None
    if (ctx.root / "reward" / "checkpoints").is_dir():
        rm = RewardModel(lm.cfg)
        reward_params = ctx.load_reward(lm.cfg, trains_on_it=False)
        score_fn = jax.jit(lambda p, t, m: sequence_reward(rm, p, t, m))
    return lambda params: ground_truth_of(
        rollout,
        params,
        records,
        prompts,
        tokenizer,
        ec.max_prompt_len,
        ec.batch_size,
        ctx.mesh,
        ctx.config.seed + 7,
        score_fn,
        reward_params,
    )
