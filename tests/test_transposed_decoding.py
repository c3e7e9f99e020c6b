"""The sampler's transposed form (`decode_matmul="transposed"`): the products' weights copied
once to [outputs, inputs] (`LanguageModel.inference_form(params, transposed=True)`), one
sequence decoded as one row. It must compute what the trained layout computes, token for
token, with XLA's reductions and with the decoding kernel reading the transposed weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import auto, layers
from model.config import get_preset
from model.sampling import SamplingConfig, make_sampler
from model.transformer import LanguageModel
from tests.helpers import cached_decoding_logits, mesh_of
from train import sharding
from train.state import strip_axis_names

PRESETS = {
    "gpt2-like": get_preset("tiny", use_bias=True),  # biases, GELU, tied head
    "tiny-llama": get_preset("tiny-llama"),  # SwiGLU, grouped-query heads, RoPE, untied head
    "scanned": get_preset("tiny", scan_layers=True),  # stacked layers, split for decoding
}


def _model_and_params(name: str):
    cfg = PRESETS[name]
    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, cfg.vocab_size)
    return model, strip_axis_names(model.init(jax.random.key(0), tokens)["params"]), tokens


@pytest.mark.parametrize("name", PRESETS)
def test_inference_form_transposes_exactly_the_products(name):
    """Every product weight is its trained self with inputs and outputs swapped; the
    embedding, norms and biases are as the untransposed form has them."""
    model, params, _ = _model_and_params(name)
    plain_model, plain = model.inference_form(params)
    served_model, served = model.inference_form(params, transposed=True)
    assert served_model.cfg == plain_model.cfg.replace(weights_layout="out_in")
    products = {"query": 1, "key": 1, "value": 1, "out": 2, "up": 1, "gate": 1, "down": 1}
    products["lm_head"] = 1
    flat_served = dict(jax.tree_util.tree_leaves_with_path(served))
    seen = set()
    for path, x in jax.tree_util.tree_leaves_with_path(plain):
        leaf = path[-1].key
        if leaf in products:
            n_in = products[leaf]
            perm = tuple(range(n_in, x.ndim)) + tuple(range(n_in))
            np.testing.assert_array_equal(flat_served[path], jnp.transpose(x, perm))
            seen.add(leaf)
        else:
            np.testing.assert_array_equal(flat_served[path], x)
    assert seen >= {"query", "key", "value", "out", "down"}


def test_a_model_made_in_the_served_layout_draws_each_weight_at_its_trained_scale():
    """std 1/sqrt(inputs) whichever way a weight is stored: the fan-in is not its first
    dimension once the outputs come first."""
    cfg = get_preset("tiny-llama")
    tokens = jnp.zeros((1, 4), jnp.int32)

    def stds(layout: str) -> dict[str, float]:
        params = LanguageModel(cfg.replace(weights_layout=layout)).init(jax.random.key(0), tokens)
        leaves = jax.tree_util.tree_leaves_with_path(strip_axis_names(params["params"]))
        return {jax.tree_util.keystr(p): float(jnp.std(x)) for p, x in leaves if x.ndim > 1}

    trained, served = stds("in_out"), stds("out_in")
    for path, std in trained.items():
        assert served[path] == pytest.approx(std, rel=0.2), path


def _decode(cfg, params, tokens, transposed: bool):
    """Logits of a prefill of 6 tokens, then of 4 one-token steps, in one form."""
    model, params = LanguageModel(cfg).inference_form(params, transposed)
    return cached_decoding_logits(model, params, tokens, 6)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("products", ["xla", "pallas"])
def test_transposed_decoding_equals_trained_layout(name, products):
    """Prefill and one-row decoding steps give the trained layout's logits: XLA's
    reductions along the weights' rows ("xla"), and the decoding kernel reading [N, K]
    weights for every product it takes ("pallas", in the interpreter here)."""
    _, params, tokens = _model_and_params(name)
    cfg = PRESETS[name].replace(decode_matmul=products)
    want = _decode(cfg.replace(decode_matmul="xla"), params, tokens, transposed=False)
    got = _decode(cfg, params, tokens, transposed=True)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["gpt2-like", "tiny-llama"])
def test_sampler_transposed_equals_two_rows(name):
    """Greedy samples of one prompt: the same tokens as the two-row form."""
    _, params, tokens = _model_and_params(name)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
    lengths = jnp.asarray([7], jnp.int32)
    out = {
        impl: make_sampler(LanguageModel(PRESETS[name].replace(decode_matmul=impl)), sampling)(
            params, tokens[:, :7], lengths, jax.random.key(0)
        )
        for impl in ("xla", "transposed")
    }
    np.testing.assert_array_equal(out["transposed"].tokens_BT, out["xla"].tokens_BT)
    np.testing.assert_allclose(out["transposed"].logprobs_BT, out["xla"].logprobs_BT)


def test_when_the_transposed_form_is_used(monkeypatch):
    """ "transposed": one sequence, on one device. "auto": on a GPU, where the copy of the
    weights takes at most a quarter of its memory; never off the GPU or on a mesh."""
    cfg = get_preset("tiny", decode_matmul="transposed")
    assert auto.use_transposed_decoding(cfg, 1)
    assert not auto.use_transposed_decoding(cfg, 2)
    assert not auto.use_transposed_decoding(cfg.replace(decode_matmul="xla"), 1)
    default = cfg.replace(decode_matmul="auto")
    monkeypatch.setattr(auto, "on_gpu", lambda: False)
    assert not auto.use_transposed_decoding(default, 1)
    monkeypatch.setattr(auto, "on_gpu", lambda: True)
    monkeypatch.setattr(auto, "_device_memory_bytes", lambda: 141 * 2**30)
    assert auto.use_transposed_decoding(default, 1, weight_bytes=3 * 2**30)  # gpt-1.3b
    assert not auto.use_transposed_decoding(default, 1, weight_bytes=40 * 2**30)
    assert not auto.use_transposed_decoding(default, 4, weight_bytes=3 * 2**30)
    with sharding.mesh_context(mesh_of(dict(data=2, fsdp=2, tensor=2))):
        assert not auto.use_transposed_decoding(cfg, 1)
        assert not auto.use_transposed_decoding(default, 1)


def test_dense_out_in_equals_dense():
    """`dense` with [*out, *in] weights: one row (a reduction) and several (a product) equal
    the trained layout's product, over two contracted dimensions too."""
    keys = jax.random.split(jax.random.key(3), 3)
    w_HDO = jax.random.normal(keys[0], (4, 8, 24))
    bias = jax.random.normal(keys[1], (24,))
    for rows in (1, 5):
        x = jax.random.normal(keys[2], (rows, 1, 4, 8))
        want = layers.dense(x, w_HDO, bias, n_in=2)
        got = layers.dense(x, jnp.transpose(w_HDO, (2, 0, 1)), bias, n_in=2, out_in=True)
        assert got.shape == want.shape == (rows, 1, 24)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_layout_is_refused():
    with pytest.raises(ValueError, match="weights_layout"):
        get_preset("tiny", weights_layout="transposed")


