"""A Llama-2-7B-shaped model (RoPE, RMSNorm, SwiGLU, untied head) fully sharded over the GPUs.

Sized for 4 H200s: float32 parameters and Adam moments (75 GiB) split 4 ways by FSDP, bf16
compute, layers scanned and rematerialised except their matmuls, cuDNN attention, 4 rows of
4096 tokens per GPU per microbatch. BENCHMARKS.md ("Scale-out") plans its memory per device.
"""

from ml_collections import ConfigDict

from experiments.configs.common import base_config, model_fields


def get_config() -> ConfigDict:
    c = base_config("llama-7b")
    c.model = model_fields("llama-7b", attention_backend="cudnn")
    c.data.vocab_size = 32000
    c.data.seq_len = 4096
    c.mesh.fsdp = -1
    c.mesh.data = 1
    c.train.global_batch_size = 256  # 1M tokens
    c.train.num_microbatches = 16  # 16 rows each: 4 per GPU on 4 GPUs
    c.train.num_steps = 50_000
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 2000
    c.optim.end_lr = 3e-5
    c.optim.b2 = 0.95
    return c
