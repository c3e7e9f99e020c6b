"""The "auto" kernel choices (model/auto.py): the reference code off the GPU, the
Pallas kernels on a GPU where their shapes are supported; config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import auto
from model.attention import Attention
from model.config import ModelConfig, get_preset
from model.transformer import LanguageModel
from train import losses


def test_defaults_are_auto_and_resolve_to_the_reference_off_the_gpu(monkeypatch):
    monkeypatch.setattr(auto, "on_gpu", lambda: False)  # as on the CPU, on any machine
    for name in ("tiny", "gpt2-124m", "gpt-1.3b", "llama-1b"):
        cfg = get_preset(name)
        kernels = (
            cfg.attention_backend,
            cfg.norm_impl,
            cfg.activation_impl,
            cfg.cross_entropy_impl,
            cfg.decode_attention,
            cfg.decode_matmul,
        )
        assert kernels == ("auto",) * 6
        assert auto.choose_backend(cfg, packed=True) == "reference"
        assert auto.choose_norm_impl(cfg) == "xla"
        assert auto.choose_activation_impl(cfg) == "xla"
        assert auto.choose_cross_entropy_impl(cfg) == "xla"
        assert auto.choose_decode_attention(cfg) == "reference"
        assert not auto.use_decode_matmul(cfg, 2, 2048, [2048] * 3)


def test_auto_picks_the_kernels_on_a_gpu(monkeypatch):
    monkeypatch.setattr(auto.jax, "default_backend", lambda: "gpu")
    cfg = get_preset("gpt2-124m")
    assert auto.choose_norm_impl(cfg) == "pallas"
    # in decoding steps XLA's norms, fused with the residual add before them
    assert auto.choose_norm_impl(cfg, decoding=True) == "xla"
    assert auto.choose_norm_impl(cfg.replace(norm_impl="pallas"), decoding=True) == "pallas"
    assert auto.choose_decode_attention(cfg) == "pallas"
    assert auto.choose_activation_impl(cfg) == "pallas"  # GELU with biases
    assert auto.choose_activation_impl(get_preset("gpt-1.3b")) == "pallas"  # GELU, no biases
    assert auto.choose_activation_impl(get_preset("llama-1b")) == "xla"  # SwiGLU
    # the pretraining loss applies the head with the single-pass kernel; evaluation's
    # loss, on the model's logits, takes the kernel pair
    llama = get_preset("llama-1b")
    assert auto.choose_cross_entropy_impl(llama) == "fused"
    assert losses.loss_options(llama)["impl"] == "pallas"
    # rows wider than the norm kernel holds; heads per group not a power of two
    assert auto.choose_norm_impl(cfg.replace(d_model=8448, n_heads=8)) == "xla"
    assert auto.choose_decode_attention(cfg.replace(n_heads=6, d_model=384)) == "pallas"
    assert auto.choose_decode_attention(cfg.replace(n_heads=12, n_kv_heads=4)) == "reference"
    # inside Flax's scan the decode kernel does not trace on the GPU
    assert auto.choose_decode_attention(cfg.replace(scan_layers=True)) == "reference"
    # training with attention dropout: only the reference drops probabilities
    assert auto.choose_backend(cfg, packed=True) == "pallas"
    assert auto.choose_backend(cfg, packed=True, dropout=True) == "reference"
    # an explicit choice is kept on any machine
    assert auto.choose_norm_impl(cfg.replace(norm_impl="xla")) == "xla"
    assert auto.choose_decode_attention(cfg.replace(decode_attention="reference")) == "reference"


def test_explicit_kernels_are_kept_off_the_gpu():
    pallas = dict(
        norm_impl="pallas",
        activation_impl="pallas",
        cross_entropy_impl="pallas",
        decode_attention="pallas",
    )
    cfg = get_preset("tiny", **pallas)
    assert auto.choose_norm_impl(cfg) == "pallas"
    assert auto.choose_activation_impl(cfg) == "pallas"
    assert auto.choose_cross_entropy_impl(cfg) == "pallas"
    assert auto.choose_decode_attention(cfg) == "pallas"


@pytest.mark.parametrize(
    "field",
    ["norm_impl", "activation_impl", "cross_entropy_impl", "decode_attention", "decode_matmul"],
)
def test_config_rejects_unknown_choices(field):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: "fastest"})
    with pytest.raises(ValueError, match="attention_dropout"):
        ModelConfig(attention_dropout=1.0)


def test_auto_model_off_the_gpu_is_the_reference_model(monkeypatch):
    monkeypatch.setattr(auto, "on_gpu", lambda: False)  # resolved at trace time
    tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % 256
    auto_model = LanguageModel(get_preset("tiny"))
    reference = LanguageModel(
        get_preset("tiny", norm_impl="xla", activation_impl="xla", decode_attention="reference")
    )
    params = auto_model.init(jax.random.key(0), tokens)["params"]
    np.testing.assert_array_equal(
        auto_model.apply({"params": params}, tokens), reference.apply({"params": params}, tokens)
    )


def test_attention_dropout_only_while_training():
    """attention_dropout drops attention probabilities (as nanoGPT does), in training only."""
    tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % 256
    model = LanguageModel(get_preset("tiny", attention_dropout=0.5))
    params = model.init(jax.random.key(0), tokens)["params"]
    apply = lambda **kw: model.apply({"params": params}, tokens, **kw)  # noqa: E731
    np.testing.assert_array_equal(
        apply(), LanguageModel(get_preset("tiny")).apply({"params": params}, tokens)
    )
    a, b = (apply(deterministic=False, rngs={"dropout": jax.random.key(i)}) for i in (1, 2))
    assert not np.allclose(a, b)
    # the attention block alone differs too: its probabilities are dropped
    attention = Attention(get_preset("tiny", attention_dropout=0.5), deterministic=False)
    x = jax.random.normal(jax.random.key(3), (2, 12, 64))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    variables = attention.init(jax.random.key(0), x, positions, None)
    run = lambda m: m.apply(variables, x, positions, None, rngs={"dropout": jax.random.key(4)})[0]  # noqa: E731
    assert not np.allclose(run(attention), run(attention.clone(deterministic=True)))


def test_a_run_resumes_under_another_kernel_choice():
    """Kernels compute the same function with the same parameters: a checkpoint written
    with norm_impl="xla" (the old default) resumes under "auto"; other fields still count."""
    from train.workdir import KERNEL_FIELDS, RESUMABLE_PREFIXES, config_differences

    old = {"model": {"norm_impl": "xla", "activation_impl": "xla", "d_model": 64}}
    new = {"model": {"norm_impl": "auto", "activation_impl": "auto", "d_model": 64}}
    assert config_differences(old, new, RESUMABLE_PREFIXES) == []
    assert config_differences(old["model"], new["model"], KERNEL_FIELDS) == []
    assert config_differences(old, {"model": {**new["model"], "d_model": 32}}, RESUMABLE_PREFIXES)


def test_training_steps_use_cublas_on_a_gpu_only_and_compute_the_same(monkeypatch):
    """jit_step compiles every stage's step with step_compiler_options(): cuBLAS GEMMs on a
    GPU, no dynamic-slice fusions (train/sharding.py); the options change kernels, never
    values."""
    from tests.helpers import single_device_mesh
    from train import sharding

    with monkeypatch.context() as m:
        m.setattr(sharding.jax, "default_backend", lambda: "cpu")
        assert sharding.step_compiler_options() == {}
    with monkeypatch.context() as m:
        m.setattr(sharding.jax, "default_backend", lambda: "gpu")
        gpu_options = sharding.step_compiler_options()
    assert gpu_options == {
        "xla_gpu_enable_triton_gemm": False,
        "xla_gpu_enable_dynamic_slice_fusion": False,
    }

    mesh = single_device_mesh()
    batch = {"x": jnp.ones((2, 4))}

    def step(state, batch, rng):
        return state, {"y": (batch["x"] @ state["w"]).sum()}

    def run(options):
        monkeypatch.setattr(sharding, "step_compiler_options", lambda: options)
        shardings = {"w": sharding.replicated(mesh)}
        state = {"w": jnp.arange(16.0).reshape(4, 4)}  # donated: a new one every run
        return sharding.jit_step(step, shardings, mesh)(state, batch, jax.random.key(0))

    plain = run({})[1]["y"]
    np.testing.assert_array_equal(run(gpu_options)[1]["y"], plain)
    with pytest.raises(Exception, match="xla_no_such_option"):  # so the options do arrive,
        run({"xla_no_such_option": True})
    step_ = sharding.jit_step(step, {"w": sharding.replicated(mesh)}, mesh)
    with pytest.raises(Exception, match="xla_no_such_option"):  # also when compiled ahead
        step_.jitted.lower({"w": jnp.ones((4, 4))}, batch, jax.random.key(0)).compile()
