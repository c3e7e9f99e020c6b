"""The pipeline at a size for one GPU: a ~40M-parameter model pretrained on the Python
installed with the interpreter (standard library and site-packages, `python:holdout=0.1`),
SFT on functions of the standard library and of 3000 package files, then reward model,
GRPO, PPO and DPO. Same stages and report as posttrain_tiny; measured on an H200 in
BENCHMARKS.md ("Post-training pipeline on a GPU")."""

from ml_collections import ConfigDict

from experiments.configs import posttrain_tiny
from experiments.configs.common import model_fields


def get_config() -> ConfigDict:
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
    )
    # ~250 MB of code (BENCHMARKS.md): 2500 steps of 128 x 512 tokens see it about twice,
    # so no dropout (the stdlib alone, 2.6M tokens, overfit by step 750 with dropout 0.1).
    p.data.corpus = "python:holdout=0.1"
    p.data.vocab_size = 8192
    p.data.seq_len = 512
    p.train.global_batch_size = 128
    p.train.num_steps = 2500
    p.train.eval_every = p.train.checkpoint_every = 500
    p.optim.lr, p.optim.warmup_steps, p.optim.end_lr = 1e-3, 200, 1e-4
    c.posttrain_data.update(max_chars=1200, package_files=3000)
    c.sft.data.seq_len = 768
    c.sft.train.update(global_batch_size=32, num_steps=800, checkpoint_every=200, eval_every=200)
    c.sft.optim.update(lr=2e-4, end_lr=2e-5, warmup_steps=50)
    c.reward.data.update(seq_len=768, normalization_samples=256)
    c.reward.train.update(global_batch_size=32, num_steps=400, checkpoint_every=200, eval_every=200)
    c.reward.optim.update(lr=5e-5, end_lr=5e-6, warmup_steps=50)
    c.ppo.data.update(max_prompt_len=256, max_new_tokens=384)
    c.ppo.train.update(global_batch_size=64, num_steps=60, checkpoint_every=20, eval_every=30)
    c.ppo.algorithm.update(epochs=4, num_minibatches=4)
    c.ppo.optim.update(lr=5e-6, end_lr=5e-7)
    c.grpo.data.update(max_prompt_len=256, max_new_tokens=384)
    c.grpo.train.update(global_batch_size=32, num_steps=80, checkpoint_every=20, eval_every=40)
    c.grpo.algorithm.group_size = 8
    # 2e-6 moved the policy 0.002 nats in 60 iterations (BENCHMARKS.md, 2026-12-01).
    c.grpo.optim.update(lr=1e-5, end_lr=1e-6)
    c.dpo.data.seq_len = 768
    c.dpo.train.update(global_batch_size=32, num_steps=200, checkpoint_every=100, eval_every=200)
    c.dpo.optim.update(lr=5e-6, end_lr=5e-7)
    c.eval.update(num_prompts=256, max_prompt_len=256, max_new_tokens=384, batch_size=64)
    return c
