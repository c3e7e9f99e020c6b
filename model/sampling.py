"""Jitted KV-cache sampling: one prefill of the prompts, then one token per step.

The decode loop is a `lax.while_loop` over a cache preallocated for prompt +
new tokens, so a new token costs one single-position forward pass, never a
pass over the whole sequence. Prompts of different lengths share a batch:
they are right-padded, padding slots carry segment id 0 in the prefill, and
each row's generated tokens are written from its own length onwards. After the
prefill every slot is labelled as the token it will hold (`fill_slots_ahead`):
a padding slot stays unseen until its row's new token overwrites it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model.auto import use_transposed_decoding
from model.config import ModelConfig
from model.transformer import default_positions, fill_slots_ahead, init_cache

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1.0 means no nucleus filter
    eos_id: int | None = None  # stop a row once it emits this token
    pad_id: int = 0  # written after a row has stopped
    # The tokenizer's vocabulary, when the model has more ids than it (gpt2_124m's 50,257 over
    # a 50,000-piece tokenizer, shakespeare_char's 128 over ~70 characters): ids from here up
    # are never chosen. None: every id may be. RL stages leave it None, so that their
    # log-probs (rlhf/sequences.py) match the sampler's.
    vocab_size: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")


class Samples(NamedTuple):
    tokens_BT: jax.Array  # generated tokens, pad_id after a row's EOS
    logprobs_BT: jax.Array  # log-prob of each token under the filtered distribution
    lengths_B: jax.Array  # tokens generated per row, EOS included
    finished_B: jax.Array  # whether the row emitted EOS


def filter_logits(logits_BV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, top-k and top-p (nucleus, Holtzman et al. 2019) applied to logits.

    Returns float32 logits whose softmax is the sampling distribution; PPO
    recomputes log-probs with this same function so they match the sampler. Both cuts are
    by value: tokens tied with the last one kept are kept too (top-k as Hugging Face's
    warper; its top-p cuts ties by sort order instead, which no logit can justify).
    """
    logits = logits_BV.astype(jnp.float32) / max(temperature, 1e-6)
    if top_k:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, NEG_INF, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # smallest logit still inside the nucleus (the top token always is)
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_desc, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return logits


def _choose(logits_BV: jax.Array, rng: jax.Array | None, cfg: SamplingConfig):
    if cfg.vocab_size is not None and cfg.vocab_size < logits_BV.shape[-1]:
        in_vocab_V = jnp.arange(logits_BV.shape[-1]) < cfg.vocab_size
        logits_BV = jnp.where(in_vocab_V, logits_BV, NEG_INF)
    if cfg.temperature == 0:
        token_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        return token_B, jnp.zeros(token_B.shape, jnp.float32)
    logits = filter_logits(logits_BV, cfg.temperature, cfg.top_k, cfg.top_p)
    token_B = jax.random.categorical(rng, logits).astype(jnp.int32)
    logprob_B = jnp.take_along_axis(jax.nn.log_softmax(logits), token_B[:, None], -1)[:, 0]
    return token_B, logprob_B


