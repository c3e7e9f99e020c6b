"""LoRA through the stage entries (`lora.rank > 0`): SFT lowers the loss with the pretrained
model frozen bit for bit, its checkpoint loads (and exports) as the merged model W + scale A @ B,
resumes exactly after a crash; DPO and GRPO train adapters on the merged SFT model."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from experiments import convert, dpo, grpo, sft
from model import hf
from model.config import ModelConfig
from model.transformer import LanguageModel
from tests.run_helpers import posttrain_config
from tests.test_lora import expected_delta
from tests.test_posttrain_resume import Crash, copy_of, crash_at, rows, without_times
from train import sharding
from train.lora import LoraConfig, LoraModel
from train.saved_model import load_model, load_params, read_latest_meta
from train.state import FROZEN, abstract_params

LORA = dict(rank=4, alpha=8.0, targets="attention,mlp")
SCALE = LoraConfig(**LORA).scale


@pytest.fixture(scope="module")
def pipeline(pretrained):
    """(config, DIR): DIR/pretrain trained (to copy), every policy stage set to LoRA."""
    config = posttrain_config(pretrained.corpus, pretrained.data_dir)
    for name in ("sft", "dpo", "grpo"):
        config[name].lora.update(**LORA)
    config.sft.optim.lr = 1e-2  # adapters want a larger step than a full fine-tune
    return config, pretrained.root


@pytest.fixture(scope="module")
def after_sft(pipeline, tmp_path_factory):
    config, source = pipeline
    root = copy_of(pipeline, tmp_path_factory.mktemp("sft") / "pipeline")
    return config, root, sft.run(config, root)


def saved_lora_params(stage_dir):
    """The {frozen, lora} params a LoRA stage's newest checkpoint holds, unmerged."""
    meta = read_latest_meta(stage_dir)
    model = LoraModel(LanguageModel(ModelConfig(**meta["model"])), LoraConfig(**meta["lora"]))
    target = abstract_params(model, sharding.make_mesh(sharding.MeshConfig()))
    return jax.device_get(load_params(stage_dir, target)[1]), meta


def assert_merged(loaded_params, saved):
    merged = traverse_util.flatten_dict(jax.device_get(loaded_params))
    base = traverse_util.flatten_dict(saved[FROZEN])
    pairs = traverse_util.flatten_dict(saved["lora"])
    adapted = {p[:-1] for p in pairs}
    assert adapted and all(np.any(pairs[p + ("b",)]) for p in adapted)  # trained: B != 0
    for path, w in base.items():
        if path in adapted:
            delta = expected_delta(path[-1], pairs[path + ("a",)], pairs[path + ("b",)], SCALE)
            np.testing.assert_allclose(merged[path], w + delta, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(merged[path], w)


def test_lora_sft_trains_adapters_on_the_frozen_model_and_loads_merged(
    pipeline, after_sft, tmp_path
):
    config, root, result = after_sft
    losses = [r["sft/loss"] for r in rows(root / "sft") if "sft/loss" in r]
    assert len(losses) == config.sft.train.num_steps and losses[-1] < losses[0]
    assert result["eval/loss"] < result["sft/eval_loss_before"]
    saved, meta = saved_lora_params(root / "sft")
    assert meta["lora"] == LORA
    start = load_model(root / "pretrain", which=config.pretrain_checkpoint)
    for a, b in zip(jax.tree.leaves(saved[FROZEN]), jax.tree.leaves(jax.device_get(start.params))):
        np.testing.assert_array_equal(a, b)
    loaded = load_model(root / "sft")
    assert_merged(loaded.params, saved)
    # The HF export writes the merged model.
    convert.export_checkpoint(root / "sft", tmp_path / "hf", dtype="float32")
    cfg, family = hf.read_config(tmp_path / "hf")
    exported = hf.load_params(tmp_path / "hf", cfg, None, family)
    exported = traverse_util.flatten_dict(jax.device_get(exported))
    adapted = {p[:-1] for p in traverse_util.flatten_dict(saved["lora"])}
    for path in adapted:  # (the padded vocabulary rows and GPT-2's biases differ by design)
        np.testing.assert_array_equal(
            exported[path], traverse_util.flatten_dict(jax.device_get(loaded.params))[path]
        )


def test_lora_sft_resumes_exactly_after_a_crash(pipeline, after_sft, tmp_path, monkeypatch):
    config, full, expected = after_sft
    killed = copy_of(pipeline, tmp_path / "killed")
    with monkeypatch.context() as m:
        crash_at(m, 5)
        with pytest.raises(Crash):
            sft.run(config, killed)
    assert without_times(sft.run(config, killed)) == without_times(expected)
    assert rows(killed / "sft") == rows(full / "sft")
    a, b = saved_lora_params(killed / "sft")[0], saved_lora_params(full / "sft")[0]
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("stage", [dpo, grpo], ids=["dpo", "grpo"])
def test_lora_dpo_and_grpo_train_adapters_on_the_merged_sft_model(after_sft, stage):
    config, root, _ = after_sft
    name = stage.__name__.rsplit(".", 1)[-1]
    result = stage.run(config, root)
    assert name in result["ground_truth"]
    saved, meta = saved_lora_params(root / name)
    assert meta["lora"] == LORA
    # The stage's frozen base is the SFT stage's merged model, bit for bit.
    sft_params = jax.device_get(load_model(root / "sft").params)
    for a, b in zip(jax.tree.leaves(saved[FROZEN]), jax.tree.leaves(sft_params)):
        np.testing.assert_array_equal(a, b)
    assert_merged(load_model(root / name).params, saved)
