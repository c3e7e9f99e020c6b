"""Greedy decoding with the model's KV cache: a jitted prefill, then a fori_loop of one-token steps.

Roofline: each decoded token must read every weight once (bf16) plus the keys
and values written so far; that many bytes over the measured copy bandwidth
is the shortest possible time per step. The fraction reported is that time
over the measured time per step.
"""

from __future__ import annotations

import dataclasses
import gc

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.bench.timing import compile_timed, median, program_bytes, time_calls
from model.config import ModelConfig, get_preset
from model.transformer import LanguageModel, default_positions, init_cache


@dataclasses.dataclass(frozen=True)
class DecodeVariant:
    preset: str
    batch: int
    prompt_len: int = 128
    new_tokens: int = 256
    model: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.model)
        name = f"{self.preset}/b{self.batch}/p{self.prompt_len}+{self.new_tokens}"
        return name + (f"[{extra}]" if extra else "")


def make_fns(model: LanguageModel, cfg: ModelConfig, v: DecodeVariant):
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


def bytes_per_step(cfg: ModelConfig, params, v: DecodeVariant) -> float:
    """bf16 weights read once (position table: one row) + mean KV bytes attended per step."""
    weights = sum(x.size for x in jax.tree.leaves(params)) * 2
    if cfg.positional == "learned":
        weights -= cfg.max_len * cfg.d_model * 2
    mean_context = v.prompt_len + (v.new_tokens + 1) / 2
    kv = 2 * cfg.n_layers * v.batch * mean_context * cfg.kv_heads * cfg.head_dim * 2
    return weights + kv


def greedy_agreement(model: LanguageModel, params, prompt_BP, first_B, out_BN) -> float:
    """Fraction of decoded tokens equal to the argmax of one cache-free forward pass over
    prompt + decoded tokens (1.0 in exact arithmetic; bf16 near-ties can flip a few)."""
    seq = jnp.concatenate([prompt_BP, first_B[:, None], out_BN[:, :-1]], axis=1)
    logits = jax.jit(model.apply)({"params": params}, seq)
    want = jnp.argmax(logits[:, prompt_BP.shape[1]:], -1)
    return float(jnp.mean(want == out_BN))


def run(v: DecodeVariant, copy_GBps: float | None, warmup: int, iters: int) -> dict:
    cfg = get_preset(v.preset, **dict(v.model))
    model = LanguageModel(cfg)
    init = jax.jit(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"])
    params = nn.unbox(init(jax.random.key(0)))
    params = jax.tree.map(lambda x: x.astype(cfg.compute_dtype), params)  # serve bf16 weights
    prompt_shape = (v.batch, v.prompt_len)
    prompt = jax.random.randint(jax.random.key(1), prompt_shape, 0, cfg.vocab_size, jnp.int32)
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
    step_s = t / v.new_tokens
    need = bytes_per_step(cfg, params, v)
    row = {
        "bench": "decode", "variant": v.name, "step_ms": step_s * 1e3,
        "tokens_per_s": v.batch * v.new_tokens / t,
        "prefill_tokens_per_s": v.batch * v.prompt_len / t_prefill,
        "bytes_per_step_GB": need / 1e9,
        "roofline_frac": need / (copy_GBps * 1e9) / step_s if copy_GBps else None,
        "greedy_agree": agree,
        "mem_GiB": (program_bytes(decode_c) or 0) / 2**30,
        "compile_s": compile_s + prefill_compile_s, "iters": iters,
    }
    gc.collect()
    return row
