"""Greedy decoding with the model's KV cache, two ways.

loop="fori": this module's own jitted prefill, then a `lax.fori_loop` of
one-token steps (fixed trip count); the prefill is outside the timed region.
loop="sampler": the project's sampler (`model/sampling.py`, a `lax.while_loop`
that also stops on EOS); per-token time = (time for N tokens - time for 1) / (N - 1).

`greedy_agree` compares with one cache-free forward pass. With the benchmark's
hash-pattern weights (fake_params.py) the logits are nearly flat, so bf16 near-ties
flip some tokens; it is a correctness signal only with real weights or float32.

Roofline: each decoded token must read every weight once (bf16) plus the keys
and values written so far; that many bytes over the measured copy bandwidth
is the shortest possible time per step. The fraction reported is that time
over the measured time per step.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.bench import fake_params, profile
from experiments.bench.timing import compile_timed, median, program_bytes, time_calls
from model.config import ModelConfig, get_preset
from model.sampling import SamplingConfig, sample
from model.transformer import LanguageModel, default_positions, init_cache


@dataclasses.dataclass(frozen=True)
class DecodeVariant:
    preset: str
    batch: int
    prompt_len: int = 128
    new_tokens: int = 256
    model: tuple[tuple[str, object], ...] = ()
    loop: str = "fori"  # "fori" or "sampler", see the module docstring

    @property
    def name(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.model)
        name = f"{self.preset}/{self.loop}/b{self.batch}/p{self.prompt_len}+{self.new_tokens}"
        return name + (f"[{extra}]" if extra else "")


def make_fns(model: LanguageModel, cfg: ModelConfig, v: DecodeVariant) -> tuple[Callable, Callable]:
    cache_len = v.prompt_len + v.new_tokens

    def prefill(params, prompt_BP):
        cache = init_cache(cfg, prompt_BP.shape[0], cache_len)
        positions_BP = default_positions(prompt_BP)
        logits, cache = model.apply({"params": params}, prompt_BP, positions_BP, cache=cache)
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

    def decode(params, first_B, cache):
        def body(i, carry):
            token_B, cache, out_BN = carry
            pos_B1 = jnp.full((token_B.shape[0], 1), v.prompt_len + i, jnp.int32)
            logits, cache = model.apply({"params": params}, token_B[:, None], pos_B1, cache=cache)
            token_B = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
            return token_B, cache, out_BN.at[:, i].set(token_B)

        out_BN = jnp.zeros((first_B.shape[0], v.new_tokens), jnp.int32)
        _, cache, out_BN = jax.lax.fori_loop(0, v.new_tokens, body, (first_B, cache, out_BN))
        return out_BN, cache

    return jax.jit(prefill), jax.jit(decode, donate_argnums=2)


def bytes_per_step(cfg: ModelConfig, params: Any, v: DecodeVariant) -> float:
    """bf16 weights read once (position table: one row) + mean KV bytes attended per step."""
    weights = sum(x.size for x in jax.tree.leaves(params)) * 2
    if cfg.positional == "learned":
        weights -= cfg.max_len * cfg.d_model * 2
    mean_context = v.prompt_len + (v.new_tokens + 1) / 2
    kv = 2 * cfg.n_layers * v.batch * mean_context * cfg.kv_heads * cfg.head_dim * 2
    return weights + kv


def greedy_agreement(
    model: LanguageModel, params: Any, prompt_BP: jax.Array, first_B: jax.Array, out_BN: jax.Array
) -> float:
    """Fraction of decoded tokens equal to the argmax of one cache-free forward pass over
    prompt + decoded tokens (1.0 in exact arithmetic; bf16 near-ties can flip a few)."""
    seq = jnp.concatenate([prompt_BP, first_B[:, None], out_BN[:, :-1]], axis=1)
    logits = jax.jit(model.apply)({"params": params}, seq)
    want = jnp.argmax(logits[:, prompt_BP.shape[1] :], -1)
    return int(jnp.sum(want == out_BN)) / out_BN.size


def _setup(v: DecodeVariant):
    cfg = get_preset(v.preset, **dict(v.model))
    model = LanguageModel(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    init = jax.jit(lambda r: fake_params.replace_values(model.init(r, tokens)["params"]))
    params = nn.unbox(init(jax.random.key(0)))
    params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), params)  # serve bf16 weights
    prompt_shape = (v.batch, v.prompt_len)
    prompt = jax.random.randint(jax.random.key(1), prompt_shape, 0, cfg.vocab_size, jnp.int32)
    return cfg, model, params, prompt


def _row(v, cfg, params, step_s, copy_GBps, **extra) -> dict:
    need = bytes_per_step(cfg, params, v)
    return {
        "bench": "decode",
        "variant": v.name,
        "step_ms": step_s * 1e3,
        "tokens_per_s": v.batch / step_s,
        "bytes_per_step_GB": need / 1e9,
        "roofline_frac": need / (copy_GBps * 1e9) / step_s if copy_GBps else None,
        **extra,
    }


def run_sampler(v: DecodeVariant, copy_GBps: float | None, iters: int) -> dict:
    """The project's sampler, greedy, no EOS: every row decodes all N tokens."""
    cfg, model, params, prompt = _setup(v)
    lengths = jnp.full((v.batch,), v.prompt_len, jnp.int32)
    rng = jax.random.key(2)
    times, compile_s, outs = {}, 0.0, {}
    for n in (1, v.new_tokens):
        greedy = SamplingConfig(max_new_tokens=n, temperature=0)
        sampler = jax.jit(partial(sample, model, cfg=greedy))
        compiled, seconds = compile_timed(sampler, params, prompt, lengths, rng)
        compile_s += seconds
        times[n] = median(time_calls(lambda c=compiled: c(params, prompt, lengths, rng), 2, iters))
        outs[n] = compiled(params, prompt, lengths, rng).tokens_BT
    step_s = (times[v.new_tokens] - times[1]) / (v.new_tokens - 1)
    out = outs[v.new_tokens]
    agree = greedy_agreement(model, params, prompt, out[:, 0], out[:, 1:])
    gc.collect()
    return _row(
        v,
        cfg,
        params,
        step_s,
        copy_GBps,
        greedy_agree=agree,
        compile_s=compile_s,
        prefill_plus_one_ms=times[1] * 1e3,
        iters=iters,
    )


