#!/usr/bin/env bash
# Run 15: LayerNorm kernel check, and gpt2 batch 64 with the final norm kernels against
# the XLA norms (same tree, same machine).
set -u
export PYTHONUNBUFFERED=1
B="python3 -m experiments.bench --out $OUT --iters 15 --warmup 3"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
PYTHONPATH=. timeout 150 $B --tag run15 --only kernels 2>&1 | grep '^{"bench": "kernels", "variant": "layer'
PYTHONPATH=. timeout 150 $B --tag run15 --no-profile --only train --match "gpt2-124m/T1024/b64[attention_backend=cudnn" 2>&1 | grep '^{"bench"'
