"""GPT-2 (GPT2LMHeadModel): config fields and tensor names.

GPT-2's linear layers are `Conv1D`s whose weights are stored [in, out], as
ours are, so most tensors map unchanged; q, k and v are one fused `c_attn`
tensor whose columns are [q | k | v], each column block head-major.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from model.config import ModelConfig
from model.hf.layout import Rule

MODEL_TYPE = "gpt2"
ARCHITECTURE = "GPT2LMHeadModel"
_PREFIX = "transformer."
# Causal-mask buffers that old checkpoints stored with the weights; not parameters.
_BUFFER = re.compile(r"\.attn\.(masked_)?bias$")
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def canonical_name(name: str) -> str | None:
    """Stored name -> the name the rules use (old files omit the prefix); None to skip."""
    if _BUFFER.search(name):
        return None
    if name.startswith(_PREFIX) or name.startswith("lm_head."):
        return name
    return _PREFIX + name


def config_from_hf(hf: dict, require: Callable[[str], Any]) -> ModelConfig:
    """ModelConfig of a GPT-2 config.json; `require(key)` reads a mandatory field."""
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _TANH_GELU:
        raise ValueError(
            f"GPT-2 activation_function={activation!r} is not supported; "
            f"supported: {', '.join(_TANH_GELU)} (the tanh GELU)"
        )
    for key, supported in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if hf.get(key, supported) != supported:
            raise ValueError(f"GPT-2 option {key}={hf[key]} is not supported")
    d_model = require("n_embd")
    return ModelConfig(
        vocab_size=require("vocab_size"),
        d_model=d_model,
        n_layers=require("n_layer"),
        n_heads=require("n_head"),
        d_ff=hf.get("n_inner") or 4 * d_model,
        max_len=require("n_positions"),
        positional="learned",
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation="gelu",
        use_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def check_exportable(cfg: ModelConfig) -> None:
    """ValueError naming the first field that GPT-2 cannot express."""
    for field, value in (("positional", "learned"), ("norm", "layernorm"), ("activation", "gelu")):
        if getattr(cfg, field) != value:
            raise ValueError(f"cannot export as GPT-2: ModelConfig.{field} must be {value!r}")
    if cfg.kv_heads != cfg.n_heads:
        raise ValueError("cannot export as GPT-2: n_kv_heads must equal n_heads (no GQA)")
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        raise ValueError("cannot export as GPT-2: d_head * n_heads must equal d_model")


def config_to_hf(cfg: ModelConfig) -> dict:
    """The config.json fields of this model (special token ids and dtype added by the caller)."""
    check_exportable(cfg)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout_rate,
        "embd_pdrop": cfg.dropout_rate,
        "attn_pdrop": cfg.attention_dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def rules(cfg: ModelConfig) -> list[Rule]:
    """The name-mapping table (biases always: GPT-2 has them everywhere)."""
    D, H, K, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    V, P = cfg.vocab_size, cfg.max_len
    t, h, ours = _PREFIX, _PREFIX + "h.{i}.", "decoder/block_{i}/"
    vocab_rows = dict(pad_axis=0, pad_to=cfg.padded_vocab)
    vocab_cols = dict(pad_axis=1, pad_to=cfg.padded_vocab)
    table = [
        Rule(t + "wte.weight", "embed/embedding", (V, D), **vocab_rows),
        Rule(t + "wpe.weight", "decoder/position_embedding", (P, D)),
        Rule(t + "ln_f.weight", "decoder/final_norm/scale", (D,)),
        Rule(t + "ln_f.bias", "decoder/final_norm/bias", (D,)),
    ]
    if not cfg.tie_embeddings:
        table.append(Rule("lm_head.weight", "lm_head", (V, D), perm=(1, 0), **vocab_cols))
    for hf_norm, our_norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
        table += [
            Rule(h + hf_norm + ".weight", ours + our_norm + "/scale", (D,)),
            Rule(h + hf_norm + ".bias", ours + our_norm + "/bias", (D,)),
        ]
    for j, name in enumerate(("query", "key", "value")):
        qkv = dict(part=j, parts=3)  # block j of the fused [q | k | v]
        table += [
            Rule(h + "attn.c_attn.weight", ours + "attn/" + name, (D, 3 * D), (D, H, K),
                 part_axis=1, **qkv),
            Rule(h + "attn.c_attn.bias", ours + f"attn/{name}_bias", (3 * D,), (H, K), **qkv),
        ]  # fmt: skip
    return table + [
        Rule(h + "attn.c_proj.weight", ours + "attn/out", (D, D), (H, K, D)),
        Rule(h + "attn.c_proj.bias", ours + "attn/out_bias", (D,)),
        Rule(h + "mlp.c_fc.weight", ours + "mlp/up", (D, F)),
        Rule(h + "mlp.c_fc.bias", ours + "mlp/up_bias", (F,)),
        Rule(h + "mlp.c_proj.weight", ours + "mlp/down", (F, D)),
        Rule(h + "mlp.c_proj.bias", ours + "mlp/down_bias", (D,)),
    ]
