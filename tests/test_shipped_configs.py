"""Every config shipped in experiments/configs passes the checks its command makes before it
writes anything, and each model is the size its name says. Most of them are for GPUs and
never run here, so this is what keeps them from rotting when a field changes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from experiments import configs
from experiments.pipeline import validate as validate_pipeline
from model.transformer import LanguageModel
from tests.run_helpers import REPO
from train.pretrain import model_config
from train.pretrain import validate as validate_pretraining
from train.state import count_params, strip_axis_names

CONFIGS = REPO / "experiments" / "configs"
NEEDS_A_MODEL = {"continue_pretraining"}  # its argument is a trained model's directory
NOMINAL_PARAMS = {  # the size in the name, with the embedding (GPT-2's 124M counts it once)
    "gpt2_124m": 124e6,
    "gpt2_350m": 350e6,
    "gpt_1p3b": 1.3e9,
    "llama_1b": 1.1e9,
    "llama_7b": 6.7e9,
}
SHIPPED = sorted(
    p.stem for p in CONFIGS.glob("*.py") if p.stem not in {"__init__", "common", *NEEDS_A_MODEL}
)


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_config_passes_its_commands_checks(name):
    config = configs.load(str(CONFIGS / f"{name}.py"))
    if "pretrain" in config:  # a pipeline: every stage's section
        validate_pipeline(config)
    else:
        validate_pretraining(config)


@pytest.mark.parametrize("name", sorted(NOMINAL_PARAMS))
def test_a_shipped_model_is_the_size_its_name_says(name):
    config = configs.load(str(CONFIGS / f"{name}.py"))
    cfg = model_config(config.model, vocab_size=config.data.vocab_size)
    cfg = cfg.replace(attention_backend="reference")  # llama_7b's cuDNN: not on a CPU
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(LanguageModel(cfg).init, jax.random.key(0), tokens)
    n = count_params(strip_axis_names(params))
    assert abs(n / NOMINAL_PARAMS[name] - 1) < 0.05, f"{name}: {n / 1e6:.1f}M parameters"


def test_every_config_file_is_checked():
    assert set(SHIPPED) | NEEDS_A_MODEL | {"__init__", "common"} == {
        p.stem for p in CONFIGS.glob("*.py")
    }
    assert set(NOMINAL_PARAMS) < set(SHIPPED)