def run(
    v: DecodeVariant,
    copy_GBps: float | None,
    warmup: int,
    iters: int,
    profile_dir: str | None = None,
) -> dict:
    if v.loop == "sampler":
        return run_sampler(v, copy_GBps, iters)
    cfg, model, params, prompt = _setup(v)
    prefill, decode = make_fns(model, cfg, v)
    prefill_c, prefill_compile_s = compile_timed(prefill, params, prompt)
    first, cache = prefill_c(params, prompt)
    decode_c, compile_s = compile_timed(decode, params, first, cache)
    t_prefill = median(time_calls(lambda: prefill_c(params, prompt), 2, iters))
    holder = {}

    def one_decode():
        # a fresh cache each time (the decode call donates it); prefill is outside the timed region
        first, cache = holder["prefilled"]
        out, _ = decode_c(params, first, cache)
        return out

    times = []
    for _ in range(warmup + iters):
        holder["prefilled"] = jax.block_until_ready(prefill_c(params, prompt))
        times += time_calls(one_decode, 0, 1)
    t = median(times[warmup:])
    holder["prefilled"] = prefill_c(params, prompt)
    agree = greedy_agreement(model, params, prompt, holder["prefilled"][0], one_decode())
    row = _row(
        v,
        cfg,
        params,
        t / v.new_tokens,
        copy_GBps,
        greedy_agree=agree,
        prefill_tokens_per_s=v.batch * v.prompt_len / t_prefill,
        mem_GiB=(program_bytes(decode_c) or 0) / 2**30,
        compile_s=compile_s + prefill_compile_s,
        iters=iters,
    )
    if profile_dir:  # prefill + decode under the profiler

        def prefill_and_decode():
            holder["prefilled"] = prefill_c(params, prompt)
            return one_decode()

        row["profile"] = profile.trace(prefill_and_decode, 1, profile_dir, decode_c.as_text())
    gc.collect()
    return row
