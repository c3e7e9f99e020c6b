#!/usr/bin/env bash
# Run 11: decode-attention kernel formulations (tensor-core "dot" vs CUDA-core "reduce",
# block sizes, warps) at real sizes, then the sampler at batch 1 with the default kernel.
set -u
export PYTHONUNBUFFERED=1
B="python3 -m experiments.bench --out $OUT --iters 15 --warmup 3"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
PYTHONPATH=. timeout 300 $B --tag run11 --only ceilings,kernels,decode \
  --match "gpt-1.3b/sampler/b1/,gpt-1.3b/fori/b2/p128+256[" 2>&1 | grep -v "^ \|^{$\|^}$" | tail -40
