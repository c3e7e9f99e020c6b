"""Building blocks: parameters with logical axis names, norms, feed-forward, embeddings.

Every parameter is created through `dense_param`, which attaches logical axis
names (see `train/sharding.py` for the one table that maps them to mesh axes).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.auto import (
    choose_activation_impl,
    choose_norm_impl,
    fold_decode_norms,
    use_decode_matmul,
)
from model.config import ModelConfig
from model.kernels import layer_norm
from model.kernels.bias_gelu import bias_gelu
from model.kernels.decode_matmul import InputNorm, decode_matmul, supports_input_norm


def dense_param(
    module: nn.Module,
    name: str,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    zeros: bool = False,
    ones: bool = False,
    fan_in: int | None = None,
    n_in: int = 0,
) -> jax.Array:
    """Declares a parameter whose dimensions carry logical axis names.

    Weights get a truncated-normal init with std 1/sqrt(fan_in), fan_in being
    the first dimension unless given. `n_in` > 0 marks a matrix product's weight whose
    first `n_in` dimensions are its inputs: with `weights_layout="out_in"` it is stored,
    and returned, as [*outputs, *inputs] (`dense(..., out_in=True)` takes it so).
    """
    cfg: ModelConfig = module.cfg
    fan_in = fan_in or shape[0]  # of the [*inputs, *outputs] shape, before any reordering
    if n_in and cfg.weights_layout == "out_in":
        shape, axes = shape[n_in:] + shape[:n_in], axes[n_in:] + axes[:n_in]
    if zeros:
        init = nn.initializers.zeros_init()
    elif ones:
        init = nn.initializers.ones_init()
    else:
        init = _own_kernel(nn.initializers.truncated_normal(stddev=fan_in**-0.5))
    if module.has_variable("params", name):
        # Applying: Flax's `param` would trace the initializer again only to check the
        # shape, for every parameter on every trace (about an eighth of tracing a step).
        value = nn.meta.unbox(module.get_variable("params", name))
        if value.shape != shape:
            raise ValueError(
                f"parameter {'/'.join(module.path)}/{name} has shape {value.shape}; "
                f"this model expects {shape}"
            )
        return value
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.weight_dtype)


def _own_kernel(init: Callable) -> Callable:
    """`init` whose result XLA computes in a kernel of its own. With stacked layers
    (`scan_layers`) the layers' draws meet in one concatenation, and XLA's GPU fusion
    pass would otherwise merge all of them into it: gpt2-124m's state init compiled in
    5.5 s instead of 3.3 (BENCHMARKS.md, "Speed round six")."""
    return lambda key, shape, dtype=jnp.float32: jax.lax.optimization_barrier(
        init(key, shape, dtype)
    )


def output_dims(w: jax.Array, n_in: int, out_in: bool) -> tuple[int, ...]:
    """A product weight's output dimensions: w is [*in, *out], or [*out, *in] (`out_in`)."""
    return w.shape[: w.ndim - n_in] if out_in else w.shape[n_in:]


def dense(
    x: jax.Array,
    w: jax.Array,
    bias: jax.Array | None = None,
    n_in: int = 1,
    out_in: bool = False,
) -> jax.Array:
    """x [*rows, *in] @ w [*in, *out] (+ bias [*out]) -> [*rows, *out] in x's dtype, the
    last `n_in` dimensions of x contracted, computed as one 2-D matrix product
    [rows, in] @ [in, out] with the bias added in x's dtype.

    In that form XLA hands the bias add, and a residual add that follows, to the cuBLAS
    kernel's epilogue; as an einsum over [B, L, H, D] with a float32 bias it made a pass of
    its own. gpt2-124m's packed step on an H200: 117.1-117.7 -> 116.0-116.4 ms
    (BENCHMARKS.md, "Speed round eight", change 39).

    `out_in`: w is stored [*out, *in] (`weights_layout="out_in"`). One row is then
    multiplied as a sum along w's rows, which XLA computes as a reduction that reads
    the weight in contiguous rows: gpt-1.3b's decoding products on an H200 at 3.4-3.9
    TB/s against 2.5-3.4 for its matrix products (BENCHMARKS.md, "Speed round thirty")."""
    rows, out = x.shape[: x.ndim - n_in], output_dims(w, n_in, out_in)
    k = math.prod(x.shape[x.ndim - n_in :])
    x_RK = x.reshape(-1, k)
    if not out_in:
        y = x_RK @ w.reshape(k, -1).astype(x.dtype)
    elif x_RK.shape[0] == 1:
        prods_RNK = x_RK[:, None, :].astype(jnp.float32) * w.reshape(1, -1, k).astype(jnp.float32)
        y = jnp.sum(prods_RNK, axis=-1).astype(x.dtype)
    else:
        y = x_RK @ w.reshape(-1, k).astype(x.dtype).T
    if bias is not None:
        y = y + bias.reshape(-1).astype(x.dtype)
    return y.reshape(*rows, *out)


