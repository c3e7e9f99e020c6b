"""Sampling from a trained checkpoint.

`python -m experiments.sample --workdir=DIR --prompt="def " [--num_samples=4 --temperature=0.8]`
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import ConfigDict

from experiments import cli
from model.sampling import SamplingConfig, make_sampler, sample_texts
from train import sharding
from train.trainer import load_for_inference

flags.DEFINE_string("workdir", None, "a workdir written by experiments.pretrain", required=True)
flags.DEFINE_string("prompt", "", "text to continue")
flags.DEFINE_integer("num_samples", 2, "how many continuations")
flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate at most")
flags.DEFINE_float("temperature", 0.8, "0 means greedy")
flags.DEFINE_integer("top_k", 40, "0 disables top-k")
flags.DEFINE_float("top_p", 1.0, "1.0 disables nucleus sampling")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "newest, or lowest eval loss")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    cli.setup()
    config_path = Path(FLAGS.workdir) / "config.json"
    if not config_path.exists():
        sys.exit(f"error: {config_path} does not exist; is {FLAGS.workdir} a training workdir?")
    config = ConfigDict(json.loads(config_path.read_text()))
    model, params, tokenizer, mesh, step = load_for_inference(
        config, FLAGS.workdir, FLAGS.checkpoint
    )
    sampling = SamplingConfig(
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    with sharding.mesh_context(mesh):
        texts = sample_texts(
            make_sampler(model, sampling),
            params,
            tokenizer,
            [FLAGS.prompt] * FLAGS.num_samples,
            jax.random.key(FLAGS.seed),
        )
    print(f"checkpoint step {step}")
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{FLAGS.prompt}{text}")


if __name__ == "__main__":
    app.run(main)
