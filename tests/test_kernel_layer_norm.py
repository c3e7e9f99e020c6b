"""The fused norm kernels (Pallas, interpreted on CPU) equal the XLA `Norm`:
values and gradients, the keep-input form, sharded, inside the model; and they
lower to Triton for the GPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig, get_preset
from model.kernels import layer_norm as ln
from model.layers import Norm
from model.transformer import LanguageModel
from tests.helpers import (
    lm_value_and_grad,
    mesh_of,
    random_lm_batch,
    triton_kernels,
    verify_triton_ir,
)
from train import sharding

# A row block count that leaves the last block part full, and in the backward
# pass several row blocks per program (2 programs x 3 trips over 6 blocks).
SMALL_BLOCKS = ln.Tuning(max_rows=4, bwd_programs=2)

CASES = [  # (norm, use_bias, dtype, param_dtype, tuning)
    ("layernorm", True, "float32", "float32", SMALL_BLOCKS),
    ("layernorm", False, "float32", "float32", ln.DEFAULT_TUNING),
    ("rmsnorm", False, "float32", "float32", SMALL_BLOCKS),
    ("layernorm", True, "bfloat16", "float32", ln.DEFAULT_TUNING),
    ("rmsnorm", False, "bfloat16", "bfloat16", SMALL_BLOCKS),
]
CASE_IDS = ["-".join([n, "bias" if b else "nobias", d, "params-" + p, "small" if t is SMALL_BLOCKS
             else "default"]) for n, b, d, p, t in CASES]  # fmt: skip


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)


def _inputs(d=96, shape=(3, 7), dtype="float32", seed=0):
    """x [*shape, D] (21 rows by default: not a multiple of any row block), parameters
    named as Norm names them, and weights for a loss using both outputs."""
    k = jax.random.split(jax.random.key(seed), 5)
    x = (2.0 * jax.random.normal(k[0], (*shape, d)) + 0.5).astype(dtype)
    params = {
        "scale": 1.0 + 0.2 * jax.random.normal(k[1], (d,)),
        "bias": 0.2 * jax.random.normal(k[2], (d,)),
    }
    w_y = jax.random.normal(k[3], (*shape, d))
    w_x = jax.random.normal(k[4], (*shape, d))
    return x, params, w_y, w_x


def _cfg(norm, use_bias, dtype, param_dtype="float32", d=96):
    return ModelConfig(
        d_model=d, n_heads=4, norm=norm, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype
    )


def _params_for(cfg, params):
    """The parameters Norm(cfg) has, in its parameter dtype."""
    if not (cfg.norm == "layernorm" and cfg.use_bias):
        params = {"scale": params["scale"]}
    return jax.tree.map(lambda p: p.astype(cfg.weight_dtype), params)


def _kernel(cfg, tuning=ln.DEFAULT_TUNING):
    """(x, params) -> (x, y) through the kernels, with Norm's parameter names."""
    kw = dict(eps=cfg.norm_eps, rms=cfg.norm == "rmsnorm", out_dtype=cfg.compute_dtype)
    return lambda x, p: ln.norm_keep_input(x, p["scale"], p.get("bias"), tuning=tuning, **kw)


def _xla(cfg):
    return lambda x, p: (x, Norm(cfg).apply({"params": p}, x))


def _value_and_grad(norm_fn, w_y, w_x):
    """jit((x, params) -> ((loss, y), grads)) of a loss using y and, unless w_x
    is None, the passed-through x too (as a pre-norm block does)."""

    def loss(x, p):
        x_out, y = norm_fn(x, p)
        total = jnp.sum(y.astype(jnp.float32) * w_y)
        if w_x is not None:
            total += jnp.sum(x_out.astype(jnp.float32) * w_x)
        return total, y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _assert_close(got, want, **tol):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype, path
        np.testing.assert_allclose(np.float32(a), np.float32(b), **tol, err_msg=str(path))


@pytest.mark.parametrize("norm, use_bias, dtype, param_dtype, tuning", CASES, ids=CASE_IDS)
def test_values_and_gradients_match_xla_norm(norm, use_bias, dtype, param_dtype, tuning):
    """y alone: the backward kernel variant without the residual cotangent."""
    cfg = _cfg(norm, use_bias, dtype, param_dtype)
    x, params, w_y, _ = _inputs(dtype=dtype)
    params = _params_for(cfg, params)
    got = _value_and_grad(_kernel(cfg, tuning), w_y, None)(x, params)
    want = _value_and_grad(_xla(cfg), w_y, None)(x, params)
    assert got[0][1].dtype == jnp.dtype(dtype)
    _assert_close(got, want, **_tol(dtype))


