"""A fake tokenizer and tiny models for the post-training tests."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.transformer import LanguageModel
from rlhf.reward_model import RewardModel

SPECIALS = {"<|system|>": 3, "<|user|>": 4, "<|assistant|>": 5, "<|end|>": 6}
OFFSET = 7  # byte b is token OFFSET + b


class FakeTokenizer:
    """Bytes plus pad=0, bos=1, eos=2 and the four chat tokens; vocabulary 263."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = OFFSET + 256

    def encode(self, text, *, match_special=True):  # no special token is ever text here
        return [OFFSET + b for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode("utf-8", errors="replace")

    def special_id(self, name):
        return SPECIALS[name]


# Two heads and even sizes so that tensor=2 divides every split dimension.
TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=64)
CHAT = TINY.replace(vocab_size=264)


def _init(model, seed):
    # jitted: an eager init of even a tiny transformer dispatches hundreds of ops.
    init = jax.jit(lambda rng: nn.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]))
    return model, init(jax.random.key(seed))


@functools.cache
def init_lm(cfg=TINY, seed=0):
    """(LanguageModel, unboxed params); cached, so treat the params as read-only."""
    return _init(LanguageModel(cfg), seed)


@functools.cache
def init_rm(cfg=TINY, seed=1):
    """(RewardModel, unboxed params); cached, so treat the params as read-only."""
    return _init(RewardModel(cfg), seed)
