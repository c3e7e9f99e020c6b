"""The decoder-only transformer: pre-norm blocks, optional scan over layers and remat.

`Decoder` maps embedded tokens to final hidden states (shared by the language
model and the reward model); `LanguageModel` adds the embedding and output
head. Both are used purely functionally: `params = model.init(...)["params"]`,
then `model.apply({"params": params}, ...)`.

Decoding with a KV cache: `init_cache` allocates a `DecodeCache`; passing it to
`LanguageModel.__call__` writes this call's keys and values and returns the
updated cache (see `model/sampling.py`, which labels every slot once after the
prefill with `fill_slots_ahead`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from model.attention import Attention, LayerCache
from model.config import ModelConfig
from model.layers import (
    MLP,
    Embed,
    Norm,
    dense_group,
    dense_param,
    fold_norms,
    gather_rows,
    is_decoding_step,
)
from model.masking import EMPTY_POSITION

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@struct.dataclass
class DecodeCache:
    """Per-layer keys/values plus slot metadata.

    With scanned layers the keys/values are stacked on a leading layer axis
    (the scan's carry); otherwise each layer has its own arrays, so a decode
    step updates them in place instead of restacking the whole cache.
    `slots_filled` (static): every slot's metadata is written ahead (`fill_slots_ahead`),
    so that calls write none.
    """

    # k/v [n_layers,] B, S, G, D and arrivals [n_layers,] B, G
    layers: LayerCache | tuple[LayerCache, ...]
    positions_BS: jax.Array  # position held by each slot; EMPTY_POSITION if unwritten
    segments_BS: jax.Array  # segment id of each slot; 0 for padding / unwritten
    slots_filled: bool = struct.field(pytree_node=False, default=False)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> DecodeCache:
    kv_BSGD = (batch_size, max_len, cfg.kv_heads, cfg.head_dim)
    arrivals_BG = (batch_size, cfg.kv_heads)

    def layer(*stacked: int) -> LayerCache:
        zeros = lambda shape, dtype: jnp.zeros((*stacked, *shape), dtype)  # noqa: E731
        kv = cfg.compute_dtype
        return LayerCache(zeros(kv_BSGD, kv), zeros(kv_BSGD, kv), zeros(arrivals_BG, jnp.int32))

    layers = layer(cfg.n_layers) if cfg.scan_layers else tuple(layer() for _ in range(cfg.n_layers))
    return DecodeCache(
        layers,
        jnp.full((batch_size, max_len), EMPTY_POSITION, jnp.int32),
        jnp.zeros((batch_size, max_len), jnp.int32),
    )


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); the carry of the layer scan.

    The residual stream continues from the x each norm passes through
    (`keep_input`), so the fused norm kernels can add its cotangent in their
    backward pass.

    In a one-token decoding step under `fold_norms` the carry is the pair (x, y): the
    residual stream and the previous block's MLP output, not yet added. Their add and this
    block's first norm are one kernel (`Norm.add_then_norm`); the attention's add and the
    second norm run inside the up-projection's kernel; the block returns (x, its MLP's y).
    The first block gets (the token embedding, the position embedding).
    """

    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD, positions_BL, segment_ids_BL, kv_meta, layer_cache):
        cfg = self.cfg
        dropout = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        cache = None if layer_cache is None else (layer_cache, *kv_meta)
        if isinstance(x_BLD, tuple):
            # gpt-1.3b on an H200: norms as kernels of their own 1.152 -> 1.111 ms/token
            # with both inside the products' kernels ("Speed round twenty-four"); 0.990 ->
            # 0.984 with the first one in the MLP's add instead ("Speed round thirty-two")
            x_BLD, normed_BLD = Norm(cfg, name="attn_norm").add_then_norm(*x_BLD)
            h_BLD, new_cache = Attention(cfg, self.deterministic, name="attn")(
                normed_BLD, positions_BL, segment_ids_BL, cache
            )
            mlp_norm = Norm(cfg, name="mlp_norm").input_norm()
            return MLP(cfg, name="mlp")(x_BLD, True, mlp_norm, h_BLD), new_cache
        decoding = is_decoding_step(layer_cache, x_BLD)
        x_BLD, normed_BLD = Norm(cfg, name="attn_norm")(x_BLD, True, decoding)
        h_BLD, new_cache = Attention(cfg, self.deterministic, name="attn")(
            normed_BLD, positions_BL, segment_ids_BL, cache
        )
        x_BLD = x_BLD + dropout(h_BLD)
        x_BLD, normed_BLD = Norm(cfg, name="mlp_norm")(x_BLD, True, decoding)
        x_BLD = x_BLD + dropout(MLP(cfg, name="mlp")(normed_BLD, decoding))
        x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "act_embed"))
        return x_BLD, new_cache


