"""Which configurations each suite measures. Edit here, not in the runners."""

from __future__ import annotations

from experiments.bench.decode import DecodeVariant
from experiments.bench.memory import MemoryCase
from experiments.bench.posttrain import PosttrainVariant
from experiments.bench.train_step import TrainVariant

CUDNN = (("attention_backend", "cudnn"),)


def _gpt2(batch: int, *model, mb: int = 1, rows: str = "synthetic") -> TrainVariant:
    return TrainVariant("gpt2-124m", 1024, batch, mb, tuple(model) or CUDNN, rows=rows)


def _xl(batch: int, *model, mb: int = 1, rows: str = "synthetic") -> TrainVariant:
    return TrainVariant("gpt-1.3b", 2048, batch, mb, tuple(model) or CUDNN, rows=rows)


REF = ("attention_backend", "reference")
XLA = ("attention_backend", "xla")
SCAN = ("scan_layers", True)
UNROLL = ("scan_unroll", 0)  # with SCAN: stacked parameters, straight-line code
PALLAS_DECODE = (("decode_attention", "pallas"),)
REF_DECODE = (("decode_attention", "reference"),)
XLA_MATMUL = (("decode_matmul", "xla"),)  # the default "auto" is the Pallas kernel on a GPU
PALLAS_NORM = ("norm_impl", "pallas")
XLA_NORM = ("norm_impl", "xla")  # the norms' default is "auto": Pallas on a GPU
XLA_GELU = ("activation_impl", "xla")  # the GELU's default is "auto": Pallas on a GPU with biases
XLA_CE = ("cross_entropy_impl", "xla")  # the loss's default is "auto": kernels on a GPU
PALLAS_ATTENTION = ("attention_backend", "pallas")
AUTO = ("attention_backend", "auto")
FP8_HEAD = ("head_matmul", "fp8")  # opt-in: the loss's head products in float8
PALLAS_CE = ("cross_entropy_impl", "pallas")  # the default "auto" is "fused" on a GPU

GPU_TRAIN = [
    _gpt2(12, REF),
    _gpt2(12),
    _gpt2(32, REF),
    _gpt2(32),
    _gpt2(64),
    _gpt2(128),
    _xl(8),
    _xl(8, *CUDNN, SCAN),
    _xl(12),
    _xl(16),
    _xl(16, mb=2),
    _xl(16, *CUDNN, ("remat", "dots")),
    _gpt2(64, *CUDNN, PALLAS_NORM),
    _xl(8, *CUDNN, PALLAS_NORM),
    # Real pretraining rows carry segment ids (experiments/bench/packed_rows.py): cuDNN
    # then takes a dense mask, the Pallas kernel the ids; "auto" is the presets' default.
    _gpt2(64, rows="packed"),
    _gpt2(64, PALLAS_ATTENTION, rows="packed"),
    _gpt2(64, AUTO),
    _gpt2(64, AUTO, rows="packed"),
    _gpt2(64, AUTO, PALLAS_NORM),
    _gpt2(64, AUTO, PALLAS_NORM, rows="packed"),
    _gpt2(64, AUTO, XLA_NORM, rows="packed"),
    # stacked layers: 12x fewer parameter leaves, so fewer optimizer kernels
    _gpt2(64, AUTO, SCAN, rows="packed"),
    _xl(16, *CUDNN, SCAN),
    _gpt2(64, AUTO, SCAN, UNROLL, rows="packed"),
    _xl(16, *CUDNN, SCAN, UNROLL),
    # XLA's bias + GELU against the fused kernels that "auto" now picks
    _gpt2(64, AUTO, XLA_GELU, rows="packed"),
    _gpt2(64, AUTO, SCAN, UNROLL, XLA_GELU, rows="packed"),
    # XLA's cross-entropy passes (after the model's mask) against the kernels
    _gpt2(64, AUTO, XLA_CE, rows="packed"),
    _gpt2(64, AUTO, SCAN, UNROLL, XLA_CE, rows="packed"),
    _xl(16, *CUDNN, XLA_CE),
    # the output head's products in float8 (model/kernels/fp8_head.py)
    _gpt2(64, AUTO, FP8_HEAD, rows="packed"),
    _xl(16, *CUDNN, FP8_HEAD),
    _gpt2(64, AUTO, SCAN, UNROLL, FP8_HEAD, rows="packed"),  # the recipe's form
    # the kernel pair on the model's logits, against the head fused with the single-pass
    # kernel (model/kernels/fused_head.py) that "auto" picks
    _gpt2(64, AUTO, PALLAS_CE, rows="packed"),
    _xl(16, *CUDNN, PALLAS_CE),
    # packed rows at head dim 128: the flash kernels' other shape ("auto" picks them)
    _xl(16, AUTO, rows="packed"),
]
GPU_DECODE = [
    DecodeVariant("gpt-1.3b", 1),
    DecodeVariant("gpt-1.3b", 1, loop="sampler"),
    DecodeVariant("gpt-1.3b", 2),
    DecodeVariant("gpt-1.3b", 64),
    DecodeVariant("gpt-1.3b", 64, loop="sampler"),
    DecodeVariant("gpt2-124m", 1),
    DecodeVariant("gpt-1.3b", 1, loop="sampler", model=PALLAS_DECODE),
    DecodeVariant("gpt-1.3b", 2, model=PALLAS_DECODE),
    DecodeVariant("gpt-1.3b", 64, loop="sampler", model=PALLAS_DECODE),
    DecodeVariant("gpt-1.3b", 1, loop="sampler", model=REF_DECODE),
    DecodeVariant("gpt2-124m", 1, loop="sampler"),
    DecodeVariant("gpt2-124m", 1, loop="sampler", model=(SCAN, UNROLL)),
    # the decode_matmul kernel (q/k/v) and XLA's norms in decoding steps, which "auto"
    # picks, each against the path before them; the last two rows are that path
    DecodeVariant("gpt-1.3b", 1, loop="sampler", model=XLA_MATMUL),
    DecodeVariant("gpt-1.3b", 1, loop="sampler", model=(PALLAS_NORM,)),
    DecodeVariant("gpt-1.3b", 64, loop="sampler", model=(PALLAS_NORM,)),
    DecodeVariant("gpt-1.3b", 1, loop="sampler", model=(*XLA_MATMUL, PALLAS_NORM)),
    DecodeVariant("gpt2-124m", 1, loop="sampler", model=(*XLA_MATMUL, PALLAS_NORM)),
    # the norms as XLA's kernels, against the default: inside the decoding products'
    # kernels (BENCHMARKS.md, "Speed round twenty-four")
    DecodeVariant("gpt-1.3b", 1, loop="sampler", model=(XLA_NORM,)),
]
# Kernel profiles are taken for these variants (by name).
GPU_PROFILE = {
    _gpt2(64).name,
    _gpt2(64, AUTO, rows="packed").name,
    _gpt2(64, *CUDNN, PALLAS_NORM).name,
    _xl(8).name,
    GPU_DECODE[0].name,
    GPU_DECODE[7].name,
}

