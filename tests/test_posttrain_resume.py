"""Post-training stages run in the one loop: killed or stopped mid-way, they resume from
their last checkpoint to the same final params and per-step metrics as an uninterrupted
run, bit for bit; SIGTERM saves, exits 4 and leaves the stage unfinished; a checkpoint of
another config is refused."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from data.array_batches import ArrayBatches
from docs import run_figures
from experiments import grpo, ppo, reward, sft
from experiments.cli import EXIT_INTERRUPTED
from model.transformer import LanguageModel
from tests.run_helpers import REPO, cpu_env, posttrain_config
from train import loop, sharding
from train.metrics_writer import MetricsWriter
from train.saved_model import finished_results, load_params, read_latest_meta
from train.state import abstract_params


class Crash(RuntimeError):
    """Stands for a kill in the middle of a stage."""


def crash_at(monkeypatch, at: int) -> None:
    """The stage dies right after step `at` was logged, before it could checkpoint it."""
    original = loop._Run._flush

    def flush(self):
        pending = self.pending
        original(self)
        if pending is not None and pending[0] == at:
            raise Crash(f"killed at step {at}")

    monkeypatch.setattr(loop._Run, "_flush", flush)


@pytest.fixture(scope="module")
def pipeline(pretrained):
    """(config, DIR) with DIR/pretrain trained and DIR/posttrain_data written: to copy."""
    return posttrain_config(pretrained.corpus, pretrained.data_dir), pretrained.root


@pytest.fixture(scope="module")
def pipeline_for_ppo(pipeline, tmp_path_factory):
    """`pipeline` plus DIR/sft and DIR/reward, each trained for a few steps."""
    config, source = pipeline
    root = shutil.copytree(source, tmp_path_factory.mktemp("ppo") / "pipeline")
    sft.run(config, root)
    reward.run(config, root)
    return config, root


def copy_of(pipeline, directory: Path) -> Path:
    return shutil.copytree(pipeline[1], directory)


def rows(stage_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl, duplicates included, without the wall-clock figures."""
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    timed = ("time", "per_s", "seconds")
    return [
        {k: v for k, v in json.loads(x).items() if not any(t in k for t in timed)} for x in lines
    ]


def final_params(root: Path, stage: str) -> list[np.ndarray]:
    from model.config import ModelConfig
    from train.saved_model import read_latest_meta

    meta = read_latest_meta(root / stage)
    mesh = sharding.make_mesh(sharding.MeshConfig())
    target = abstract_params(LanguageModel(ModelConfig(**meta["model"])), mesh)
    if meta.get("lm_params"):
        target = {meta["lm_params"]: target}
    _, params, _ = load_params(root / stage, target)
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(params))]


def without_times(result: dict) -> dict:
    timed = ("time", "per_s", "seconds")
    return json.loads(
        json.dumps({k: v for k, v in result.items() if not any(t in k for t in timed)})
    )


def assert_same_run(stage: str, full: Path, resumed: Path) -> None:
    assert rows(resumed / stage) == rows(full / stage)  # no duplicated rows either
    for a, b in zip(final_params(full, stage), final_params(resumed, stage)):
        np.testing.assert_array_equal(a, b)


def test_sft_resumes_exactly_after_a_crash(pipeline, tmp_path, monkeypatch, caplog):
    config = pipeline[0]
    full, killed = copy_of(pipeline, tmp_path / "full"), copy_of(pipeline, tmp_path / "killed")
    expected = sft.run(config, full)
    assert [r["step"] for r in rows(full / "sft") if "sft/loss" in r] == list(range(1, 7))

    with monkeypatch.context() as m:
        crash_at(m, 5)  # checkpoints at 2 and 4; step 5 logged, then lost
        with pytest.raises(Crash):
            sft.run(config, killed)
    assert sorted(int(p.name) for p in (killed / "sft" / "checkpoints").iterdir()) == [2, 4]
    assert finished_results(killed / "sft", 6) is None

    with caplog.at_level(logging.INFO):
        got = sft.run(config, killed)
    assert "sft: resumed from step 4" in caplog.text
    assert without_times(got) == without_times(expected)
    assert_same_run("sft", full, killed)
    # A finished stage returns its recorded results without running again.
    assert without_times(sft.run(config, killed)) == without_times(expected)


def _logs_every_panel_of_the_guide(stage_dir: Path, panels: list[tuple[str, str]]) -> None:
    """The guide's curves of this stage (docs/figures.py) find every series they plot."""
    keys = {k for record in run_figures.read_jsonl(stage_dir / "metrics.jsonl") for k in record}
    assert [s for s, _ in panels if not run_figures.has_panel(keys, s)] == []


