"""Time and peak host memory of a Hugging Face import, or an import then export.

  python -m experiments.bench.hf_convert write --dir=/tmp/llama1b     # random weights
  python -m experiments.bench.hf_convert import --dir=/tmp/llama1b
  python -m experiments.bench.hf_convert export --dir=/tmp/llama1b    # import, then export

The checkpoint has Llama-3.2-1B's shapes (1.24B parameters, bfloat16, tied
embeddings, two files with an index) and random weights written with
safetensors from numpy. Each phase runs in its own process, so the peak
resident memory (ru_maxrss) it prints is that phase's.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from absl import app, flags

import model.hf as hf
from experiments.convert import import_shardings
from model.config import ModelConfig
from model.hf import llama
from model.hf import safetensors_io as st
from model.hf.layout import expand
from train.state import count_params

FLAGS = flags.FLAGS

LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}


def write(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(LLAMA_1B, indent=2))
    cfg, _ = hf.read_config(directory)
    rng = np.random.default_rng(0)

    def random(shape):
        return lambda: (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    tensors = {
        r.hf: st.TensorToWrite(r.hf_shape, ml_dtypes.bfloat16, random(r.hf_shape))
        for r in expand(llama.rules(cfg), cfg.n_layers)
    }
    st.write_checkpoint(directory, tensors, max_shard_bytes=1_500_000_000)


def load(directory: Path) -> tuple[ModelConfig, dict]:
    cfg, family = hf.read_config(directory)
    params = hf.load_params(directory, cfg, import_shardings(cfg), family)
    return cfg, jax.block_until_ready(params)


def main(argv: list[str]) -> None:
    command, directory = argv[1], Path(FLAGS.dir)
    start = time.perf_counter()
    if command == "write":
        write(directory)
    elif command == "import":
        cfg, params = load(directory)
        print(f"parameters: {count_params(params) / 1e9:.3f}B, dtype {cfg.param_dtype}")
    elif command == "export":
        cfg, params = load(directory)
        imported = time.perf_counter()
        print(f"import: {imported - start:.1f} s")
        dst = directory.with_name(directory.name + "-export")
        shutil.rmtree(dst, ignore_errors=True)
        ids = {"bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": None}
        files = hf.export(dst, params, cfg, ids, dtype="bfloat16")
        start = imported
        print(
            "export files:", ", ".join(f"{f.name} ({f.stat().st_size / 1e9:.2f} GB)" for f in files)
        )
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB -> GB
    print(
        f"{command}: {time.perf_counter() - start:.1f} s, peak RSS of the process {peak_gb:.2f} GB"
    )


if __name__ == "__main__":
    flags.DEFINE_string("dir", "/tmp/llama1b", "where the HF checkpoint is (written by `write`)")
    app.run(main)