def test_keep_input_gradient_adds_the_residual_cotangent():
    """Both outputs used: one backward kernel adds the residual stream's cotangent."""
    dtype, tuning = "bfloat16", SMALL_BLOCKS
    cfg = _cfg("layernorm", True, dtype)
    x, params, w_y, w_x = _inputs(dtype=dtype, seed=1)
    params = _params_for(cfg, params)
    assert _kernel(cfg)(x, params)[0] is x  # passed through, not copied
    assert Norm(cfg).apply({"params": params}, x, keep_input=True)[0] is x  # XLA: x itself
    got = _value_and_grad(_kernel(cfg, tuning), w_y, w_x)(x, params)
    want = _value_and_grad(_xla(cfg), w_y, w_x)(x, params)
    _assert_close(got, want, **_tol(dtype))


def test_differentiated_keep_input_returns_the_kernels_copy_of_x():
    """Under differentiation the passed-through x is a copy the forward kernel writes (so
    that a residual add may take its buffer in place while the backward pass keeps x),
    equal to x bit for bit; the final norm's form (`norm`) writes none."""
    cfg = _cfg("layernorm", True, "bfloat16")
    x, params, *_ = _inputs(dtype="bfloat16", seed=2)
    params = _params_for(cfg, params)
    (x_out, _), _ = jax.vjp(lambda x: _kernel(cfg)(x, params), x)
    np.testing.assert_array_equal(np.float32(x_out), np.float32(x))

    def fwd_outputs(fn):
        jaxpr = str(jax.make_jaxpr(lambda x: jax.vjp(fn, x)[0])(x))
        return jaxpr.count(f"bf16{list(x.shape)}".replace(" ", "")), jaxpr

    kw = dict(eps=cfg.norm_eps, rms=False, out_dtype=cfg.compute_dtype)
    with_copy, _ = fwd_outputs(lambda x: ln.norm_keep_input(x, params["scale"], None, **kw))
    without, _ = fwd_outputs(lambda x: ln.norm(x, params["scale"], None, **kw))
    assert with_copy > without


@pytest.mark.parametrize(
    "mesh_shape, batch",
    [(dict(data=2, fsdp=2, tensor=2), 4), (dict(data=8), 3)],
    ids=["data2-fsdp2-tensor2", "data8-batch3-unsplittable"],
)
def test_sharded_matches_xla_norm(mesh_shape, batch):
    """Rows split over the batch axes (or, when they do not divide, whole on
    each device); the scale/bias gradients summed over all devices' rows."""
    cfg = _cfg("layernorm", True, "float32", d=48)
    x, params, w_y, w_x = _inputs(d=48, shape=(batch, 5), seed=3)
    want = _value_and_grad(_xla(cfg), w_y, w_x)(x, params)
    step = _value_and_grad(_kernel(cfg, SMALL_BLOCKS), w_y, w_x)
    mesh = mesh_of(mesh_shape)
    with sharding.mesh_context(mesh):
        if batch % 4 == 0:
            x = jax.device_put(x, sharding.batch_sharding(mesh))
        got = step(x, params)
        assert "shard_map" in str(step.trace(x, params).jaxpr)
    _assert_close(got, want, rtol=1e-5, atol=1e-5)


MODELS = {  # (config, mesh or None)
    "gpt-like-d48": (get_preset("tiny", d_model=48, use_bias=True), None),
    "llama-scan-remat-sharded": (
        get_preset("tiny-llama", scan_layers=True, remat="full"),
        dict(data=2, fsdp=2, tensor=2),
    ),
}