# batch 8: divisible by the 8 fake CPU devices the tests use
CPU_TRAIN = [
    TrainVariant("tiny", 64, 8, 1, (REF,)),
    TrainVariant("tiny", 64, 8, 2, (XLA,)),
    TrainVariant("tiny-llama", 64, 8, 1, (XLA, SCAN, ("remat", "dots"))),
    TrainVariant("tiny-llama", 256, 8, 1, (REF,), rows="packed"),
]
CPU_DECODE = [
    DecodeVariant("tiny", 2, 8, 8),
    DecodeVariant("tiny", 2, 8, 48, loop="sampler"),
    DecodeVariant("tiny-llama", 2, 8, 8, model=(SCAN,)),
]
CPU_PROFILE = {CPU_TRAIN[0].name}

POSTTRAIN = {
    "gpu": [
        PosttrainVariant("sft", "gpt2-124m", 32, 1024),
        PosttrainVariant("reward", "gpt2-124m", 32, 512),
        PosttrainVariant("ppo", "gpt2-124m", 64, 256),
    ],
    "cpu": [
        PosttrainVariant("sft", "tiny", 8, 64, (XLA,)),
        PosttrainVariant("reward", "tiny", 8, 32, (XLA,)),
        PosttrainVariant("ppo", "tiny", 8, 32, (XLA,)),
    ],
}


def _meshes(n: int) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor): fully sharded, 2 replicas of FSDP, FSDP x 2-way tensor, no FSDP."""
    meshes = [(1, n, 1), (2, n // 2, 1), (1, n // 2, 2), (n, 1, 1)]
    return list(dict.fromkeys(m for m in meshes if min(m) >= 1 and m[0] * m[1] * m[2] == n))


def _scaled(preset: str, seq_len: int, rows_per_device: int, mesh, *model) -> TrainVariant:
    """The same rows per device on every mesh (weak scaling): the global batch grows with it."""
    batch = rows_per_device * mesh[0] * mesh[1] * mesh[2]
    return TrainVariant(preset, seq_len, batch, 1, tuple(model) or CUDNN, mesh)


# Issue 17 (experiments/bench/scale_gpu.sh): gpt-1.3b at the one-GPU benchmark's batch 8 per
# GPU on 1, 2, 4, 8 GPUs (variants needing more GPUs than the host has give "error" rows),
# and llama-7b on 4 GPUs.
SCALE_GPU = [
    *(_scaled("gpt-1.3b", 2048, 8, m) for n in (1, 2, 4, 8) for m in _meshes(n)),
    _scaled("llama-7b", 4096, 4, (1, 4, 1)),
    _scaled("llama-7b", 4096, 4, (1, 2, 2)),
    _scaled("llama-7b", 4096, 8, (1, 4, 1), *CUDNN, ("remat", "full")),
]
SCALE_CPU = [
    *(_scaled("tiny", 64, 2, m, XLA) for n in (1, 2, 4, 8) for m in _meshes(n)),
    _scaled("tiny-llama", 64, 2, (1, 4, 1), XLA, SCAN, ("remat", "dots")),
]

# Planned ahead of time on fake CPU devices (experiments/bench/memory.py). The 1.3B rows are
# the weak-scaling runs' step (batch 8 per GPU, no remat); the 7B rows its 4-GPU config.
MEMORY = {
    "gpu": [
        *(MemoryCase("gpt-1.3b", m, 8, 2048) for n in (1, 2, 4) for m in _meshes(n)),
        *(MemoryCase("llama-7b", m, 4, 4096, microbatches=2) for n in (4, 8) for m in _meshes(n)),
    ],
    "cpu": [MemoryCase("tiny-llama", m, 2, 64) for n in (2, 4) for m in _meshes(n)],
}

SUITES = {
    "gpu": (GPU_TRAIN, GPU_DECODE, GPU_PROFILE),
    "cpu": (CPU_TRAIN, CPU_DECODE, CPU_PROFILE),
    "scale": (SCALE_GPU, [], set()),
    "scale-cpu": (SCALE_CPU, [], set()),
}
