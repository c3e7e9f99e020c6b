#!/usr/bin/env bash
# Run 14: kernel checks (decode attention, LayerNorm) and the sampler at batch 1 with the
# decode-attention kernel against the reference attention (run 13 lost these to a timeout).
set -u
export PYTHONUNBUFFERED=1
B="python3 -m experiments.bench --out $OUT --iters 15 --warmup 3"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
PYTHONPATH=. timeout 150 $B --tag run14 --only ceilings,decode --match "gpt-1.3b/sampler/b1/" 2>&1 | grep '^{"bench"'
PYTHONPATH=. timeout 240 $B --tag run14 --only kernels 2>&1 | grep '^{"bench"'