def _block_class(cfg: ModelConfig):
    if cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class Decoder(nn.Module):
    """Position embedding, the stack of blocks and the final norm: x_BLD -> hidden_BLD.

    The token embedding lives beside it (in `LanguageModel`, and in the reward
    model), because the tied output head reuses that table.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BLD: jax.Array,
        positions_BL: jax.Array,
        segment_ids_BL: jax.Array | None = None,
        cache: DecodeCache | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, DecodeCache | None]:
        """Returns (hidden_BLD after the final norm, updated cache or None)."""
        cfg = self.cfg
        position_BLD = None
        if cfg.positional == "learned":
            table = dense_param(
                self,
                "position_embedding",
                (cfg.max_len, cfg.d_model),
                ("positions", "embed"),
                fan_in=cfg.d_model,
            )
            position_BLD = gather_rows(table, positions_BL).astype(cfg.compute_dtype)

        kv_meta = layer_caches = None
        if cache is not None:
            if segment_ids_BL is None:
                segment_ids_BL = jnp.ones_like(positions_BL)
            if not cache.slots_filled:
                cache = _record_slots(cache, positions_BL, segment_ids_BL)
            kv_meta = (cache.positions_BS, cache.segments_BS)
            layer_caches = cache.layers
        decoding = is_decoding_step(cache, x_BLD)
        folded = fold_norms(cfg, x_BLD, decoding) and deterministic
        if folded:
            # see Block; the position embedding (learned: fold_norms) is added by the first
            # block's norm kernel, as a previous block's output would be
            carry = (x_BLD, position_BLD)
        else:
            if position_BLD is not None:
                x_BLD = x_BLD + position_BLD
            x_BLD = nn.Dropout(cfg.dropout_rate, deterministic=deterministic)(x_BLD)
            carry = nn.with_logical_constraint(x_BLD, ("batch", "length", "act_embed"))
        block = _block_class(cfg)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.n_layers,
                unroll=cfg.scan_unroll or cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic, name="blocks")
            carry, new_layers = stack(carry, positions_BL, segment_ids_BL, kv_meta, layer_caches)
        else:
            new_layers = []
            for i in range(cfg.n_layers):
                layer_cache = None if cache is None else layer_caches[i]
                carry, new_layer = block(cfg, deterministic, name=f"block_{i}")(
                    carry, positions_BL, segment_ids_BL, kv_meta, layer_cache
                )
                new_layers.append(new_layer)
            new_layers = tuple(new_layers)
        if folded:
            hidden_BLD = Norm(cfg, name="final_norm").add_then_norm(*carry)[1]
        else:
            hidden_BLD = Norm(cfg, name="final_norm")(carry, decoding=decoding)
        new_cache = None if cache is None else cache.replace(layers=new_layers)
        return hidden_BLD, new_cache


def default_positions(tokens_BL: jax.Array) -> jax.Array:
    """0..L-1 in every row."""
    return jnp.broadcast_to(jnp.arange(tokens_BL.shape[1], dtype=jnp.int32), tokens_BL.shape)


def _record_slots(cache: DecodeCache, positions_BL, segment_ids_BL) -> DecodeCache:
    """Marks the slots this call writes with their positions and segment ids."""
    start_B = positions_BL[:, 0]

    def write(row_S, new_L, start):
        return jax.lax.dynamic_update_slice_in_dim(row_S, new_L.astype(row_S.dtype), start, 0)

    return cache.replace(
        positions_BS=jax.vmap(write)(cache.positions_BS, positions_BL, start_B),
        segments_BS=jax.vmap(write)(cache.segments_BS, segment_ids_BL, start_B),
    )


def fill_slots_ahead(cache: DecodeCache) -> DecodeCache:
    """The cache with every slot's metadata written ahead as the sampler will write it:
    one sequence a row, slot s holding position s of segment 1. Then a decoding step
    writes no metadata (two in-place updates a token fewer). A slot is visible to a query
    at a position not earlier than its own, and the step at that position writes it before
    its attention reads it, so slots not yet written (or holding a prompt's padding) stay
    unseen until then."""
    B, S = cache.positions_BS.shape
    return cache.replace(
        positions_BS=jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
        segments_BS=jnp.ones((B, S), jnp.int32),
        slots_filled=True,
    )


def mask_padded_vocab(logits_BLV: jax.Array, vocab_size: int) -> jax.Array:
    """Logits of the padding rows set far below any real logit: zero probability,
    never sampled, no gradient. Finite, so that p * log p stays 0 and dividing by a
    temperature does not overflow."""
    floor = max(-1e9, float(jnp.finfo(logits_BLV.dtype).min))
    is_real_V = jnp.arange(logits_BLV.shape[-1]) < vocab_size
    return jnp.where(is_real_V, logits_BLV, jnp.asarray(floor, logits_BLV.dtype))


def output_head_VD(params: dict, cfg: ModelConfig) -> jax.Array:
    """The output head's weight [padded_vocab, d_model] (the embedding table when tied):
    logits = hidden . output_head_VD^T."""
    return params["embed"]["embedding"] if cfg.tie_embeddings else params["lm_head"].T


def unstack_layers(params: dict, n_layers: int) -> dict:
    """Scanned layers' parameters (`decoder/blocks`, a leading layer axis) as separate
    layers' (`decoder/block_{i}`): the same model with `scan_layers=False`."""
    decoder = dict(params["decoder"])
    blocks = decoder.pop("blocks")
    for i in range(n_layers):
        decoder[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
    return {**params, "decoder": decoder}


class LanguageModel(nn.Module):
    """Token embedding, decoder and output head: tokens -> next-token logits."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BL: jax.Array,
        positions_BL: jax.Array | None = None,
        segment_ids_BL: jax.Array | None = None,
        cache: DecodeCache | None = None,
        deterministic: bool = True,
        mask_vocab_padding: bool = True,
        return_hidden: bool = False,
    ):
        """Returns logits_BLV (compute dtype), or (logits_BLV, cache) when a cache is given.

        positions default to 0..L-1 in every row; segment_ids None means every
        row is one whole document with no padding (the fastest attention path).
        `mask_vocab_padding=False` leaves the padding columns of the vocabulary as
        computed, for a loss that leaves them out itself (`train/losses.py`) and so
        spares a pass over the logits. `return_hidden=True` returns the final norm's output
        hidden_BLD instead of logits, for a loss that applies the head itself
        (`output_head_VD`; the float8 head, `model/kernels/fp8_head.py`).
        """
        cfg = self.cfg
        if positions_BL is None:
            positions_BL = default_positions(tokens_BL)
        embed = Embed(cfg, name="embed")
        hidden_BLD, new_cache = Decoder(cfg, name="decoder")(
            embed(tokens_BL), positions_BL, segment_ids_BL, cache, deterministic
        )
        if return_hidden:
            if cache is not None:
                raise ValueError("LanguageModel: return_hidden is for training, without a cache")
            return hidden_BLD
        decoding = is_decoding_step(cache, tokens_BL)
        if cfg.tie_embeddings:
            logits_BLV = embed.attend(hidden_BLD)
        else:
            w = dense_param(
                self, "lm_head", (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"), n_in=1
            )
            (logits_BLV,) = dense_group(cfg, hidden_BLD, [(w, None)], 1, decoding)
        if mask_vocab_padding and cfg.padded_vocab > cfg.vocab_size:
            logits_BLV = mask_padded_vocab(logits_BLV, cfg.vocab_size)
        logits_BLV = nn.with_logical_constraint(logits_BLV, ("batch", "length", "act_vocab"))
        return logits_BLV if cache is None else (logits_BLV, new_cache)

    @nn.nowrap
    def inference_form(self, params: dict, transposed: bool = False) -> tuple[LanguageModel, dict]:
        """(model, params) for decoding: the norms' parameters in float32
        (`float32_norms`), and scanned layers run as separate layers, so each layer's
        cache is updated in place (a scan would restack the whole cache every token) and
        the Pallas decode kernel is not traced inside Flax's scan, which fails on the GPU
        (model/auto.py). `transposed`: the products' weights stored [outputs, inputs]
        (`weights_layout="out_in"`, for `decode_matmul="transposed"`), a copy of them."""
        cfg, params = self.cfg, float32_norms(params)
        if cfg.scan_layers:
            cfg, params = cfg.replace(scan_layers=False), unstack_layers(params, cfg.n_layers)
        if transposed:
            perms = _out_in_permutations(cfg)

            def rearrange(path, x):
                perm = perms[jax.tree_util.keystr(path)]
                return x if perm is None else jnp.transpose(x, perm)

            params = jax.tree_util.tree_map_with_path(rearrange, params)
            cfg = cfg.replace(weights_layout="out_in")
        return (self if cfg == self.cfg else LanguageModel(cfg, parent=None)), params


@functools.lru_cache(maxsize=16)
def _out_in_permutations(cfg: ModelConfig) -> dict[str, tuple[int, ...] | None]:
    """{parameter path: the axis permutation that takes it to weights_layout="out_in"},
    None for parameters that keep their layout, for a LanguageModel with `cfg`. Read from
    the logical axis names, which `dense_param` rotates with the dimensions."""

    def axis_names(c: ModelConfig) -> dict[str, tuple[str, ...]]:
        tokens = jnp.zeros((1, 1), jnp.int32)
        boxed = jax.eval_shape(LanguageModel(c).init, jax.random.key(0), tokens)["params"]
        leaves, _ = jax.tree_util.tree_flatten_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )
        return {jax.tree_util.keystr(path): tuple(x.names) for path, x in leaves}

    before, after = axis_names(cfg), axis_names(cfg.replace(weights_layout="out_in"))
    return {
        path: None if names == after[path] else tuple(names.index(a) for a in after[path])
        for path, names in before.items()
    }


def float32_norms(params: dict) -> dict:
    """The norms' parameters in float32 (the others as they are): the decoding kernels that
    normalise their own input read them so (`model/kernels/decode_matmul.py`), and with
    bfloat16 weights XLA would otherwise convert them inside every decoding step, a kernel
    each: 63 us a token for gpt-1.3b on an H200 (BENCHMARKS.md, "Speed round
    twenty-four"). The values are the same: every norm computes in float32."""

    def cast(path, x):
        in_norm = any(str(getattr(k, "key", "")).endswith("_norm") for k in path[:-1])
        return x.astype(jnp.float32) if in_norm else x

    return jax.tree_util.tree_map_with_path(cast, params)
