"""Pretraining: `python -m experiments.pretrain --config=experiments/configs/NAME.py --workdir=DIR`.

With no arguments it trains the default (stdlib_tiny: the Python standard library, a small
model, a few minutes on a CPU) in ./runs/stdlib_tiny, preparing the data and tokenizer
first if they are missing. Interrupt it at any time and run the same command again to
resume exactly. Exit statuses: experiments/cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

from experiments import cli

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "stdlib_tiny.py")
cli.define_config(DEFAULT_CONFIG, "experiment config file", lock_config=True)
flags.DEFINE_string("workdir", "runs/stdlib_tiny", "where checkpoints, metrics and plots go")
FLAGS = flags.FLAGS


def run() -> None:
    from train.pretrain import train

    print(json.dumps(train(FLAGS.config, FLAGS.workdir), indent=2))


if __name__ == "__main__":
    cli.main(run)
