"""Evaluation of a trained (or imported) model on prepared text.

`python -m experiments.evaluate --workdir=STAGE_DIR --data=PREPARED_DIR [--split=val]`

STAGE_DIR is any stage directory (DIR/pretrain, DIR/sft, ... or an imported model);
PREPARED_DIR is a `data.prepare` output tokenized with that model's tokenizer
(`python -m data.prepare --corpus=... --out=PREPARED_DIR --tokenizer=STAGE_DIR/tokenizer`).
Every token of the split is scored once, rows packed as in training, and the loss
(nats/token), perplexity and bits per byte (comparable across tokenizers) are printed as
JSON. With --max_batches the figures are an estimate from the split's first batches, and the
JSON's "scored" says so ("first N of M batches"; "whole split" otherwise). Nothing is
written. Exit statuses: experiments/cli.py.
"""

from __future__ import annotations

import json

from absl import flags

from experiments import cli

cli.define_model_flags()
flags.DEFINE_string("data", None, "a prepared data directory (data.prepare --out)", required=True)
flags.DEFINE_string("split", "val", "which split of it: val or train")
flags.DEFINE_integer("seq_len", 0, "tokens a row (0: the model's max_len)")
flags.DEFINE_integer("batch_size", 8, "rows a batch, over all devices")
flags.DEFINE_integer("max_batches", 0, "stop after this many batches (0: the whole split)")
FLAGS = flags.FLAGS


def run() -> None:
    from train.evaluate import evaluate_checkpoint

    if FLAGS.max_batches < 0 or FLAGS.seq_len < 0:
        raise ValueError("--max_batches and --seq_len must be >= 0 (0: all, the model's)")
    result = evaluate_checkpoint(
        FLAGS.workdir,
        FLAGS.data,
        split=FLAGS.split,
        seq_len=FLAGS.seq_len,
        batch_size=FLAGS.batch_size,
        max_batches=FLAGS.max_batches or None,
        which=FLAGS.checkpoint,
        progress=True,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli.main(run)
