"""The decoding products' kernel equals its plain-JAX definition, and a model decoding with
it equals the same model decoding with XLA's products.

On CPU the kernel runs in Pallas' interpreter; one test lowers it for CUDA (Triton IR),
which catches what the interpreter accepts but Triton does not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import auto, layers
from model.config import get_preset
from model.kernels import decode_matmul as dm
from model.sampling import SamplingConfig, make_sampler
from model.transformer import LanguageModel, init_cache
from tests.helpers import cached_decoding_logits, mesh_of, triton_kernels, verify_triton_ir
from train import sharding
from train.state import strip_axis_names

SMALL = dm.Tuning(block_n=16, block_k=32, stages=2)


def _case(rows, k, ns, dtype, seed=0):
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(ns) + 1))
    x = jax.random.normal(next(keys), (rows, k), dtype)
    weights = [jax.random.normal(next(keys), (k, n), dtype) * k**-0.5 for n in ns]
    # a bias for every other weight: biased and unbiased products in one kernel
    biases = [jax.random.normal(next(keys), (n,)) if i % 2 == 0 else None for i, n in enumerate(ns)]
    return x, weights, biases


@pytest.mark.parametrize("rows", [1, 2, 4, 16])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_equals_definition(rows, activation):
    """Several weights of different widths in one call, K spanning several loop steps."""
    x, weights, biases = _case(rows, 96, (48, 32, 64), jnp.float32)
    got = dm.decode_matmul(x, weights, biases, activation=activation, tuning=SMALL)
    want = dm.reference_decode_matmul(x, weights, biases, activation=activation)
    assert [g.shape for g in got] == [(rows, 48), (rows, 32), (rows, 64)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
def test_weights_nk_equal_definition(rows):
    """Weights stored [N, K] (`weights_nk`, the sampler's transposed form): the same
    products, with a norm, a residual, GELU and caches written as with [K, N] weights."""
    x, weights, biases = _case(rows, 128, (32, 32, 32), jnp.float32)
    x = 3.0 * x + 1.5
    norm = dm.InputNorm(jax.random.normal(jax.random.key(7), (128,)), None, 1e-5, False)
    res = jax.random.normal(jax.random.key(8), x.shape)
    kw = dict(activation="gelu", norm=norm, residual_RK=res)
    cache = jax.random.normal(jax.random.key(9), (rows, 5, 2, 16))
    slots = jnp.asarray([3, 1][:rows], jnp.int32)
    caches = dict(caches=[None, cache, None], slots_R=slots)
    want = dm.decode_matmul(x, weights, biases, tuning=SMALL, **kw, **caches)
    nk = [w.T for w in weights]
    got = dm.decode_matmul(x, nk, biases, weights_nk=True, tuning=SMALL, **kw, **caches)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        got[0], dm.reference_decode_matmul(x, weights, biases, **kw)[0], rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="does not take 128 input features"):
        dm.decode_matmul(x, weights[:1], weights_nk=True)  # [K, N] where [N, K] is due


def test_one_row_nk_default_tunings_equal_definition():
    """One row against [N, K] weights with the default block shapes: 8 columns a program
    up to `NARROW_OUTPUTS` outputs (widths multiples of 8 only: no tensor-core tile), 16
    above, each K spanning several loop steps."""
    for ns in [(24, 8, 40), (dm.NARROW_OUTPUTS + 16,)]:
        x, weights, biases = _case(1, 1024, ns, jnp.float32)
        got = dm.decode_matmul(x, [w.T for w in weights], biases, weights_nk=True)
        want = dm.reference_decode_matmul(x, weights, biases)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert dm.supported(1, 1024, [24], dm.NARROW_ROW_TUNING, weights_nk=True)
    assert not dm.supported(1, 1024, [24], dm.NARROW_ROW_TUNING)  # a tensor-core tile
    assert not dm.supported(2, 1024, [24], dm.NARROW_ROW_TUNING, weights_nk=True)


def test_bfloat16_and_float32_weights():
    """bf16 rows with bf16 weights, and with float32 weights (rounded inside the kernel):
    float32 sums of bf16 products, so within bf16's output rounding of the definition."""
    x, weights, biases = _case(2, 256, (64,), jnp.bfloat16)
    want = dm.reference_decode_matmul(x, weights, biases)[0].astype(jnp.float32)
    for w in (weights[0], weights[0].astype(jnp.float32)):
        (got,) = dm.decode_matmul(x, [w], biases)  # the default tuning
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_writes_into_caches(rows):
    """Products with a cache land in slot slots[r] of cache row r, clamped to the last slot
    as `dynamic_update_slice` clamps, every other slot untouched; the others are returned."""
    x, weights, biases = _case(rows, 64, (32, 32, 32), jnp.float32)
    S, G, D = 5, 2, 16
    k_cache, v_cache = jax.random.normal(jax.random.key(9), (2, rows, S, G, D))
    slots = jnp.asarray([3, 0, 7, 4][:rows], jnp.int32)  # 7: past the end
    q, k_new, v_new = dm.decode_matmul(
        x, weights, biases, caches=[None, k_cache, v_cache], slots_R=slots, tuning=SMALL
    )
    want_q, want_k, want_v = dm.reference_decode_matmul(x, weights, biases)

    def written(cache, new_RN):
        put = lambda row, new, slot: jax.lax.dynamic_update_slice_in_dim(row, new, slot, 0)  # noqa: E731
        return jax.vmap(put)(cache, new_RN.reshape(rows, 1, G, D), slots)

    np.testing.assert_allclose(q, want_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k_new, written(k_cache, want_k), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v_new, written(v_cache, want_v), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs slots_R"):
        dm.decode_matmul(x, weights, caches=[None, k_cache, v_cache], tuning=SMALL)
    with pytest.raises(ValueError, match="does not take"):
        dm.decode_matmul(x, weights, caches=[k_cache[:, :, :1], None, None], slots_R=slots)


@pytest.mark.parametrize("rows", [1, 2, 16])
@pytest.mark.parametrize(
    "rms, norm_bias, residual", [(False, True, True), (False, False, False), (True, False, True)]
)
def test_input_norm_and_residual_equal_definition(rows, rms, norm_bias, residual):
    """The kernel normalises its rows itself (LayerNorm with and without a bias, RMSNorm),
    after adding the residual where one is given, and returns that sum after the products:
    rows with a mean and scale far from 0 and 1, as a residual stream's are."""
    x, weights, biases = _case(rows, 128, (48, 32), jnp.float32)
    keys = jax.random.split(jax.random.key(7), 3)
    x = 3.0 * x + 1.5
    norm = dm.InputNorm(
        jax.random.normal(keys[0], (128,)),
        jax.random.normal(keys[1], (128,)) if norm_bias else None,
        1e-5,
        rms,
    )
    res = jax.random.normal(keys[2], x.shape) if residual else None
    kw = dict(activation="gelu", norm=norm, residual_RK=res)
    got = dm.decode_matmul(x, weights, biases, tuning=SMALL, **kw)
    want = dm.reference_decode_matmul(x, weights, biases, **kw)
    assert len(got) == len(want) == 2 + residual
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    if residual:
        np.testing.assert_allclose(got[-1], x + res, rtol=1e-6)


def test_input_norm_bfloat16_rows_with_outlier_features():
    """bf16 rows like a residual stream's (an offset, and a few features 30x the others) at
    gpt-1.3b's width, a bf16 norm scale: within bf16's rounding of the definition."""
    x, weights, _ = _case(2, 2048, (128,), jnp.bfloat16, seed=3)
    x = (x.astype(jnp.float32) + 0.5).at[:, :4].mul(30.0).astype(jnp.bfloat16)
    res = (0.5 * jax.random.normal(jax.random.key(4), x.shape)).astype(jnp.bfloat16)
    scale = (1.0 + 0.1 * jax.random.normal(jax.random.key(5), (2048,))).astype(jnp.bfloat16)
    kw = dict(norm=dm.InputNorm(scale, None, 1e-5, False), residual_RK=res)
    got_y, got_sum = dm.decode_matmul(x, weights, **kw)
    want_y, want_sum = dm.reference_decode_matmul(x, weights, **kw)
    np.testing.assert_array_equal(got_sum, want_sum)
    np.testing.assert_allclose(
        got_y.astype(jnp.float32), want_y.astype(jnp.float32), rtol=2e-2, atol=2e-2
    )


def test_input_norm_refusals():
    x, weights, _ = _case(2, 96, (32,), jnp.float32)
    norm = dm.InputNorm(jnp.ones(96), None, 1e-5, False)
    assert not dm.supports_input_norm(96) and dm.supports_input_norm(2048)
    with pytest.raises(ValueError, match="power of two features"):
        dm.decode_matmul(x, weights, norm=norm)  # 96 features
    with pytest.raises(ValueError, match="without a norm"):
        dm.decode_matmul(x, weights, residual_RK=x)


def test_unsupported_shapes_are_refused():
    x, weights, _ = _case(3, 64, (32,), jnp.float32)
    assert not dm.supported(3, 64, [32])
    with pytest.raises(ValueError, match="power of two rows"):
        dm.decode_matmul(x, weights)
    assert not dm.supported(2, 24, [32])  # 24 inputs: not a multiple of 16
    with pytest.raises(ValueError, match="does not take 48 input features"):
        dm.decode_matmul(jnp.zeros((2, 48)), weights)
    with pytest.raises(ValueError, match="activation"):
        dm.decode_matmul(x[:2], weights, activation="relu")


def test_lowers_to_verified_triton_at_gpt_1p3b_size():
    """gpt-1.3b's q/k/v as one kernel of 3 x 2048 / block_n programs, for one and two rows,
    with a bias (GPT-2's layout) and without, and writing keys and values into caches."""
    block_n = dm.DEFAULT_TUNING.block_n
    for rows in (1, 2):
        x = jax.ShapeDtypeStruct((rows, 2048), jnp.bfloat16)
        w = jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16)
        b = jax.ShapeDtypeStruct((2048,), jnp.float32)

        def qkv(x, wq, wk, wv, b):
            return dm.decode_matmul(x, [wq, wk, wv], [b, None, b], interpret=False)

        kernels = triton_kernels(jax.jit(qkv), x, w, w, w, b)
        assert [(k.name, k.grid) for k in kernels] == [
            ("decode_matmul", (3 * 2048 // block_n, 1, 1))
        ]
        verify_triton_ir(kernels)

        # keys and values written into [rows, 384, 16, 128] caches by the same kernel
        cache = jax.ShapeDtypeStruct((rows, 384, 16, 128), jnp.bfloat16)
        slots = jax.ShapeDtypeStruct((rows,), jnp.int32)

        def qkv_into_cache(x, wq, wk, wv, k_cache, v_cache, slots):
            caches = [None, k_cache, v_cache]
            return dm.decode_matmul(x, [wq, wk, wv], caches=caches, slots_R=slots, interpret=False)

        kernels = triton_kernels(jax.jit(qkv_into_cache), x, w, w, w, cache, cache, slots)
        assert [k.name for k in kernels] == ["decode_matmul"]
        verify_triton_ir(kernels)

        # the same, weights stored [N, K]: one row takes 8 columns a program
        def qkv_nk(x, wq, wk, wv, k_cache, v_cache, slots):
            caches = [None, k_cache, v_cache]
            return dm.decode_matmul(
                x, [wq, wk, wv], caches=caches, slots_R=slots, weights_nk=True, interpret=False
            )

        kernels = triton_kernels(jax.jit(qkv_nk), x, w, w, w, cache, cache, slots)
        nk_block_n = dm.NARROW_ROW_TUNING.block_n if rows == 1 else block_n
        assert [(k.name, k.grid) for k in kernels] == [
            ("decode_matmul", (3 * 2048 // nk_block_n, 1, 1))
        ]
        verify_triton_ir(kernels)

        # the up-projection with its norm and the attention's residual add in the kernel
        w_up = jax.ShapeDtypeStruct((2048, 8192), jnp.bfloat16)
        scale = jax.ShapeDtypeStruct((2048,), jnp.float32)

        def up_with_norm(x, w_up, scale, residual):
            norm = dm.InputNorm(scale, None, 1e-5, False)
            return dm.decode_matmul(
                x, [w_up], activation="gelu", norm=norm, residual_RK=residual, interpret=False
            )

        kernels = triton_kernels(jax.jit(up_with_norm), x, w_up, scale, x)
        assert [(k.name, k.grid) for k in kernels] == [("decode_matmul", (8192 // block_n, 1, 1))]
        verify_triton_ir(kernels)

        # the same with the weight stored [N, K] (the sampler's transposed form)
        def up_nk(x, w_up, scale, residual):
            norm = dm.InputNorm(scale, None, 1e-5, False)
            return dm.decode_matmul(
                x, [w_up], norm=norm, residual_RK=residual, weights_nk=True, interpret=False
            )

        w_nk = jax.ShapeDtypeStruct((8192, 2048), jnp.bfloat16)
        kernels = triton_kernels(jax.jit(up_nk), x, w_nk, scale, x)
        nk_block_n = dm.ROW_TUNING.block_n if rows == 1 else block_n  # 8192 outputs: 16
        assert [(k.name, k.grid) for k in kernels] == [
            ("decode_matmul", (8192 // nk_block_n, 1, 1))
        ]
        verify_triton_ir(kernels)


PRESETS = {
    "gpt2-like": get_preset("tiny", use_bias=True),  # biases, GELU, tied head
    "tiny-llama": get_preset("tiny-llama"),  # SwiGLU, grouped-query heads, untied head
}


@pytest.mark.parametrize("name", PRESETS)
def test_decoding_steps_equal_xla_products(name):
    """Prefill, then one-token steps with the kernel: the same logits as with XLA's
    products (every product of the step but the tied head's goes through the kernel)."""
    cfg = PRESETS[name]
    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    params = strip_axis_names(model.init(jax.random.key(0), tokens)["params"])

    def decode(impl):
        return cached_decoding_logits(
            LanguageModel(cfg.replace(decode_matmul=impl)), params, tokens, 6
        )

    np.testing.assert_allclose(decode("pallas"), decode("xla"), rtol=2e-5, atol=2e-5)


def test_folded_norms_equal_separate_norms():
    """With the kernel, a decoding step computes each block's first norm in one kernel
    with the previous block's residual add (the final norm too), and its second norm and
    first residual add inside the up-projection's kernel (`fold_norms`): the same logits and
    caches as the norms as kernels of their own (`norm_impl="xla"`), and no norm or
    residual add left outside the kernels."""
    cfg = get_preset("tiny", use_bias=True, decode_matmul="pallas")
    model = LanguageModel(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    params = strip_axis_names(model.init(jax.random.key(0), tokens)["params"])
    _, cache = model.apply({"params": params}, tokens[:, :7], cache=init_cache(cfg, 2, 8))
    positions = jnp.full((2, 1), 7, jnp.int32)

    def step(norm_impl):
        m = LanguageModel(cfg.replace(norm_impl=norm_impl))
        return lambda p, c: m.apply({"params": p}, tokens[:, 7:], positions, cache=c)

    assert layers.fold_norms(cfg, jnp.zeros((2, 1, cfg.d_model)), True)
    assert not layers.fold_norms(cfg.replace(norm_impl="xla"), jnp.zeros((2, 1, cfg.d_model)), True)
    (folded, folded_cache), (separate, separate_cache) = (
        step("auto")(params, cache),
        step("xla")(params, cache),
    )
    np.testing.assert_allclose(folded, separate, rtol=2e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(folded_cache), jax.tree.leaves(separate_cache)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)

    def outside_kernels(norm_impl, primitive, shape=None):
        jaxpr = jax.make_jaxpr(step(norm_impl))(params, cache).jaxpr
        return sum(
            e.primitive.name == primitive and shape in (None, e.outvars[0].aval.shape)
            for e in jaxpr.eqns
        )

    # one rsqrt per norm computed outside a kernel
    assert (outside_kernels("auto", "rsqrt"), outside_kernels("xla", "rsqrt")) == (
        0,
        1 + 2 * cfg.n_layers,
    )
    # every residual add in a kernel, the position embedding's too (no zeros either)
    rows = (2, 1, cfg.d_model)
    assert outside_kernels("auto", "add", rows) == 0
    assert outside_kernels("auto", "broadcast_in_dim", rows) == 0


@pytest.mark.parametrize("remat", ["none", "full"])
def test_folded_norms_through_scanned_layers(remat):
    """The folded form's carry, (x, the previous block's MLP output), passes through the
    layer scan (and its remat) as through the unrolled layers: the same logits as the
    norms as kernels of their own."""
    cfg = get_preset("tiny", use_bias=True, decode_matmul="pallas", scan_layers=True, remat=remat)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
    model = LanguageModel(cfg)
    params = strip_axis_names(model.init(jax.random.key(0), tokens)["params"])
    _, cache = model.apply({"params": params}, tokens[:, :7], cache=init_cache(cfg, 2, 8))
    positions = jnp.full((2, 1), 7, jnp.int32)
    assert layers.fold_norms(cfg, jnp.zeros((2, 1, cfg.d_model)), True)
    folded, separate = (
        LanguageModel(cfg.replace(norm_impl=n)).apply(
            {"params": params}, tokens[:, 7:], positions, cache=cache
        )[0]
        for n in ("auto", "xla")
    )
    np.testing.assert_allclose(folded, separate, rtol=2e-5, atol=2e-5)


def test_inference_form_hands_norms_in_float32():
    """The sampler's form of the parameters (`inference_form`, once before the decoding
    loop): the norms' scales and biases in float32, which the decoding kernel reads, every
    other parameter as it was."""
    cfg = get_preset("tiny", use_bias=True)
    model = LanguageModel(cfg)
    params = strip_axis_names(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    _, served = model.inference_form(params)
    for path, x in jax.tree_util.tree_leaves_with_path(served):
        name = jax.tree_util.keystr(path)
        assert x.dtype == (jnp.float32 if "_norm" in name else jnp.bfloat16), name
    n_norm_params = 2 * (2 * cfg.n_layers + 1)  # scale and bias of every norm
    assert sum(x.dtype == jnp.float32 for x in jax.tree.leaves(served)) == n_norm_params


@pytest.mark.parametrize("batch", [1, 4])
def test_sampler_with_kernel_equals_xla(batch):
    """Greedy samples are the same tokens (one sequence is decoded as two identical rows,
    more as they are)."""
    cfg = PRESETS["gpt2-like"]
    model = LanguageModel(cfg)
    prompts = jax.random.randint(jax.random.key(5), (batch, 6), 0, cfg.vocab_size)
    lengths = jnp.asarray([6, 3, 5, 1][:batch], jnp.int32)
    params = strip_axis_names(model.init(jax.random.key(0), prompts)["params"])
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.0)
    out = {
        impl: make_sampler(LanguageModel(cfg.replace(decode_matmul=impl)), sampling)(
            params, prompts, lengths, jax.random.key(0)
        )
        for impl in ("xla", "pallas")
    }
    np.testing.assert_array_equal(out["pallas"].tokens_BT, out["xla"].tokens_BT)


def test_when_the_kernel_is_used(monkeypatch):
    """ "pallas": wherever the kernel takes the shapes. "auto": on a GPU, for products
    with 32 columns per SM (gpt-1.3b's q/k/v and up-projection, not gpt2-124m's, nor
    gpt-1.3b's 2048-column products). Never on a mesh of several devices, which the
    kernel does not split."""
    cfg = get_preset("tiny", decode_matmul="pallas")
    assert auto.use_decode_matmul(cfg, 2, 64, [64])
    assert not auto.use_decode_matmul(cfg, 3, 64, [64])  # 3 rows: not a power of two
    assert not auto.use_decode_matmul(cfg.replace(decode_matmul="xla"), 2, 64, [64])
    default = cfg.replace(decode_matmul="auto")
    monkeypatch.setattr(auto, "on_gpu", lambda: False)
    assert not auto.use_decode_matmul(default, 2, 2048, [2048] * 3)  # not on a GPU
    monkeypatch.setattr(auto, "on_gpu", lambda: True)
    monkeypatch.setattr(auto, "num_sms", lambda: 132)
    assert auto.use_decode_matmul(default, 2, 2048, [2048] * 3)  # gpt-1.3b's q/k/v: 6,144 columns
    assert not auto.use_decode_matmul(default, 2, 768, [768] * 3)  # gpt2-124m: 2,304
    assert auto.use_decode_matmul(default, 2, 2048, [8192])  # gpt-1.3b's up: 8,192 columns
    assert not auto.use_decode_matmul(default, 2, 2048, [2048])  # attention output: 2,048
    assert not auto.use_decode_matmul(default, 2, 768, [3072])  # gpt2-124m's up: 3,072
    mesh = mesh_of(dict(data=2, fsdp=2, tensor=2))
    with sharding.mesh_context(mesh):
        assert not auto.use_decode_matmul(cfg, 2, 64, [64])
        assert not auto.use_decode_matmul(default, 2, 2048, [2048] * 3)
