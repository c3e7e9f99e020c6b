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
    p.train.num_steps = 2500
    p.train.eval_every = p.train.checkpoint_every = 250
    p.optim.lr, p.optim.warmup_steps, p.optim.end_lr = 1e-3, 200, 1e-4
    c.posttrain_data.max_chars = 1200
    c.sft.data.seq_len = 768
    c.sft.train.update(global_batch_size=32, num_steps=1500, checkpoint_every=250, eval_every=250)
    c.sft.optim.update(lr=2e-4, end_lr=2e-5, warmup_steps=50)
    c.reward.data.update(seq_len=768, normalization_samples=256)
    c.reward.train.update(global_batch_size=32, num_steps=1000, checkpoint_every=250)
    c.reward.optim.update(lr=5e-5, end_lr=5e-6, warmup_steps=50)
    c.ppo.data.update(max_prompt_len=256, max_new_tokens=384)
    c.ppo.train.update(global_batch_size=64, num_steps=200, checkpoint_every=20, eval_every=50)
    c.ppo.algorithm.update(epochs=4, num_minibatches=4)
    c.ppo.optim.update(lr=5e-6, end_lr=5e-7)
    c.grpo.data.update(max_prompt_len=256, max_new_tokens=384)
    c.grpo.train.update(global_batch_size=32, num_steps=100, checkpoint_every=20, eval_every=50)
    c.grpo.algorithm.group_size = 8
    c.grpo.optim.update(lr=2e-6, end_lr=2e-7)
    c.dpo.data.seq_len = 768
    c.dpo.train.update(global_batch_size=32, num_steps=500, checkpoint_every=100, eval_every=500)
    c.dpo.optim.update(lr=5e-6, end_lr=5e-7)
    c.eval.update(num_prompts=256, max_prompt_len=256, max_new_tokens=384, batch_size=64)
    return c