def sample(
    model: nn.Module,
    params: Any,
    prompts_BP: jax.Array,
    prompt_lengths_B: jax.Array,
    rng: jax.Array,
    cfg: SamplingConfig,
) -> Samples:
    """Samples up to cfg.max_new_tokens after each right-padded prompt (pure; jit it)."""
    B, P = prompts_BP.shape
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    transposed = hasattr(model, "inference_form") and use_transposed_decoding(
        model.cfg, B, weight_bytes
    )
    if B == 1 and not transposed:
        # XLA's GPU compiler turns the product of ONE row with a weight matrix [in, out]
        # of fewer than ~10M elements into a multiply + reduce fusion that reads the
        # weights at about a third of the copy bandwidth; with two rows it stays a
        # matrix product. So one sequence is decoded as two identical rows: 2.02 ->
        # 1.61 ms/token for gpt-1.3b on an H100 (BENCHMARKS.md, change 10). The
        # transposed form reads [out, in] weights along their rows instead.
        twice = lambda a: jnp.concatenate([a, a])  # noqa: E731
        rows = sample(model, params, twice(prompts_BP), twice(prompt_lengths_B), rng, cfg)
        return jax.tree.map(lambda a: a[:1], rows)
    if hasattr(model, "inference_form"):
        # Once here, not every token: LoRA adapters merged (train/lora.py), scanned
        # layers split into separate ones, the weights transposed (model/transformer.py).
        model, params = model.inference_form(params, transposed)
    T = cfg.max_new_tokens
    model_cfg = model.cfg
    if cfg.vocab_size is not None and not 0 < cfg.vocab_size <= model_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer's {cfg.vocab_size} ids do not fit the model's {model_cfg.vocab_size}"
        )
    if cfg.top_k > model_cfg.vocab_size:
        raise ValueError(f"top_k {cfg.top_k} exceeds the vocabulary ({model_cfg.vocab_size})")
    if P + T > model_cfg.max_len and model_cfg.positional == "learned":
        raise ValueError(
            f"prompt length {P} + max_new_tokens {T} exceeds max_len {model_cfg.max_len}"
        )
    apply = lambda tokens, positions, segments, cache: model.apply(  # noqa: E731
        {"params": params}, tokens, positions, segments, cache=cache
    )

    positions_BP = default_positions(prompts_BP)
    segments_BP = (positions_BP < prompt_lengths_B[:, None]).astype(jnp.int32)
    logits_BPV, cache = apply(
        prompts_BP, positions_BP, segments_BP, init_cache(model_cfg, B, P + T)
    )
    cache = fill_slots_ahead(cache)  # each new token's slot is its position
    last_B = jnp.maximum(prompt_lengths_B - 1, 0)
    logits_BV = jnp.take_along_axis(logits_BPV, last_B[:, None, None], axis=1)[:, 0]

    def cond(carry):
        t, _, _, _, finished_B, _ = carry
        return (t < T) & ~jnp.all(finished_B)

    def body(carry):
        t, logits_BV, cache, (tokens_BT, logprobs_BT), finished_B, rng = carry
        # what only sampling (temperature > 0) or an EOS needs is not computed for the others
        if cfg.temperature > 0:
            rng, step_rng = jax.random.split(rng)
            token_B, logprob_B = _choose(logits_BV, step_rng, cfg)
            logprobs_BT = logprobs_BT.at[:, t].set(jnp.where(finished_B, 0.0, logprob_B))
        else:  # greedy: its log-probs are the zeros already there
            token_B, _ = _choose(logits_BV, None, cfg)
        if cfg.eos_id is not None:  # (else no row ever finishes)
            token_B = jnp.where(finished_B, cfg.pad_id, token_B)
            finished_B = finished_B | (token_B == cfg.eos_id)
        out = (tokens_BT.at[:, t].set(token_B), logprobs_BT)
        positions_B1 = (prompt_lengths_B + t)[:, None]
        logits_B1V, cache = apply(
            token_B[:, None], positions_B1, jnp.ones_like(positions_B1), cache
        )
        return t + 1, logits_B1V[:, 0], cache, out, finished_B, rng

    out = (jnp.full((B, T), cfg.pad_id, jnp.int32), jnp.zeros((B, T), jnp.float32))
    finished_B = jnp.zeros((B,), bool)
    carry = (jnp.int32(0), logits_BV, cache, out, finished_B, rng)
    steps, _, _, (tokens_BT, logprobs_BT), finished_B, _ = jax.lax.while_loop(cond, body, carry)
    # Lengths from the tokens, not counted every step: a finished row ends at its first
    # EOS (pad_id may equal eos_id: pads come after it), the others ran every step.
    lengths_B = jnp.full((B,), steps, jnp.int32)
    if cfg.eos_id is not None:
        first_eos_B = jnp.argmax(tokens_BT == cfg.eos_id, axis=1).astype(jnp.int32)
        lengths_B = jnp.where(finished_B, first_eos_B + 1, lengths_B)
    return Samples(tokens_BT, logprobs_BT, lengths_B, finished_B)


def fitting_new_tokens(model_cfg: ModelConfig, prompt_tokens: int, wanted: int) -> int:
    """At most `wanted` new tokens: all of them with RoPE, and what a model with learned
    positions has left after a prompt of `prompt_tokens` (bos included). ValueError when
    the prompt leaves none."""
    if model_cfg.positional != "learned":
        return wanted
    if prompt_tokens >= model_cfg.max_len:
        raise ValueError(
            f"the prompt takes {prompt_tokens} of the model's {model_cfg.max_len} positions, "
            "leaving none to generate: shorten the prompt"
        )
    return min(wanted, model_cfg.max_len - prompt_tokens)


def make_sampler(model: nn.Module, cfg: SamplingConfig) -> Callable[..., Samples]:
    """jitted `sampler(params, prompts_BP, prompt_lengths_B, rng) -> Samples`.

    Called inside `train.sharding.mesh_context(mesh)` with sharded parameters,
    it shards activations and the cache like training.
    """
    return jax.jit(
        lambda params, prompts, lengths, rng: sample(model, params, prompts, lengths, rng, cfg)
    )


def sample_texts(
    sampler: Callable,
    params: Any,
    tokenizer: Any,  # data.tokenizer's kinds (encode, decode, pad_id), a layer above model/
    prompts: Sequence[str | Sequence[int]],
    rng: jax.Array,
    stop_id: int | None = None,
    width: int = 0,
) -> list[str]:
    """Samples after each prompt, text (encoded after bos) or ids as they go in (a rendered
    chat, rlhf/chat.py), and decodes each continuation up to its stop token: `stop_id`, the
    sampler's EOS, by default the tokenizer's. The prompts are right-padded to their longest,
    or to `width` if longer (the sampler compiles once per width)."""
    stop_id = tokenizer.eos_id if stop_id is None else stop_id
    encoded = [
        [tokenizer.bos_id, *tokenizer.encode(p)] if isinstance(p, str) else list(p) for p in prompts
    ]
    width = max(width, *(len(e) for e in encoded))
    prompts_BP = np.full((len(encoded), width), tokenizer.pad_id, np.int32)
    for row, ids in enumerate(encoded):
        prompts_BP[row, : len(ids)] = ids
    lengths_B = np.asarray([len(e) for e in encoded], np.int32)
    out = jax.device_get(sampler(params, prompts_BP, lengths_B, rng))
    return [
        tokenizer.decode([int(t) for t in out.tokens_BT[i, : out.lengths_B[i]] if t != stop_id])
        for i in range(len(prompts))
    ]
