"""A 1.3B GPT (GPT-3 XL shape) at context 2048, fully sharded over the data devices."""

from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_fields


def get_config() -> ConfigDict:
    c = base_config("gpt-1.3b")
    c.model = model_fields("gpt-1.3b", remat="dots", scan_layers=True)
    c.data.vocab_size = 50000
    c.data.seq_len = 2048
    c.mesh.fsdp = -1
    c.mesh.data = 1
    c.train.global_batch_size = 512  # 1M tokens
    c.train.num_microbatches = 32
    c.train.num_steps = 50_000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 1000
    c.optim.end_lr = 2e-5
    return c
