"""Post-training stages killed mid-way resume from their last checkpoint: the same final
params and the same per-step metrics as an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from experiments import posttrain_common as common
from experiments import ppo, sft
from experiments.resume import ResumeMismatchError, StageResume
from model.config import ModelConfig
from model.transformer import LanguageModel
from rlhf.reward_model import RewardModel, init_from_lm
from tests.run_helpers import prepare_char_corpus, pretrained_pipeline
from train import sharding
from train.metrics_writer import MetricsWriter
from train.state import create_train_state


class Crash(RuntimeError):
    """Stands for a kill in the middle of a stage."""


def crash_at(monkeypatch, at: int) -> None:
    """The stage dies after running step `at`, before it can checkpoint it."""
    original = StageResume.step_done

    def step_done(self, step, state, last=False):
        if step == at:
            raise Crash(f"killed at step {step}")
        original(self, step, state, last)

    monkeypatch.setattr(StageResume, "step_done", step_done)


@pytest.fixture(scope="module", autouse=True)
def compile_once(tmp_path_factory):
    """Each test runs a stage three times, compiling the same programs: a persistent
    compilation cache, for this module only, compiles them once."""
    from jax.experimental.compilation_cache import compilation_cache

    settings = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    previous = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(config, DIR) with DIR/pretrain trained and DIR/posttrain_data written."""
    root = tmp_path_factory.mktemp("posttrain")
    corpus, data_dir = prepare_char_corpus(root / "corpus")
    return pretrained_pipeline(root / "pipeline", corpus, data_dir)


@pytest.fixture(scope="module")
def pipeline_for_ppo(pipeline, tmp_path_factory):
    """`pipeline` plus DIR/sft (the pretrained params) and DIR/reward (its trunk, a new head)."""
    config, source = pipeline
    root = shutil.copytree(source, tmp_path_factory.mktemp("ppo") / "pipeline")
    pre = common.load_pretrained(config, root)
    rm_init = common.params_init(RewardModel(pre.cfg))
    head, _ = create_train_state(rm_init, optax.sgd(0.1), pre.mesh, jax.random.key(1))
    common.save_params(root / "sft", pre.params, {})
    common.save_params(root / "reward", init_from_lm(head.params, pre.params), {})
    return config, root


def copy_of(pipeline, directory: Path) -> Path:
    return shutil.copytree(pipeline[1], directory)


def rows(stage_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl, duplicates included, without the wall-clock timings."""
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if "time" not in k} for x in lines]


def final_params(config, root: Path, stage: str) -> list[np.ndarray]:
    cfg = ModelConfig(**config.pretrain.model.to_dict())
    mesh = sharding.make_mesh(sharding.MeshConfig(**config.pretrain.mesh.to_dict()))
    params = common.load_params(root / stage, common.params_init(LanguageModel(cfg)), mesh)
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]


def without_times(result: dict) -> dict:
    return {k: v for k, v in result.items() if "time" not in k}


def assert_same_run(config, stage: str, full: Path, resumed: Path) -> None:
    assert rows(resumed / stage) == rows(full / stage)  # no duplicated rows either
    for a, b in zip(final_params(config, full, stage), final_params(config, resumed, stage)):
        np.testing.assert_array_equal(a, b)
    assert not (resumed / stage / "resume").exists()  # deleted once the stage is done


def test_sft_resumes_exactly_after_a_crash(pipeline, tmp_path, monkeypatch, caplog):
    config = pipeline[0]
    full, killed = copy_of(pipeline, tmp_path / "full"), copy_of(pipeline, tmp_path / "killed")
    expected = sft.run(config, full)
    assert [r["step"] for r in rows(full / "sft")] == list(range(1, 7))

    with monkeypatch.context() as m:
        crash_at(m, 5)  # checkpoints at 2 and 4; step 5 logged, then lost
        with pytest.raises(Crash):
            sft.run(config, killed)
    assert sorted(int(p.name) for p in (killed / "sft" / "resume").iterdir()) == [2, 4]
    assert [r["step"] for r in rows(killed / "sft")] == list(range(1, 6))

    with caplog.at_level(logging.INFO):
        got = sft.run(config, killed)
    assert "sft: resumed from step 4" in caplog.text
    assert got == expected  # eval loss before SFT too: kept, not measured on trained params
    assert_same_run(config, "sft", full, killed)


def test_ppo_resumes_exactly_after_a_crash(pipeline_for_ppo, tmp_path, monkeypatch, caplog):
    config = pipeline_for_ppo[0]
    full = copy_of(pipeline_for_ppo, tmp_path / "full")
    killed = copy_of(pipeline_for_ppo, tmp_path / "killed")
    expected = ppo.run(config, full)

    with monkeypatch.context() as m:
        crash_at(m, 3)
        with pytest.raises(Crash):
            ppo.run(config, killed)
    assert [r["step"] for r in rows(killed / "ppo")] == [1, 2, 3]

    with caplog.at_level(logging.INFO):
        got = ppo.run(config, killed)
    assert "ppo: resumed from step 2" in caplog.text
    # The adaptive KL coefficient, score history and "before" ground truth carried over.
    assert without_times(got) == without_times(expected)
    assert got["ppo/beta"] != config.ppo.kl_coef
    assert_same_run(config, "ppo", full, killed)


def test_resume_checkpoint_of_another_config_is_refused_untouched(pipeline, tmp_path):
    config, root = pipeline[0], copy_of(pipeline, tmp_path / "run")
    with StageResume(root / "sft", config, every=1) as resume:
        resume.step_done(1, {"x": np.zeros(3, np.float32)})
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    for field, value, line in (
        ("sft.batch_size", 16, "sft.batch_size: 8 -> 16"),
        ("sft.steps", 9, "sft.steps: 6 -> 9"),
        ("pretrain.model.d_model", 64, "pretrain.model.d_model: 32 -> 64"),
    ):
        other = config.copy_and_resolve_references()
        other.update_from_flattened_dict({field: value})
        with pytest.raises(ResumeMismatchError, match="another config") as error:
            sft.run(other, root)
        assert line in str(error.value) and str(root / "sft" / "resume") in str(error.value)
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    # Logging and checkpoint cadence and the mesh may change on resume.
    relaxed = config.copy_and_resolve_references()
    relaxed.sft.log_every, relaxed.sft.checkpoint_every, relaxed.mesh.data = 3, 5, 8
    StageResume(root / "sft", relaxed, every=5).close()


def test_batches_are_a_function_of_the_step():
    arrays = {"x": np.arange(10)}
    whole = [b["x"] for b, _ in zip(common.random_batches(arrays, 3, seed=1), range(9))]
    tail = [b["x"] for b, _ in zip(common.random_batches(arrays, 3, seed=1, start=4), range(5))]
    np.testing.assert_array_equal(np.stack(whole[4:]), np.stack(tail))
    assert sorted(np.concatenate(whole[:3])) == sorted(set(np.concatenate(whole[:3])))


def test_resumed_metrics_writer_drops_rows_of_rerun_steps(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # cut short by the kill
    writer = MetricsWriter(tmp_path, enabled=True, resume_step=3)
    writer.write(4, {"loss": 4.0})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
