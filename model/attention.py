"""Masked multi-head attention, written out by hand, with grouped-query heads and RoPE.

Shape letters: B batch, Q query length, K key length, H query heads,
G key/value heads (groups), R = H // G query heads per group, D head dim.

One boolean mask decides what a query sees. It is built from per-token
positions and segment ids (`attention_mask`): a query sees a key only if both
belong to the same document (segment id, 0 meaning padding) and the key's
position is not later than the query's. Because positions restart at 0 in
every packed document, the same rule is causality, padding and packing at
once, and it also covers a KV cache whose unwritten slots hold an impossible
position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.auto import choose_backend, choose_decode_attention
from model.config import ModelConfig
from model.kernels import flash_attention as flash
from model.kernels.decode_attention import decode_attention, supported
from model.layers import dense, dense_group, dense_param, group_kernel, is_decoding_step
from model.masking import MASK_VALUE, attention_mask


class LayerCache(NamedTuple):
    """Keys and values of one layer for every cache slot (already RoPE-rotated), and the
    decode attention kernel's arrival counts (int32 zeros between steps; see
    `model/kernels/decode_attention.py`)."""

    k_BSGD: jax.Array
    v_BSGD: jax.Array
    arrivals_BG: jax.Array


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """inv_freq_F (F = head_dim / 2): each dimension pair's angle per position.

    theta^(-2f/head_dim), then `cfg.rope_scaling` applied by Hugging Face's
    rules for rope_type "linear" and "llama3".
    """
    half = cfg.head_dim // 2
    inv_freq_F = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if cfg.rope_scaling == "linear":
        return inv_freq_F / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        wavelength_F = 2 * jnp.pi / inv_freq_F
        # original context / wavelength: how many turns a pair made in pretraining;
        # below low_freq_factor turns slowed by the factor, above high_freq_factor kept.
        turns_F = cfg.rope_original_max_len / wavelength_F
        blend_F = (turns_F - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        blend_F = jnp.clip(blend_F, 0.0, 1.0)
        return (1 - blend_F) * inv_freq_F / cfg.rope_factor + blend_F * inv_freq_F
    return inv_freq_F


def apply_rope(x_BLHD: jax.Array, positions_BL: jax.Array, inv_freq_F: jax.Array) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotate-half layout, in float32."""
    angles_BLF = positions_BL[..., None].astype(jnp.float32) * inv_freq_F
    sin_BL1F = jnp.sin(angles_BLF)[:, :, None, :]
    cos_BL1F = jnp.cos(angles_BLF)[:, :, None, :]
    x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BL1F - x2 * sin_BL1F, x2 * cos_BL1F + x1 * sin_BL1F], -1)
    return rotated.astype(x_BLHD.dtype)


