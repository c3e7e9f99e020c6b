"""Llama (LlamaForCausalLM, Llama 2 and 3.x): config fields and tensor names.

HF stores `nn.Linear` weights [out, in]; ours are [in, out], split into
heads, so every projection is reshaped and transposed. HF's q/k weights are
already in the rotate-half RoPE layout that `model/attention.py` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from model.config import ModelConfig
from model.hf.layout import Rule

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
_ROPE_TYPES = ("default", "linear", "llama3")


def canonical_name(name: str) -> str | None:
    """None for buffers that old checkpoints stored with the weights."""
    return None if name.endswith("rotary_emb.inv_freq") else name


def _rope_fields(hf: dict) -> dict:
    """rope_theta and rope_scaling from either config layout.

    transformers < 5 writes top-level `rope_theta` and `rope_scaling`
    (None or a dict); transformers 5 writes one `rope_parameters` dict.
    """
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"Llama rope_type={rope_type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}"
        )
    fields = dict(rope_theta=float(theta))
    if rope_type == "linear":
        fields.update(rope_scaling="linear", rope_factor=float(params["factor"]))
    elif rope_type == "llama3":
        fields.update(
            rope_scaling="llama3",
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_len=int(params["original_max_position_embeddings"]),
        )
    return fields


def config_from_hf(hf: dict, require: Callable[[str], Any]) -> ModelConfig:
    """ModelConfig of a Llama config.json; `require(key)` reads a mandatory field."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Llama hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        raise ValueError(
            f"Llama attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported "
            "(this model has biases in both or in neither)"
        )
    d_model, n_heads = require("hidden_size"), require("num_attention_heads")
    head_dim = hf.get("head_dim") or d_model // n_heads
    return ModelConfig(
        vocab_size=require("vocab_size"),
        d_model=d_model,
        n_layers=require("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_head=None if head_dim * n_heads == d_model else head_dim,
        d_ff=require("intermediate_size"),
        max_len=require("max_position_embeddings"),
        positional="rope",
        **_rope_fields(hf),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        use_bias=bool(attention_bias),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def check_exportable(cfg: ModelConfig) -> None:
    """ValueError naming the first field that Llama cannot express."""
    for field, value in (("positional", "rope"), ("norm", "rmsnorm"), ("activation", "swiglu")):
        if getattr(cfg, field) != value:
            raise ValueError(f"cannot export as Llama: ModelConfig.{field} must be {value!r}")


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json fields (the pre-5 rope layout, which every version reads)."""
    check_exportable(cfg)
    rope_scaling = None
    if cfg.rope_scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": cfg.use_bias,
        "mlp_bias": cfg.use_bias,
        "attention_dropout": cfg.attention_dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def rules(cfg: ModelConfig) -> list[Rule]:
    """The name-mapping table."""
    D, H, G, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    F, V = cfg.d_ff, cfg.vocab_size
    h, ours = "model.layers.{i}.", "decoder/block_{i}/"
    vocab_rows = dict(pad_axis=0, pad_to=cfg.padded_vocab)
    vocab_cols = dict(pad_axis=1, pad_to=cfg.padded_vocab)
    table = [
        Rule("model.embed_tokens.weight", "embed/embedding", (V, D), **vocab_rows),
        Rule("model.norm.weight", "decoder/final_norm/scale", (D,)),
        Rule(h + "input_layernorm.weight", ours + "attn_norm/scale", (D,)),
        Rule(h + "post_attention_layernorm.weight", ours + "mlp_norm/scale", (D,)),
        # [heads * head_dim, D] -> [D, heads, head_dim]
        Rule(h + "self_attn.q_proj.weight", ours + "attn/query", (H * K, D), (H, K, D), (2, 0, 1)),
        Rule(h + "self_attn.k_proj.weight", ours + "attn/key", (G * K, D), (G, K, D), (2, 0, 1)),
        Rule(h + "self_attn.v_proj.weight", ours + "attn/value", (G * K, D), (G, K, D), (2, 0, 1)),
        # [D, heads * head_dim] -> [heads, head_dim, D]
        Rule(h + "self_attn.o_proj.weight", ours + "attn/out", (D, H * K), (D, H, K), (1, 2, 0)),
        Rule(h + "mlp.gate_proj.weight", ours + "mlp/gate", (F, D), perm=(1, 0)),
        Rule(h + "mlp.up_proj.weight", ours + "mlp/up", (F, D), perm=(1, 0)),
        Rule(h + "mlp.down_proj.weight", ours + "mlp/down", (D, F), perm=(1, 0)),
    ]
    if not cfg.tie_embeddings:
        table.append(Rule("lm_head.weight", "lm_head", (V, D), perm=(1, 0), **vocab_cols))
    if cfg.use_bias:
        table += [
            Rule(h + "self_attn.q_proj.bias", ours + "attn/query_bias", (H * K,), (H, K)),
            Rule(h + "self_attn.k_proj.bias", ours + "attn/key_bias", (G * K,), (G, K)),
            Rule(h + "self_attn.v_proj.bias", ours + "attn/value_bias", (G * K,), (G, K)),
            Rule(h + "self_attn.o_proj.bias", ours + "attn/out_bias", (D,)),
            Rule(h + "mlp.gate_proj.bias", ours + "mlp/gate_bias", (F,)),
            Rule(h + "mlp.up_proj.bias", ours + "mlp/up_bias", (F,)),
            Rule(h + "mlp.down_proj.bias", ours + "mlp/down_bias", (D,)),
        ]
    return table