def test_ppo_resumes_exactly_after_a_crash(pipeline_for_ppo, tmp_path, monkeypatch, caplog):
    config = pipeline_for_ppo[0]
    full = copy_of(pipeline_for_ppo, tmp_path / "full")
    killed = copy_of(pipeline_for_ppo, tmp_path / "killed")
    expected = ppo.run(config, full)
    _logs_every_panel_of_the_guide(full / "ppo", run_figures.PPO_PANELS)

    with monkeypatch.context() as m:
        crash_at(m, 3)
        with pytest.raises(Crash):
            ppo.run(config, killed)

    with caplog.at_level(logging.INFO):
        got = ppo.run(config, killed)
    assert "ppo: resumed from step 2" in caplog.text
    # The adaptive KL coefficient (host state) carried over through the checkpoint.
    assert without_times(got) == without_times(expected)
    assert got["ppo/beta"] != config.ppo.algorithm.kl_coef
    assert_same_run("ppo", full, killed)


def test_grpo_resumes_exactly_after_a_crash(pipeline_for_ppo, tmp_path, monkeypatch, caplog):
    config = pipeline_for_ppo[0]
    full = copy_of(pipeline_for_ppo, tmp_path / "full")
    killed = copy_of(pipeline_for_ppo, tmp_path / "killed")
    expected = grpo.run(config, full)
    _logs_every_panel_of_the_guide(full / "grpo", run_figures.GRPO_PANELS)
    assert set(expected["ground_truth"]) == {"sft", "grpo"}
    assert "grpo/check_parses" in expected and "grpo/reward_mean" in expected

    with monkeypatch.context() as m:
        crash_at(m, 3)
        with pytest.raises(Crash):
            grpo.run(config, killed)
    with caplog.at_level(logging.INFO):
        got = grpo.run(config, killed)
    assert "grpo: resumed from step 2" in caplog.text
    assert without_times(got) == without_times(expected)
    assert_same_run("grpo", full, killed)


def test_sigterm_in_the_pipeline_saves_exits_4_and_the_same_command_resumes(pipeline, tmp_path):
    """A real process gets SIGTERM during SFT: it saves, exits 4, SFT is not finished; the
    same command then finishes it, with the metrics of an uninterrupted run."""
    config, _ = pipeline
    full, stopped = copy_of(pipeline, tmp_path / "full"), copy_of(pipeline, tmp_path / "stopped")
    config_file = tmp_path / "config.py"
    data = config.pretrain.data
    config_file.write_text(
        "from pathlib import Path\n"
        "from tests.run_helpers import posttrain_config\n\n\n"
        "def get_config():\n"
        f"    c = posttrain_config(Path({data.corpus[5:]!r}), Path({data.dir!r}))\n"
        "    c.stages = 'sft'\n"
        "    c.sft.train.num_steps = 40\n"
        "    return c\n"
    )
    # 40 steps, so that SIGTERM lands mid-way; the uninterrupted reference runs in-process.
    config_40 = config.copy_and_resolve_references()
    config_40.sft.train.num_steps = 40
    sft.run(config_40, full)

    command = [
        sys.executable,
        "-m",
        "experiments.pipeline",
        f"--config={config_file}",
        f"--workdir={stopped}",
    ]
    env = cpu_env(jax.device_count())  # the devices and compiled programs of the reference
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = stopped / "sft" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    _, err = process.communicate(timeout=240)
    assert process.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert finished_results(stopped / "sft", 40) is None
    assert (stopped / "sft" / "checkpoints").is_dir()

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert finished_results(stopped / "sft", 40) is not None
    assert_same_run("sft", full, stopped)


def test_a_checkpoint_of_another_config_is_refused_untouched(pipeline, tmp_path):
    config, root = pipeline[0], copy_of(pipeline, tmp_path / "run")
    sft.run(config, root)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    for field, value, line in (
        ("sft.train.global_batch_size", 16, "sft.train.global_batch_size: 8 -> 16"),
        ("sft.optim.lr", 0.5, "sft.optim.lr: 0.001 -> 0.5"),
    ):
        other = config.copy_and_resolve_references()
        other.update_from_flattened_dict({field: value})
        with pytest.raises(ValueError, match="another experiment") as error:
            sft.run(other, root)
        assert line in str(error.value)
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    # Cadence and length are not the experiment: a finished stage stays finished.
    relaxed = config.copy_and_resolve_references()
    relaxed.sft.train.update(eval_every=5, log_every=3, checkpoint_every=5)
    assert sft.run(relaxed, root)["sft/train_rows"] > 0