def reference_attention(
    q_BQHD: jax.Array,
    k_BKGD: jax.Array,
    v_BKGD: jax.Array,
    mask_BQK: jax.Array,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(D), masked) v, scores and softmax in float32; `dropout`, if
    given, is applied to the probabilities (training with attention dropout)."""
    B, Q, H, D = q_BQHD.shape
    G = k_BKGD.shape[2]
    q_BQGRD = q_BQHD.reshape(B, Q, G, H // G, D)
    scores_BGRQK = jnp.einsum(
        "bqgrd,bkgd->bgrqk", q_BQGRD, k_BKGD, preferred_element_type=jnp.float32
    ) * (D**-0.5)
    scores_BGRQK = jnp.where(mask_BQK[:, None, None], scores_BGRQK, MASK_VALUE)
    probs_BGRQK = jax.nn.softmax(scores_BGRQK, axis=-1)
    if dropout is not None:
        probs_BGRQK = dropout(probs_BGRQK)
    probs_BGRQK = probs_BGRQK.astype(v_BKGD.dtype)
    out_BQGRD = jnp.einsum("bgrqk,bkgd->bqgrd", probs_BGRQK, v_BKGD)
    return out_BQGRD.reshape(B, Q, H, D)


def fused_attention(
    q_BQHD: jax.Array,
    k_BKGD: jax.Array,
    v_BKGD: jax.Array,
    mask_BQK: jax.Array | None,
    implementation: str,
) -> jax.Array:
    """`jax.nn.dot_product_attention` (XLA or cuDNN flash attention).

    `mask_BQK=None` means plain causal attention over full rows, which cuDNN
    runs without materialising any mask.
    """
    mask_B1QK = None if mask_BQK is None else mask_BQK[:, None]
    return jax.nn.dot_product_attention(
        q_BQHD,
        k_BKGD,
        v_BKGD,
        mask=mask_B1QK,
        is_causal=mask_BQK is None,
        implementation=implementation,
    )


class Attention(nn.Module):
    """Multi-head self-attention with optional grouped-query heads and KV cache.

    Training with `cfg.attention_dropout > 0` (`deterministic=False`) drops attention
    probabilities, as GPT-2 and nanoGPT do; only the reference attention can, so "auto"
    picks it for such steps (model/auto.py), and an explicitly named kernel trains
    without attention dropout."""

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x_BLD: jax.Array,
        positions_BL: jax.Array,
        segment_ids_BL: jax.Array | None,
        cache: tuple[LayerCache, jax.Array, jax.Array | None] | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Returns (y_BLD, updated layer cache or None).

        `cache` is (layer cache, kv_positions_BS, kv_segments_BS) where the
        positions and segments already include the tokens of this call; the
        new keys and values are written at slots `positions_BL` (one sequence
        per row while decoding, so slot index equals position).
        """
        cfg = self.cfg
        H, G, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        dtype = cfg.compute_dtype

        one_token_step = is_decoding_step(cache, x_BLD)

        def weights(name, heads, axes):
            w = dense_param(
                self, name, (cfg.d_model, heads, D), ("embed", axes, "head_dim"), n_in=1
            )
            bias = None
            if cfg.use_bias:
                bias = dense_param(self, name + "_bias", (heads, D), (axes, "head_dim"), zeros=True)
            return w, bias

        x_BLD = x_BLD.astype(dtype)
        qkv = [
            weights("query", H, "heads"),
            weights("key", G, "kv_heads"),
            weights("value", G, "kv_heads"),
        ]
        plain_causal = cache is None and segment_ids_BL is None
        attention_dropout = not self.deterministic and cfg.attention_dropout > 0
        backend = (
            "reference"
            if cache is not None
            else choose_backend(cfg, not plain_causal, attention_dropout)
        )
        if backend == "pallas" and cfg.positional != "rope" and cfg.weights_layout == "in_out":
            # Training or evaluation with the flash kernel: one product of stacked weights,
            # whose output the kernel reads in place (`_packed_qkv`).
            out_BLHD = flash.flash_attention_packed(
                _packed_qkv(x_BLD, qkv, G), segment_ids_BL, positions_BL
            )
            return self._output(out_BLHD, one_token_step), None
        # Otherwise three products, never one of stacked weights: in decoding steps XLA
        # would re-stack them every step (gpt-1.3b 1.61 -> 2.25 ms/token on an H100,
        # BENCHMARKS.md, change 12); in a decoding step `dense_group` may run all three as
        # one kernel instead, which also writes the new key and value into the cache where
        # no rotation (RoPE) comes between (two kernels a layer fewer: "Speed round ten").
        if one_token_step and cfg.positional != "rope" and group_kernel(cfg, x_BLD, qkv, 1, True):
            layer_cache, kv_positions_BK, kv_segments_BK = cache
            q_BLHD, k_BKGD, v_BKGD = dense_group(
                cfg,
                x_BLD,
                qkv,
                decoding=True,
                caches=[None, layer_cache.k_BSGD, layer_cache.v_BSGD],
                slots_B=positions_BL[:, 0],
            )
            new_cache = layer_cache._replace(k_BSGD=k_BKGD, v_BSGD=v_BKGD)
        else:
            q_BLHD, k_BLGD, v_BLGD = dense_group(cfg, x_BLD, qkv, decoding=one_token_step)
            if cfg.positional == "rope":
                inv_freq_F = rope_inv_freq(cfg)
                q_BLHD = apply_rope(q_BLHD, positions_BL, inv_freq_F)
                k_BLGD = apply_rope(k_BLGD, positions_BL, inv_freq_F)
            if cache is None:
                new_cache = None
                k_BKGD, v_BKGD = k_BLGD, v_BLGD
                kv_positions_BK, kv_segments_BK = positions_BL, segment_ids_BL
            else:
                layer_cache, kv_positions_BK, kv_segments_BK = cache
                new_cache = layer_cache._replace(
                    k_BSGD=_write_slots(layer_cache.k_BSGD, k_BLGD, positions_BL[:, 0]),
                    v_BSGD=_write_slots(layer_cache.v_BSGD, v_BLGD, positions_BL[:, 0]),
                )
                k_BKGD, v_BKGD = new_cache.k_BSGD, new_cache.v_BSGD
        q_BLHD = nn.with_logical_constraint(q_BLHD, ("batch", "length", "act_heads", "head_dim"))

        # With a cache, the hand-written attention whatever the backend: a decoding step's
        # one query per row is a matrix-vector product over the cache, where a flash
        # kernel saves nothing, and cuDNN's kernels are built for long query blocks;
        # or, for one-token steps, the same computation as one Pallas kernel.
        decode_kernel = choose_decode_attention(cfg) == "pallas" and supported(H, G, D)
        if one_token_step and decode_kernel:
            out_BHD, arrivals_BG = decode_attention(
                q_BLHD[:, 0],
                k_BKGD,
                v_BKGD,
                positions_BL[:, 0],
                segment_ids_BL[:, 0],
                kv_positions_BK,
                kv_segments_BK,
                new_cache.arrivals_BG,
            )
            new_cache = new_cache._replace(arrivals_BG=arrivals_BG)
            out_BLHD = out_BHD[:, None]
        elif backend == "reference":
            mask = attention_mask(positions_BL, kv_positions_BK, segment_ids_BL, kv_segments_BK)
            dropout = None
            if attention_dropout:
                dropout = nn.Dropout(
                    cfg.attention_dropout, deterministic=False, name="attn_dropout"
                )
            out_BLHD = reference_attention(q_BLHD, k_BKGD, v_BKGD, mask, dropout)
        elif backend == "pallas":
            out_BLHD = flash.flash_attention(q_BLHD, k_BKGD, v_BKGD, segment_ids_BL, positions_BL)
        else:
            mask = (
                None
                if plain_causal
                else attention_mask(positions_BL, kv_positions_BK, segment_ids_BL, kv_segments_BK)
            )
            out_BLHD = fused_attention(q_BLHD, k_BKGD, v_BKGD, mask, backend)

        return self._output(out_BLHD, one_token_step), new_cache

    def _output(self, out_BLHD: jax.Array, one_token_step: bool) -> jax.Array:
        """The output projection, heads and head dim contracted."""
        cfg = self.cfg
        H, D = cfg.n_heads, cfg.head_dim
        # fan-in H * D, the inputs each output sums over (the first dimension alone, H,
        # gave an init std sqrt(D) times too large: 0.41 instead of 0.05 at H=6, D=64)
        w_out = dense_param(
            self,
            "out",
            (H, D, cfg.d_model),
            ("heads", "head_dim", "embed"),
            fan_in=H * D,
            n_in=2,
        )
        b_out = None
        if cfg.use_bias:
            b_out = dense_param(self, "out_bias", (cfg.d_model,), ("embed",), zeros=True)
        out_BLHD = out_BLHD.astype(cfg.compute_dtype)
        (y_BLD,) = dense_group(cfg, out_BLHD, [(w_out, b_out)], 2, one_token_step)
        return y_BLD


