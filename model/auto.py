"""The one place where "auto" kernel choices are resolved, for the config fields
`attention_backend`, `norm_impl`, `activation_impl`, `cross_entropy_impl`,
`decode_attention` and `decode_matmul` (with the sampler's transposed form).

Rule for each: on a GPU, the hand-written kernel where it is correct for the shape and
was measured faster (BENCHMARKS.md names the runs); elsewhere (CPU, TPU) the plain-JAX
definition the kernels are tested against, so CPU tests, Hugging Face conversion and
equality checks always run the reference code unless a config names a kernel. Resolved
at trace time from `jax.default_backend()`, so one config serves every machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from model.config import ModelConfig
from model.kernels import decode_attention, decode_matmul, flash_attention, layer_norm
from model.kernels.partition import active_mesh, num_sms


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def choose_backend(cfg: ModelConfig, packed: bool, dropout: bool = False) -> str:
    """The attention implementation for `cfg` ("auto" resolved); `packed`: segment ids given;
    `dropout`: a training step that drops attention probabilities, which only the
    reference does.

    "auto", measured on an H200 (BENCHMARKS.md, flash attention): on a GPU, cuDNN's
    causal kernel for whole rows, the Pallas kernel for packed rows (cuDNN would need a
    dense [B, 1, T, T] mask: 1.4-1.9x slower there); for float32, which cuDNN does not
    take, the Pallas kernel too (not measured); elsewhere the reference.
    """
    if cfg.attention_backend != "auto":
        return cfg.attention_backend
    if dropout or not on_gpu():
        return "reference"
    H, G, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    cudnn_ok = cfg.dtype in ("bfloat16", "float16") and D % 8 == 0 and D <= 256
    if flash_attention.supported(H, G, D) and (packed or not cudnn_ok):
        return "pallas"
    return "cudnn" if cudnn_ok else "reference"


def choose_norm_impl(cfg: ModelConfig, decoding: bool = False) -> str:
    """ "xla" or "pallas" ("auto" resolved). "auto": the fused Pallas norms on a GPU for
    rows that fit the kernel (d_model <= layer_norm.MAX_D): gpt2-124m's training step
    1.05x faster on an H200 (BENCHMARKS.md, flash attention table), gpt-1.3b's too on
    H100s (Training step, Targets); XLA's norms elsewhere, and in one-token decoding
    steps (`decoding`), where XLA's norm fusions were measured faster than the kernel
    (BENCHMARKS.md, "Speed round nine", change 45)."""
    if cfg.norm_impl != "auto":
        return cfg.norm_impl
    return "pallas" if on_gpu() and cfg.d_model <= layer_norm.MAX_D and not decoding else "xla"


def fold_decode_norms(cfg: ModelConfig) -> bool:
    """Whether one-token decoding steps fold each block's norms into kernels that run anyway
    (`model.layers.fold_norms`): the second norm and the attention's residual add into the
    up-projection's `decode_matmul` kernel, the first into the previous block's MLP residual
    add. With `norm_impl` "auto", wherever `decode_matmul` is chosen; "xla" or "pallas" keep
    the norms as kernels of their own."""
    if cfg.norm_impl != "auto":
        return False
    return cfg.decode_matmul == "pallas" or (cfg.decode_matmul == "auto" and on_gpu())


def choose_activation_impl(cfg: ModelConfig) -> str:
    """ "xla" or "pallas" ("auto" resolved), for the MLP's bias + GELU. "auto": the fused
    Pallas kernels (`model/kernels/bias_gelu.py`) on a GPU for a GELU MLP, where with
    biases (GPT-2) they save the passes XLA spends on the biased copy of the activations
    and on the bias gradient (BENCHMARKS.md, "Speed round seven"), and without them
    (gpt-1.3b, a zero bias) still read and write faster than XLA's GELU fusions (its
    packed step on an H200 487.3, 487.6 -> 482.0, 484.6 ms: "Speed round twenty-eight");
    XLA elsewhere, SwiGLU included."""
    if cfg.activation_impl != "auto":
        return cfg.activation_impl
    return "pallas" if on_gpu() and cfg.activation == "gelu" else "xla"


def choose_cross_entropy_impl(cfg: ModelConfig) -> str:
    """ "xla", "pallas" or "fused" ("auto" resolved), for the cross-entropy of pretraining
    and evaluation (`train/losses.py`; "fused" concerns the pretraining loss, whose
    evaluation takes "pallas"). "auto" on a GPU: "fused", the output head applied by the
    loss with the single-pass kernel (`model/kernels/fused_head.py`): on an H200 gpt2-124m's
    packed step 114.1 -> 110.9-112.7 ms and gpt-1.3b's 480.1-481.9 -> 477.6-479.1 ms against
    "pallas" (BENCHMARKS.md, "Speed round sixteen"), the kernel pair that reads the logits
    once forward and once backward (round eight); XLA's fused passes elsewhere."""
    if cfg.cross_entropy_impl != "auto":
        return cfg.cross_entropy_impl
    return "fused" if on_gpu() else "xla"


