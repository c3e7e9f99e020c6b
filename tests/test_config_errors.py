"""Bad configurations fail at construction with a message naming the problem."""

import jax
import jax.numpy as jnp
import pytest

from model.config import ModelConfig, get_preset
from model.transformer import LanguageModel
from train import sharding
from train.optim import OptimConfig, make_optimizer
from train.state import create_train_state


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=64, n_heads=6), "n_heads=6 does not divide d_model=64"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3 does not divide n_heads=4"),
        (dict(attention_backend="flash9000"), "attention_backend='flash9000' is not one of"),
        (dict(norm="batchnorm"), "norm='batchnorm'"),
        (dict(positional="rope", d_model=60, n_heads=4), "RoPE needs an even head_dim"),
        (dict(n_layers=0), "n_layers must be positive"),
        (dict(dropout_rate=1.0), "dropout_rate"),
    ],
)
def test_bad_model_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_head=0), "d_head must be positive"),
        (dict(rope_scaling="llama3"), "rope_scaling='llama3' needs positional='rope'"),
        (dict(positional="rope", rope_scaling="yarn"), "rope_scaling='yarn' is not one of"),
        (dict(positional="rope", rope_scaling="linear", rope_factor=0.5), "rope_factor"),
        (
            dict(positional="rope", rope_scaling="llama3", rope_low_freq_factor=4.0),
            "rope_low_freq_factor must be positive and below rope_high_freq_factor",
        ),
        (dict(vocab_multiple=0), "vocab_multiple must be positive"),
    ],
)
def test_bad_hf_compatibility_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_gpt2_preset_is_gpt2_with_an_internally_padded_vocabulary():
    cfg = get_preset("gpt2-124m")
    assert (cfg.vocab_size, cfg.padded_vocab, cfg.use_bias) == (50257, 50304, True)
    assert ModelConfig(d_model=64, n_heads=4, d_head=24).head_dim == 24


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'.*known presets"):
        get_preset("gpt5")


def test_mesh_size_must_match_device_count():
    with pytest.raises(ValueError, match="mesh size 6 differs from the device count 8"):
        sharding.make_mesh(sharding.MeshConfig(data=3, fsdp=2))
    with pytest.raises(ValueError, match="8 devices are not divisible by 3"):
        sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=3))


def test_global_batch_must_divide_over_data_parallel_devices():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    sharding.check_batch_size(8, mesh)
    with pytest.raises(
        ValueError, match="global batch size 6 is not divisible by the data-parallel size 4"
    ):
        sharding.check_batch_size(6, mesh)


def test_unshardable_parameter_is_named():
    """kv_heads=2 cannot be split over tensor=4: the error names the parameter."""
    cfg = get_preset("tiny-llama")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, tensor=4))
    model = LanguageModel(cfg)
    tx = make_optimizer(OptimConfig(total_steps=10, warmup_steps=1))
    with pytest.raises(ValueError, match=r"\['key'\].*split over mesh axes \('tensor',\)"):
        create_train_state(
            lambda r: model.init(r, jnp.zeros((1, 4), jnp.int32))["params"],
            tx,
            mesh,
            jax.random.key(0),
        )


def test_bad_optimizer_config():
    with pytest.raises(ValueError, match="warmup_steps=20 is more than the 10 steps"):
        OptimConfig(warmup_steps=20, total_steps=10)
    with pytest.raises(ValueError, match="schedule='step'"):
        OptimConfig(schedule="step")


def test_parameters_of_another_shape_are_named():
    """Applying checks each parameter's shape (model/layers.py skips Flax's slower check)."""
    model = LanguageModel(get_preset("tiny"))
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p[:-1] if "up" in jax.tree_util.keystr(path) else p, params
    )
    with pytest.raises(ValueError, match=r"mlp/up has shape .* this model expects"):
        model.apply({"params": params}, tokens)