@pytest.mark.parametrize("combine", ["xla", "kernel"])
def test_the_gpu_sampler_lowers_for_cuda(monkeypatch, combine):
    """The sampler as "auto" builds it on a GPU, for one layer of gpt-1.3b's shapes, lowered
    for CUDA without one: the transposed form, its q/k/v and up-projection kernels, the
    first norm with the position embedding's add, the decode attention (with either
    combine), all inside the decoding loop; each Triton kernel passes Triton's verifier."""
    from functools import partial

    import model.attention as attention
    from model.kernels import decode_attention, decode_matmul, layer_norm
    from tests.helpers import triton_kernels, verify_triton_ir

    cfg = get_preset(
        "gpt-1.3b", n_layers=1, vocab_size=512, max_len=256, attention_backend="reference"
    )
    model = LanguageModel(cfg)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(lambda: strip_axis_names(model.init(jax.random.key(0), tokens)))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
    monkeypatch.setattr(auto, "on_gpu", lambda: True)
    monkeypatch.setattr(auto, "_device_memory_bytes", lambda: 141 * 2**30)
    for module in (decode_attention, decode_matmul, layer_norm):
        monkeypatch.setattr(module, "interpret_mode", lambda: False)
    kernel = partial(decode_attention.decode_attention, combine=combine)
    monkeypatch.setattr(attention, "decode_attention", kernel)
    # a cache of 8 + 184 slots: three 64-slot splits for the decode attention to combine
    sampler = make_sampler(model, SamplingConfig(max_new_tokens=184, temperature=0.0))
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    kernels = triton_kernels(sampler, params["params"], tokens, lengths, jax.random.key(0))
    names = [k.name for k in kernels]
    assert names.count("decode_attention") == 1
    assert names.count("decode_matmul") == 2  # q/k/v into the cache, the up-projection
    assert "norm_fwd" in names  # the first norm with the embedding's add, the final norm
    attention_ir = verify_triton_ir(kernels)[names.index("decode_attention")]
    assert ("tt.atomic_rmw" in attention_ir) == (combine == "kernel")