def dense_group(
    cfg: ModelConfig,
    x: jax.Array,
    params: list[tuple[jax.Array, jax.Array | None]],
    n_in: int = 1,
    decoding: bool = False,
    activation: str | None = None,
    caches: list[jax.Array | None] | None = None,
    slots_B: jax.Array | None = None,
    input_norm: InputNorm | None = None,
    residual: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """`dense(x, w, bias)`, then `activation` (None or "gelu"), for each (w, bias) of
    `params`. In a one-token decoding step (`decoding`) all of them run as one
    `decode_matmul` kernel where `group_kernel` says so (gpt-1.3b's q, k and v: one
    kernel instead of three), bias and GELU applied before its store.

    Only where `group_kernel` is true:
    - `caches`: a product with a cache [B, S, ...] is written by the kernel into slot
      `slots_B[b]` of its row b, and the updated cache is returned in its place;
    - `input_norm`: the products take norm(x), computed by the kernel (`fold_norms`);
    - `residual` (with `input_norm`): x + residual replaces x and is returned last."""
    out_in = cfg.weights_layout == "out_in"
    if group_kernel(cfg, x, params, n_in, decoding):
        k = math.prod(x.shape[x.ndim - n_in :])
        outs = decode_matmul(
            x.reshape(-1, k),
            [w.reshape(-1, k) if out_in else w.reshape(k, -1) for w, _ in params],
            [None if b is None else b.reshape(-1) for _, b in params],
            activation=activation,
            caches=caches,
            slots_R=slots_B,
            norm=input_norm,
            residual_RK=None if residual is None else residual.reshape(-1, k),
            weights_nk=out_in,
        )
        lead = x.shape[: x.ndim - n_in]
        products = tuple(
            y if c is not None else y.reshape(*lead, *output_dims(w, n_in, out_in))
            for y, (w, _), c in zip(outs, params, caches or [None] * len(params))
        )
        return products + tuple(y.reshape(x.shape) for y in outs[len(params) :])
    if caches is not None or input_norm is not None:
        raise ValueError(
            "dense_group writes into caches and normalises its input only where "
            "group_kernel is true"
        )
    outs = tuple(dense(x, w, b, n_in, out_in) for w, b in params)
    if activation == "gelu":
        outs = tuple(nn.gelu(y, approximate=True) for y in outs)
    return outs


def group_kernel(
    cfg: ModelConfig,
    x: jax.Array,
    params: list[tuple[jax.Array, jax.Array | None]],
    n_in: int = 1,
    decoding: bool = False,
) -> bool:
    """Whether `dense_group` runs these products as one `decode_matmul` kernel: in a
    one-token decoding step, where `model.auto.use_decode_matmul` picks it."""
    k = math.prod(x.shape[x.ndim - n_in :])
    out_in = cfg.weights_layout == "out_in"
    ns = [math.prod(output_dims(w, n_in, out_in)) for w, _ in params]
    rows = math.prod(x.shape[: x.ndim - n_in])
    return decoding and use_decode_matmul(cfg, rows, k, ns)


def fold_norms(cfg: ModelConfig, x_BLD: jax.Array, decoding: bool) -> bool:
    """Whether a block's norms run inside kernels that run anyway instead of as kernels of
    their own (`model.transformer.Block`): the first with the previous block's MLP residual
    add (`Norm.add_then_norm`), the second with the attention's residual add in the
    up-projection's kernel (`decode_matmul`'s prologue). In a one-token decoding step where
    both products are that kernel and `model.auto.fold_decode_norms` picks it."""
    if not decoding or cfg.positional == "rope" or not supports_input_norm(cfg.d_model):
        return False
    rows, D = math.prod(x_BLD.shape[:-1]), cfg.d_model
    qkv = [cfg.n_heads * cfg.head_dim] + [cfg.kv_heads * cfg.head_dim] * 2
    mlp = [cfg.d_ff] * (2 if cfg.activation == "swiglu" else 1)
    return (
        fold_decode_norms(cfg)
        and use_decode_matmul(cfg, rows, D, qkv)
        and use_decode_matmul(cfg, rows, D, mlp)
    )


def is_decoding_step(cache: object, x_BL: jax.Array) -> bool:
    """One token per row with a KV cache: the step the decoding kernels and choices are for."""
    return cache is not None and x_BL.shape[1] == 1


def gather_rows(table_ND: jax.Array, ids_BL: jax.Array) -> jax.Array:
    """table[ids] for a sharded table: gathered whole first (as FSDP does for
    every weight), since a lookup into a split table cannot keep the batch split."""
    table_ND = nn.with_logical_constraint(table_ND, (None, None))
    return nn.with_logical_constraint(
        jnp.take(table_ND, ids_BL, axis=0), ("batch", "length", "act_embed")
    )


class Norm(nn.Module):
    """LayerNorm or RMSNorm, statistics in float32.

    `keep_input=True` returns (x_BLD, normed) instead of normed: a pre-norm
    block continues its residual stream from that x. With `norm_impl="xla"`
    it is x unchanged; with "pallas" (what "auto" picks on a GPU, decoding steps
    aside) it passes through the fused kernel's custom_vjp, so the residual
    stream's cotangent and the norm's are added in the one backward kernel
    instead of in a separate pass.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array, keep_input: bool = False, decoding: bool = False):
        """`decoding`: a one-token decoding step (`model.auto.choose_norm_impl`)."""
        cfg = self.cfg
        if choose_norm_impl(cfg, decoding) == "pallas":
            return self._fused(x_BLD, keep_input)
        x = x_BLD.astype(jnp.float32)
        if cfg.norm == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps)
        x = x * dense_param(self, "scale", (cfg.d_model,), ("norm",), ones=True)
        if cfg.norm == "layernorm" and cfg.use_bias:
            x = x + dense_param(self, "bias", (cfg.d_model,), ("norm",), zeros=True)
        y_BLD = x.astype(cfg.compute_dtype)
        return (x_BLD, y_BLD) if keep_input else y_BLD

    def input_norm(self) -> InputNorm:
        """This norm's parameters, for a kernel that normalises its input rows itself
        (the Pallas norms, and the up-projection's decoding kernel under `fold_norms`)."""
        cfg = self.cfg
        scale = dense_param(self, "scale", (cfg.d_model,), ("norm",), ones=True)
        bias = None
        if cfg.norm == "layernorm" and cfg.use_bias:
            bias = dense_param(self, "bias", (cfg.d_model,), ("norm",), zeros=True)
        return InputNorm(scale, bias, cfg.norm_eps, cfg.norm == "rmsnorm")

    def add_then_norm(
        self, x_BLD: jax.Array, residual_BLD: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(x + residual, norm(x + residual)) as one forward kernel (`layer_norm.add_norm`):
        a decoding step's residual add and the norm after it."""
        scale, bias, eps, rms = self.input_norm()
        kw = dict(eps=eps, rms=rms, out_dtype=self.cfg.compute_dtype)
        return layer_norm.add_norm(x_BLD, residual_BLD, scale, bias, **kw)

    def _fused(self, x_BLD: jax.Array, keep_input: bool):
        """The Pallas kernels (model/kernels/layer_norm.py); same parameters."""
        scale, bias, eps, rms = self.input_norm()
        kw = dict(eps=eps, rms=rms, out_dtype=self.cfg.compute_dtype)
        if keep_input:
            return layer_norm.norm_keep_input(x_BLD, scale, bias, **kw)
        return layer_norm.norm(x_BLD, scale, bias, **kw)


class MLP(nn.Module):
    """Feed-forward block: GELU (GPT-2) or SwiGLU (Shazeer 2020, as in Llama)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BLD: jax.Array,
        decoding: bool = False,
        input_norm: InputNorm | None = None,
        residual_BLD: jax.Array | None = None,
    ):
        """mlp(x_BLD). `decoding`: a one-token decoding step, whose products `dense_group`
        may run as one kernel (SwiGLU's gate and up together, GELU inside the
        up-projection's). With `input_norm` and `residual_BLD` (`fold_norms`): the
        kernel adds and normalises, and the result is (x + residual, mlp(norm(x +
        residual)))."""
        cfg = self.cfg
        fold = dict(input_norm=input_norm, residual=residual_BLD)
        summed = ()

        def weights(name, shape, axes):
            """(w, bias or None); biases are added in the compute dtype, so the
            activation's passes over [B, L, F] read and write bf16, not float32:
            gpt2-124m's step 131 -> 128 ms and 41.1 -> 36.6 GiB on an H200
            (BENCHMARKS.md, "Speed round four", change 24)."""
            w = dense_param(self, name, shape, axes, n_in=1)
            if not cfg.use_bias:
                return w, None
            return w, dense_param(self, name + "_bias", shape[-1:], axes[-1:], zeros=True)

        up = lambda name: weights(name, (cfg.d_model, cfg.d_ff), ("embed", "mlp"))  # noqa: E731
        act = lambda h: nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))  # noqa: E731
        if cfg.activation == "swiglu":
            gate_BLF, up_BLF, *summed = dense_group(
                cfg, x_BLD, [up("gate"), up("up")], 1, decoding, **fold
            )
            h_BLF = nn.silu(act(gate_BLF)) * act(up_BLF)
        elif decoding or choose_activation_impl(cfg) != "pallas":
            # (decoding: no backward pass, where the Pallas pair saves its passes; XLA
            # applies bias and GELU in one small fusion, or the decoding kernel in its
            # product)
            h_BLF, *summed = dense_group(
                cfg, x_BLD, [up("up")], 1, decoding, activation="gelu", **fold
            )
            h_BLF = act(h_BLF)
        else:  # the training kernels: one each way, the bias gradient included
            w, bias = up("up")
            h_BLF = dense(x_BLD, w, out_in=cfg.weights_layout == "out_in")
            h_BLF = bias_gelu(act(h_BLF), jnp.zeros(cfg.d_ff) if bias is None else bias)
        down = weights("down", (cfg.d_ff, cfg.d_model), ("mlp", "embed"))
        y_BLD = dense_group(cfg, h_BLF.astype(cfg.compute_dtype), [down], 1, decoding)[0]
        return (summed[0], y_BLD) if residual_BLD is not None else y_BLD


class Embed(nn.Module):
    """Token embedding; `attend` reuses the table as the tied output head."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        # std 1/sqrt(d) keeps tied logits O(1) at init.
        self.embedding = dense_param(
            self,
            "embedding",
            (cfg.padded_vocab, cfg.d_model),
            ("vocab", "embed"),
            fan_in=cfg.d_model,
        )

    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        return gather_rows(self.embedding, tokens_BL).astype(self.cfg.compute_dtype)

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        """The tied output head: x . table^T (the table is [outputs, inputs] already)."""
        return dense(x_BLD, self.embedding.astype(self.cfg.compute_dtype), out_in=True)