def choose_decode_attention(cfg: ModelConfig) -> str:
    """ "reference" or "pallas" ("auto" resolved), for one-token decoding steps. "auto":
    the Pallas kernel on a GPU where its shapes are supported (gpt-1.3b batch-1 sampling
    1.12x faster on an H200, BENCHMARKS.md, Decoding); the reference elsewhere, and for
    scanned layers: traced inside Flax's scan, the kernel fails on the GPU ("broadcasted
    variable has a data dependency on the scan body", jax 0.11.2, flax 0.12.10), so the
    sampler decodes scanned models layer by layer (`LanguageModel.inference_form`)."""
    if cfg.decode_attention != "auto":
        return cfg.decode_attention
    supported = decode_attention.supported(cfg.n_heads, cfg.kv_heads, cfg.head_dim)
    return "pallas" if on_gpu() and supported and not cfg.scan_layers else "reference"


def use_decode_matmul(cfg: ModelConfig, rows: int, k: int, ns: Sequence[int]) -> bool:
    """Whether a one-token decoding step's products of the same `rows` rows, `k` inputs
    and outputs `ns` run as one `decode_matmul` kernel ("auto" resolved).

    "auto", measured on an H200 (BENCHMARKS.md, "Speed round nine" and "eleven"): on a
    GPU, for products with at least 32 output columns per SM in all: gpt-1.3b's q, k and
    v (6,144 columns; 1.30 -> 1.27 ms/token) and its up-projection with GELU (8,192;
    1.22 -> 1.19); XLA's products for narrower ones, which are faster there (gpt2-124m's
    q, k and v, 2,304 columns, as one kernel: 0.389 -> 0.407 ms/token; gpt-1.3b's
    2,048-column attention output and down-projection: 1.19 -> 1.20 and -> 1.38).
    "pallas": the kernel wherever it takes the shapes. Never on a mesh of several
    devices, which the kernel does not split."""
    if active_mesh() is not None or not decode_matmul.supported(rows, k, ns):
        return False
    if cfg.decode_matmul != "auto":
        return cfg.decode_matmul == "pallas"
    return on_gpu() and sum(ns) >= 32 * num_sms()


def use_transposed_decoding(cfg: ModelConfig, batch: int, weight_bytes: int = 0) -> bool:
    """Whether the sampler decodes a batch of `batch` sequences in the transposed form
    (`decode_matmul="transposed"`): one row, the weights copied once to [outputs, inputs]
    (`weight_bytes` more memory), the products that `use_decode_matmul` picks as the kernel
    reading them so, the others XLA reductions along their rows. Only for one sequence on
    one device.

    "auto": on a GPU, where the copy takes at most a quarter of its memory. On an H200,
    gpt-1.3b decodes at 0.993-0.994 ms/token against the two-row form's 1.117-1.118, and
    gpt2-124m at 0.381-0.383 against 0.394-0.395 (BENCHMARKS.md, "Speed round thirty"):
    XLA's reductions read the narrow products' weights (the attention output, the
    down-projection, the tied head) faster than its matrix products do, and the kernel
    reads the others faster for one row on the CUDA cores than for two on tensor cores."""
    if batch != 1 or active_mesh() is not None:
        return False
    if cfg.decode_matmul != "auto":
        return cfg.decode_matmul == "transposed"
    return on_gpu() and 4 * weight_bytes <= _device_memory_bytes()


def _device_memory_bytes() -> int:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 0)
