"""A Llama-style 1B model: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head."""

from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_fields


def get_config() -> ConfigDict:
    c = base_config("llama-1b")
    c.model = model_fields("llama-1b", remat="dots", scan_layers=True)
    c.data.vocab_size = 32768
    c.data.seq_len = 2048
    c.mesh.fsdp = -1
    c.mesh.data = 1
    c.train.global_batch_size = 512
    c.train.num_microbatches = 32
    c.train.num_steps = 50_000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 2000
    c.optim.end_lr = 3e-5
    c.optim.b2 = 0.95
    return c