def _packed_qkv(
    x_BLD: jax.Array, qkv: list[tuple[jax.Array, jax.Array | None]], G: int
) -> jax.Array:
    """qkv_BLGSD = x @ [w_key, w_value, w_query] for the flash kernel's packed layout
    (`flash_attention_packed`: per key/value head its key, value and R query heads).

    One product instead of three: its backward is one input-gradient product (no sum of
    three) and one weight-gradient product, with dq, dk and dv written into one array by
    the kernels. Stacking the weights costs a copy of them per step, which in a decoding
    step is not worth it (change 12) but in a training step is ~1% of reading x once."""
    (w_q, b_q), (w_k, b_k), (w_v, b_v) = qkv
    Dm, H, D = w_q.shape
    w_DGSD = jnp.concatenate([w_k[:, :, None], w_v[:, :, None], w_q.reshape(Dm, G, H // G, D)], 2)
    b_GSD = None
    if b_q is not None:
        b_GSD = jnp.concatenate([b_k[:, None], b_v[:, None], b_q.reshape(G, H // G, D)], 1)
    qkv_BLGSD = dense(x_BLD, w_DGSD, b_GSD)
    return nn.with_logical_constraint(qkv_BLGSD, ("batch", "length", "act_heads", None, "head_dim"))


def _write_slots(cache_BSGD: jax.Array, new_BLGD: jax.Array, start_B: jax.Array) -> jax.Array:
    """Writes each row's new entries into its cache starting at slot start_B[b]."""

    def write_row(row_SGD, new_LGD, start):
        return jax.lax.dynamic_update_slice_in_dim(row_SGD, new_LGD.astype(row_SGD.dtype), start, 0)

    return jax.vmap(write_row)(cache_BSGD, new_BLGD, start_B)
