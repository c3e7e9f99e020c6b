"""Training FLOPs per token and model FLOPs utilisation (MFU).

FLOPs per trained token = 6 * N + 12 * n_layers * n_heads * head_dim * T

  N  = parameters that take part in a matrix multiply for every token: all
       block weights plus the output head (vocab x d_model, counted once
       whether tied or not). The token and position lookups are gathers and
       cost no multiply; norm gains and biases are negligible and left out.
  6  = 2 FLOPs per multiply-add, times 3 for forward + backward (the backward
       pass does twice the forward work).
  12 * L * H * Dh * T = the attention scores and the weighted sum of values
       (2 matmuls of 2*T*H*Dh FLOPs each per token, times 3), counted over the
       full T x T square as in PaLM (Chowdhery et al. 2022, appendix B) and
       nanoGPT's estimate_mfu, so numbers compare with theirs.

MFU = achieved model FLOP/s / peak FLOP/s (Chowdhery et al. 2022). The
model FLOPs exclude recomputation by remat, so remat lowers MFU honestly.
"""

from __future__ import annotations

from model.config import ModelConfig

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s per chip.
PEAK_FLOPS = {
    "h100-sxm": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu-v4": 275e12,
    "tpu-v5e": 197e12,
    "tpu-v5p": 459e12,
}


def peak_flops_of(device_kind: str) -> float | None:
    """Dense bf16 peak of one device from jax's `device_kind` string; None if unknown."""
    kind = device_kind.lower()
    for needle, key in (
        ("h100", "h100-sxm"),
        ("h200", "h200"),
        ("a100", "a100"),
        ("v4", "tpu-v4"),
        ("v5 lite", "tpu-v5e"),
        ("v5e", "tpu-v5e"),
        ("v5p", "tpu-v5p"),
    ):
        if needle in kind:
            return PEAK_FLOPS[key]
    return None


def matmul_params(cfg: ModelConfig) -> int:
    """N above: parameters multiplied once per token in the forward pass."""
    d, f, h, g, dh = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    attention = d * h * dh * 2 + d * g * dh * 2  # query, out; key, value
    mlp = d * f * (3 if cfg.activation == "swiglu" else 2)
    return cfg.n_layers * (attention + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context `seq_len`."""
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6 * matmul_params(cfg) + attention


def mfu(cfg: ModelConfig, seq_len: int, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of `peak_flops` (for all devices together) in [0, 1]."""
    return flops_per_token(cfg, seq_len) * tokens_per_second / peak_flops
