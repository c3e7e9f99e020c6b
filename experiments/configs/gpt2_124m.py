"""GPT-2 small (124M) at context 1024, the usual recipe (lr 6e-4, 0.5M-token batches)."""

from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_fields


def get_config() -> ConfigDict:
    c = base_config("gpt2-124m")
    # The blocks' parameters stacked, run as straight-line code (a fully unrolled scan):
    # half the operations to compile, so the first step comes seconds sooner (BENCHMARKS.md,
    # "Speed round six"), and a step 0.9-1.5 ms faster than separate layers on an H200
    # (107.4 ms, 610k tokens/s; "Speed round nineteen").
    # `--config.model.head_matmul=fp8` runs the output head's forward and input-gradient
    # products in float8 on Hopper GPUs: a 1.06x faster step (101.0-101.5 ms, 646k-649k
    # tokens/s) at 0.01-0.04 nats more loss after 600 steps (BENCHMARKS.md, "Speed round
    # thirteen"); off by default.
    c.model = model_fields("gpt2-124m", scan_layers=True, scan_unroll=0)
    c.data.vocab_size = 50257 - 257  # a 50k sentencepiece vocabulary fits the padded table
    c.data.seq_len = 1024
    c.train.global_batch_size = 512  # 0.5M tokens
    c.train.num_microbatches = 16
    c.train.num_steps = 20_000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.optim.lr = 6e-4
    c.optim.warmup_steps = 700
    c.optim.end_lr = 6e-5
    return c
