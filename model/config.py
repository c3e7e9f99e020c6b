"""Model configuration and named presets.

A `ModelConfig` is a frozen dataclass validated at construction, so a bad
value fails before any array is allocated, with a message naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

Positional = Literal["learned", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "swiglu"]
RopeScaling = Literal["none", "linear", "llama3"]
AttentionBackend = Literal["auto", "reference", "xla", "cudnn", "pallas"]
NormImpl = Literal["auto", "xla", "pallas"]
ActivationImpl = Literal["auto", "xla", "pallas"]
CrossEntropyImpl = Literal["auto", "xla", "pallas", "fused"]
DecodeAttention = Literal["auto", "reference", "pallas"]
DecodeMatmul = Literal["auto", "xla", "pallas", "transposed"]
WeightsLayout = Literal["in_out", "out_in"]
HeadMatmul = Literal["compute", "fp8"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]

_CHOICES = {
    "positional": ("learned", "rope"),
    "norm": ("layernorm", "rmsnorm"),
    "activation": ("gelu", "swiglu"),
    "rope_scaling": ("none", "linear", "llama3"),
    "attention_backend": ("auto", "reference", "xla", "cudnn", "pallas"),
    "norm_impl": ("auto", "xla", "pallas"),
    "activation_impl": ("auto", "xla", "pallas"),
    "cross_entropy_impl": ("auto", "xla", "pallas", "fused"),
    "decode_attention": ("auto", "reference", "pallas"),
    "decode_matmul": ("auto", "xla", "pallas", "transposed"),
    "weights_layout": ("in_out", "out_in"),
    "head_matmul": ("compute", "fp8"),
    "remat": ("none", "full", "dots", "dots_no_batch"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    `attention_backend`: "reference" is the hand-written attention (the
    definition every other backend is tested against); "xla" and "cudnn" call
    `jax.nn.dot_product_attention` with that implementation (cuDNN flash
    attention needs a GPU and bf16/fp16); "pallas" is the flash-attention kernel
    that takes segment ids (`model/kernels/flash_attention.py`); "auto" picks the
    fastest correct one on a GPU and the reference elsewhere
    (`model.auto.choose_backend`).

    `norm_impl`, `activation_impl`, `cross_entropy_impl`, `decode_attention` and
    `decode_matmul` set to "pallas" use the hand-written GPU kernels in `model/kernels/`
    for the norms, the GELU MLP's bias + activation, the cross-entropy of pretraining and
    evaluation, and one-token decoding steps' attention and matrix products
    (BENCHMARKS.md measures them against the XLA/reference paths);
    `cross_entropy_impl="fused"` has the pretraining loss apply the output head itself,
    fused with a single-pass cross-entropy kernel whose backward pass never reads the
    logits (`model/kernels/fused_head.py`; evaluation uses "pallas" there). "auto", the
    default for all five,
    picks them on a GPU where they were measured faster and the XLA/reference
    code elsewhere (`model/auto.py`, the one place every "auto" is resolved).
    `decode_matmul="transposed"` decodes one sequence as one row whose products are XLA
    reductions along the rows of weights the sampler transposes once, before its loop, to
    [outputs, inputs] (`weights_layout="out_in"`, `LanguageModel.inference_form`): each
    reads its weight in contiguous rows, near the GPU's read bandwidth, at the cost of a
    second copy of the weights while sampling.

    The embedding table and output head have `padded_vocab` rows, vocab_size
    rounded up to `vocab_multiple` because matrix products with a multiple of
    128 columns run faster (GPT-2's 50257 -> 50304: 157 -> 131 ms per training
    step on an H200, BENCHMARKS.md); the extra rows are internal: their logits
    are masked, so they are never sampled and carry no probability, and HF
    export drops them.

    `head_matmul="fp8"` computes the pretraining loss's output-head products (forward and
    both gradients) in float8 with per-tensor scales, fused with the cross-entropy kernels
    (`model/kernels/fp8_head.py`): about twice bf16's rate on Hopper GPUs, at about a
    percent of precision in the loss and its gradients (BENCHMARKS.md, round thirteen).
    Opt-in, since it changes the numbers; evaluation, fine-tuning and sampling keep the
    compute dtype ("compute", the default).

    `d_head` is the width of one attention head; None means d_model // n_heads
    (`head_dim` is the effective value). `rope_scaling` stretches RoPE's
    wavelengths for long contexts as Hugging Face's rope_type does: "linear"
    divides every frequency by `rope_factor`; "llama3" (Llama 3.1) divides
    the low frequencies by it, keeps the high ones and blends in between, the
    bands set by `rope_low_freq_factor`, `rope_high_freq_factor` and
    `rope_original_max_len`.

    `scan_layers` stacks the blocks' parameters on a leading layer axis and runs the
    blocks as one `lax.scan`; `scan_unroll` layers run per iteration of its loop, and 0
    unrolls it completely: straight-line code as fast as unscanned layers, with the
    stacked parameters' fewer, larger arrays (a shorter compile and optimizer update).
    """

    vocab_size: int = 256
    vocab_multiple: int = 128  # embedding/head rows: vocab_size rounded up to this
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head)
    d_head: int | None = None  # None: d_model // n_heads
    d_ff: int = 256
    max_len: int = 128
    positional: Positional = "learned"
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    activation: Activation = "gelu"
    use_bias: bool = False
    tie_embeddings: bool = True
    dropout_rate: float = 0.0  # embeddings and both residual branches, while training
    attention_dropout: float = 0.0  # attention probabilities, while training (reference path)
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: RematPolicy = "none"
    scan_layers: bool = False
    scan_unroll: int = 1  # layers per iteration of the layer scan; 0: all of them
    attention_backend: AttentionBackend = "auto"
    norm_impl: NormImpl = "auto"
    activation_impl: ActivationImpl = "auto"
    cross_entropy_impl: CrossEntropyImpl = "auto"  # the training loss on this model's logits
    decode_attention: DecodeAttention = "auto"
    decode_matmul: DecodeMatmul = "auto"
    # how the matrix products' weights are stored: [inputs, outputs] as trained, or
    # [outputs, inputs], the sampler's form for decode_matmul="transposed"
    weights_layout: WeightsLayout = "in_out"
    head_matmul: HeadMatmul = "compute"  # "fp8": the pretraining loss's head in float8

    def __post_init__(self):
        for field, allowed in _CHOICES.items():
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"ModelConfig.{field}={value!r} is not one of {allowed}")
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
            if getattr(self, field) <= 0:
                raise ValueError(
                    f"ModelConfig.{field} must be positive, got {getattr(self, field)}"
                )
        if self.d_head is None and self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig: n_heads={self.n_heads} does not divide d_model={self.d_model}"
                " (or set d_head)"
            )
        if self.d_head is not None and self.d_head <= 0:
            raise ValueError(f"ModelConfig.d_head must be positive or None, got {self.d_head}")
        if self.kv_heads <= 0 or self.n_heads % self.kv_heads:
            raise ValueError(
                f"ModelConfig: n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}"
            )
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig: RoPE needs an even head_dim, got {self.head_dim}")
        if self.scan_unroll < 0:
            raise ValueError(
                "ModelConfig.scan_unroll must be >= 0 (0 unrolls every layer), "
                f"got {self.scan_unroll}"
            )
        for field in ("dropout_rate", "attention_dropout"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(
                    f"ModelConfig.{field} must be in [0, 1), got {getattr(self, field)}"
                )
        self._check_rope_scaling()
        if self.vocab_multiple <= 0:
            raise ValueError(
                f"ModelConfig.vocab_multiple must be positive, got {self.vocab_multiple}"
            )

    def _check_rope_scaling(self):
        if self.rope_scaling == "none":
            return
        if self.positional != "rope":
            raise ValueError(
                f"ModelConfig.rope_scaling={self.rope_scaling!r} needs positional='rope'"
            )
        if self.rope_factor < 1.0:
            raise ValueError(f"ModelConfig.rope_factor must be >= 1, got {self.rope_factor}")
        if self.rope_scaling == "llama3":
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                raise ValueError(
                    "ModelConfig: rope_low_freq_factor must be positive and below "
                    f"rope_high_freq_factor, got {self.rope_low_freq_factor} and "
                    f"{self.rope_high_freq_factor}"
                )
            if self.rope_original_max_len <= 0:
                raise ValueError(
                    "ModelConfig.rope_original_max_len must be positive, "
                    f"got {self.rope_original_max_len}"
                )

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.d_head is None else self.d_head

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


# GPT-2 exactly (Radford et al. 2019, as published): biases everywhere and the
# 50257-token vocabulary (padded to 50304 internally), so its checkpoints load and
# export unchanged.
_GPT2 = dict(
    vocab_size=50257,
    use_bias=True,
    max_len=1024,
    positional="learned",
    norm="layernorm",
    activation="gelu",
    tie_embeddings=True,
    dtype="bfloat16",
)

PRESETS: dict[str, ModelConfig] = {
    # Small enough to train in seconds on one CPU core; the unit tests use it.
    "tiny": ModelConfig(),
    "tiny-llama": ModelConfig(
        n_kv_heads=2,
        positional="rope",
        norm="rmsnorm",
        activation="swiglu",
        tie_embeddings=False,
    ),
    "gpt2-124m": ModelConfig(d_model=768, n_layers=12, n_heads=12, d_ff=3072, **_GPT2),
    "gpt2-350m": ModelConfig(d_model=1024, n_layers=24, n_heads=16, d_ff=4096, **_GPT2),
    # GPT-3 XL shape (Brown et al. 2020, table 2.1): 1.3B parameters, context 2048.
    "gpt-1.3b": ModelConfig(
        d_model=2048,
        n_layers=24,
        n_heads=16,
        d_ff=8192,
        # 50257 rounded up to a multiple of 128 for fast matmuls; no biases
        **{**_GPT2, "max_len": 2048, "vocab_size": 50304, "use_bias": False},
    ),
    # Llama-3.2-1B-like trunk with this project's 32k sentencepiece vocabulary.
    "llama-1b": ModelConfig(
        vocab_size=32768,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        d_ff=8192,
        max_len=2048,
        positional="rope",
        rope_theta=500_000.0,
        norm="rmsnorm",
        activation="swiglu",
        tie_embeddings=False,
        dtype="bfloat16",
    ),
    # Llama-2-7B shape (Touvron et al. 2023): 6.7B parameters, multi-head attention,
    # context 4096. With float32 Adam state it needs ~100 GB before activations, more
    # than one GPU holds unsharded, so it always trains with remat, scanned layers, FSDP.
    "llama-7b": ModelConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        d_ff=11008,
        max_len=4096,
        positional="rope",
        norm="rmsnorm",
        activation="swiglu",
        tie_embeddings=False,
        dtype="bfloat16",
        remat="dots",
        scan_layers=True,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    """Returns the named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
