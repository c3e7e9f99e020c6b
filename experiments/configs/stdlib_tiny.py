"""The default: a small model on the Python standard library, a few minutes on a laptop CPU."""

from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_fields


def get_config() -> ConfigDict:
    c = base_config()
    c.model = model_fields(
        "tiny", vocab_size=0, d_model=128, n_layers=4, n_heads=4, d_ff=512, max_len=256
    )
    c.data.vocab_size = 2048
    c.data.seq_len = 128
    c.train.global_batch_size = 16
    c.train.num_steps = 500
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.optim.end_lr = 3e-4
    c.sample.prompt = "def "
    return c