def test_a_stage_trained_from_an_earlier_checkpoint_of_its_input_is_refused(
    pipeline_for_ppo, tmp_path
):
    """SFT trained further after the reward model learned from it: the finished reward stage
    is not its result any more, and is not reported as one."""
    config, source = pipeline_for_ppo
    root = shutil.copytree(source, tmp_path / "pipeline")
    sft_steps = config.sft.train.num_steps
    inputs = read_latest_meta(root / "reward")["inputs"]
    assert inputs == [{"dir": "sft", "which": "latest", "step": sft_steps}]
    longer = config.copy_and_resolve_references()
    longer.sft.train.num_steps = sft_steps + 2
    longer.sft.optim.total_steps = sft_steps  # the same schedule: a resume, not a new run
    sft.run(longer, root)
    with pytest.raises(ValueError, match=f"from step {sft_steps} of sft, which now gives step"):
        reward.run(longer, root)


def test_array_batches_are_a_function_of_the_position_and_split_over_processes():
    arrays = {"x": np.arange(10)}
    whole = ArrayBatches(arrays, 4, seed=1)
    first = [next(whole)["x"] for _ in range(6)]
    tail = ArrayBatches(arrays, 4, seed=1)
    tail.set_state({"position": 3})
    np.testing.assert_array_equal(
        np.stack(first[3:]), np.stack([next(tail)["x"] for _ in range(3)])
    )
    assert len(set(np.concatenate(first[:2]).tolist())) == 8  # no repeats within an epoch
    halves = [ArrayBatches(arrays, 4, seed=1, process_index=p, process_count=2) for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([next(h)["x"] for h in halves]), first[0])


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


@pytest.fixture
def poison_batch_3(monkeypatch):
    """The third batch a post-training stage draws carries a NaN loss weight."""
    original = ArrayBatches.__next__

    def poisoned(self):
        batch = original(self)
        if self.position == 3:
            batch = dict(batch)
            batch["weights"] = batch["weights"].copy()
            batch["weights"][0, 0] = np.nan
        return batch

    monkeypatch.setattr(ArrayBatches, "__next__", poisoned)


def test_a_nonfinite_sft_step_stops_the_stage_with_a_diagnostic(pipeline, tmp_path, poison_batch_3):
    config, root = pipeline[0], copy_of(pipeline, tmp_path / "run")
    with pytest.raises(loop.NonFiniteError, match="sft: non-finite loss and grad at step 3"):
        sft.run(config, root)
    assert sorted(int(p.name) for p in (root / "sft" / "checkpoints").iterdir()) == [2]
    assert finished_results(root / "sft", 6) is None


def test_a_nonfinite_sft_step_is_skipped_and_counted_when_configured(
    pipeline, tmp_path, poison_batch_3
):
    config, root = pipeline[0], copy_of(pipeline, tmp_path / "run")
    config = config.copy_and_resolve_references()
    config.sft.train.skip_nonfinite = True
    results = sft.run(config, root)
    assert results["sft/skipped_steps"] == 1


def test_the_sample_command_chats_with_the_sft_model(pipeline_for_ppo):
    """--chat: the prompt as a user's turn of the SFT template, the answer up to <|end|>."""
    result = subprocess.run(
        [sys.executable, "-m", "experiments.sample", f"--workdir={pipeline_for_ppo[1] / 'sft'}",
         "--chat", "--system=Answer in Python.", "--prompt=Write the Python function `f0`:",
         "--num_samples=2", "--max_new_tokens=12", "--temperature=0"],
        env=cpu_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    answers = result.stdout.split("--- answer ")[1:]
    assert len(answers) == 2 and answers[0] == answers[1].replace("1 ---", "0 ---", 1)
    assert "<|end|>" not in result.stdout and "Write the Python" not in result.stdout

    # without --prompt, a conversation on stdin: each answer sees the turns before it; a turn
    # longer than the context is refused, and the conversation goes on
    talk = subprocess.run(
        [sys.executable, "-m", "experiments.sample", f"--workdir={pipeline_for_ppo[1] / 'sft'}",
         "--chat", "--max_new_tokens=12", "--temperature=0"],
        input="Write the Python function `f0`:\n" + "x" * 200 + "\nAnd `f1`?\n\nnot read\n",
        env=cpu_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert talk.returncode == 0, talk.stderr[-3000:]
    lines = talk.stdout.splitlines()
    assert sum(line.startswith("model> ") for line in lines) == 2
    assert any(line.startswith("(that turn takes 2") for line in lines)
