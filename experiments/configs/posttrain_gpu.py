"""The pipeline at a size for one GPU: a ~40M-parameter model on the standard library,
longer SFT / reward / PPO. Same stages and report as posttrain_tiny; timed on an H100 in
BENCHMARKS.md ("Post-training pipeline on a GPU")."""

from experiments.configs import posttrain_tiny
from experiments.configs.common import model_fields


def get_config():
    c = posttrain_tiny.get_config()
    p = c.pretrain
    p.model = model_fields(
        "tiny-llama",
        vocab_size=8192,
        d_model=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=4,
        d_ff=2048,
        max_len=768,
        dtype="bfloat16",
        dropout_rate=0.1,  # ~2.6M tokens of pretraining text, seen about 30 times
    )
    p.data.vocab_size = 8192
    p.data.seq_len = 512
    p.train.global_batch_size = 64
    p.train.num_steps = p.optim.total_steps = 2500
    p.train.eval_every = p.train.checkpoint_every = 250
    p.optim.lr, p.optim.warmup_steps, p.optim.end_lr = 1e-3, 200, 1e-4
    c.posttrain_data.max_chars = 1200
    c.sft.update(
        steps=1500, batch_size=32, seq_len=768, lr=2e-4, warmup_steps=50, checkpoint_every=250
    )
    c.reward.update(
        steps=1000,
        batch_size=32,
        seq_len=768,
        lr=5e-5,
        warmup_steps=50,
        normalization_samples=256,
        checkpoint_every=250,
    )
    c.ppo.update(
        iterations=200,
        batch_size=64,
        max_prompt_len=256,
        max_new_tokens=384,
        epochs=4,
        num_minibatches=4,
        lr=5e-6,
        checkpoint_every=20,
    )
    c.dpo.update(steps=500, batch_size=32, lr=5e-6, checkpoint_every=100)
    c.eval.num_prompts = 256
    return c
