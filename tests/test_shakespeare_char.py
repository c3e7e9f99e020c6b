"""nanoGPT's character-level Shakespeare recipe runs end to end, with dropout."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.configs.shakespeare_char import get_config
from train.metrics_writer import read_metrics
from train.pretrain import train

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} is absent")
def test_shakespeare_char_recipe_trains(tmp_path, capsys):
    config = get_config()
    assert (config.model.n_layers, config.model.n_heads, config.model.d_model) == (6, 6, 384)
    assert config.model.dropout_rate == 0.2 and config.optim.b2 == 0.99
    # The recipe as written, shortened: 4 small steps so the suite stays fast.
    config.data.corpus = f"text:{SHAKESPEARE}"
    config.data.seq_len = 64
    config.train.global_batch_size = 8
    config.train.num_steps = 4
    config.optim.total_steps = 5000  # the recipe's schedule, of which these are the first steps
    config.train.eval_every = 4
    config.train.eval_batches = 2
    config.train.log_every = 1
    # the samples printed at the end: an untrained model, whose 128-row table is padded past
    # the ~70 characters, so ids past the vocabulary would be drawn if the sampler allowed it
    config.sample.num_samples, config.sample.max_new_tokens = 2, 40
    final = train(config, tmp_path / "run")
    printed = capsys.readouterr().out
    assert printed.count("--- sample ") == 2 and "\ufffd" not in printed
    losses = [
        r["train/loss"]
        for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
        if "train/loss" in r
    ]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert 0 < final["eval/bits_per_byte"] < 8
    meta = (tmp_path / "run" / "data" / "meta.json").read_text()
    assert '"tokenizer": "char"' in meta