def _random_params(shapes):
    """Random values for every parameter (XLA's CPU compile of `init` takes seconds);
    norm scales near 1, and non-zero biases so that their gradients matter."""
    rng = np.random.default_rng(0)

    def fill(path, s):
        value = 0.2 * rng.standard_normal(s.shape)
        return jnp.asarray(value + (1.0 if "scale" in jax.tree_util.keystr(path) else 0.0), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("cfg, mesh_shape", MODELS.values(), ids=MODELS.keys())
def test_language_model_pallas_equals_xla(cfg, mesh_shape):
    tokens = jnp.asarray(random_lm_batch(0, batch=4, length=12, vocab=cfg.vocab_size)["inputs"])
    xla, pallas = LanguageModel(cfg), LanguageModel(cfg.replace(norm_impl="pallas"))
    shapes_boxed = jax.eval_shape(xla.init, jax.random.key(0), tokens)["params"]
    shapes = nn.meta.unbox(shapes_boxed)
    assert (
        jax.eval_shape(pallas.init, jax.random.key(0), tokens)["params"]
        == (jax.eval_shape(xla.init, jax.random.key(0), tokens)["params"])
    )  # same parameters: checkpoints are interchangeable
    params = _random_params(shapes)
    want = lm_value_and_grad(xla, tokens)(params)
    if mesh_shape is None:
        got = lm_value_and_grad(pallas, tokens)(params)
    else:
        mesh = mesh_of(mesh_shape)
        with sharding.mesh_context(mesh):
            tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
            got = lm_value_and_grad(pallas, tokens)(params)
    (loss_p, logits_p), grads_p = got
    (loss_x, logits_x), grads_x = want
    np.testing.assert_allclose(logits_p, logits_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss_p, loss_x, rtol=1e-6)
    _assert_close(grads_p, grads_x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm,use_bias,dtype,param_dtype,tuning", CASES, ids=CASE_IDS)
def test_add_norm_equals_the_models_add_then_norm(norm, use_bias, dtype, param_dtype, tuning):
    """`add_norm` (a decoding step's residual add and the next norm in one kernel): the sum
    exactly as the model's add rounds it, the norm as the XLA `Norm` of that sum."""
    cfg = _cfg(norm, use_bias, dtype, param_dtype)
    x, params, residual, _ = _inputs(dtype=dtype)
    p = _params_for(cfg, params)
    residual = residual.astype(dtype)
    kw = dict(eps=cfg.norm_eps, rms=norm == "rmsnorm", out_dtype=cfg.compute_dtype)
    s, y = jax.jit(lambda *a: ln.add_norm(*a, tuning=tuning, **kw))(
        x, residual, p["scale"], p.get("bias")
    )
    np.testing.assert_array_equal(np.float32(s), np.float32(x + residual))
    _assert_close(y, Norm(cfg).apply({"params": p}, x + residual), **_tol(dtype))
    with pytest.raises(ValueError, match=r"residual \(3, 6, 96\) does not match x \(3, 7, 96\)"):
        ln.add_norm(x, residual[:, :6], p["scale"], **kw)


def test_bad_inputs_fail_clearly():
    x = jnp.zeros((4, 48))
    with pytest.raises(ValueError, match=r"scale has shape \(64,\), expected \(48,\)"):
        ln.norm(x, jnp.ones(64), eps=1e-5, rms=True, out_dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"bias has shape \(47,\)"):
        ln.norm(x, jnp.ones(48), jnp.zeros(47), eps=1e-5, rms=False, out_dtype=jnp.float32)
    with pytest.raises(ValueError, match="D=16384"):
        ln.norm(jnp.zeros((2, 16384)), jnp.ones(16384), eps=1e-5, rms=True, out_dtype="float32")
    with pytest.raises(ValueError, match="overflow int32"):
        big = jax.ShapeDtypeStruct((2**21, 1024), jnp.bfloat16)
        jax.eval_shape(
            lambda x: ln.norm(x, jnp.ones(1024), eps=1e-5, rms=True, out_dtype=x.dtype), big
        )
    with pytest.raises(ValueError, match="floating"):
        ln.norm(
            jnp.zeros((2, 48), jnp.int32), jnp.ones(48), eps=1e-5, rms=True, out_dtype="float32"
        )


# ----------------------------------------------------------------------------
# Lowering for the GPU, without one: Pallas' Triton lowering runs on the CPU
# (compute capability 9.0 when no GPU is present), so shapes Triton rejects,
# such as non-power-of-two tensors, fail here rather than on the H100.


def _gpu_step(rms):
    """Forward and backward of a keep-input norm and a plain one, Triton (not interpreted)."""
    kw = dict(eps=1e-5, rms=rms, out_dtype=jnp.bfloat16, interpret=False)

    def loss(x, scale, bias):
        x, y = ln.norm_keep_input(x, scale, bias, **kw)
        z = ln.norm(x + y, scale, bias, **kw)
        return jnp.sum(z.astype(jnp.float32)) + jnp.sum(x.astype(jnp.float32) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _triton_kernels(rms):
    """Every Triton kernel of a norm step at GPT-2 124M size."""
    x = jax.ShapeDtypeStruct((64, 1024, 768), jnp.bfloat16)
    p = jax.ShapeDtypeStruct((768,), jnp.float32)
    return triton_kernels(_gpu_step(rms), x, p, None if rms else p)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_lowers_to_triton_at_gpt2_size(rms):
    kernels = _triton_kernels(rms)
    rows = 64 * 1024
    fwd_rows, _ = ln._rows_and_warps(1024, ln.DEFAULT_TUNING.fwd_elems, 16)
    assert (
        sorted((k.name, k.grid[0]) for k in kernels if k.name == "norm_fwd")
        == [("norm_fwd", rows // fwd_rows)] * 2
    )
    # one backward with the residual cotangent (keep-input), one without (final norm)
    assert sorted(k.name for k in kernels if k.name != "norm_fwd") == [
        "norm_bwd",
        "norm_bwd_res",
    ]
    # backward: 4 programs per SM (132 without a GPU), each looping over row blocks
    per_sm = ln.DEFAULT_TUNING.bwd_programs_per_sm
    assert {k.grid[0] for k in kernels if k.name != "norm_fwd"} == {per_sm * 132}


def test_triton_ir_verifies():
    verify_triton_ir(_triton_kernels(rms=False))
