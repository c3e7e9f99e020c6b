#!/usr/bin/env bash
# Run 12: split-cache (flash-decoding) decode-attention kernels; one stacked q/k/v product
# per decoding step; sampler batch 1 against the previous commit (.carry/old).
set -u
export PYTHONUNBUFFERED=1
B="python3 -m experiments.bench --out $OUT --iters 15 --warmup 3"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
(cd .carry/old && PYTHONPATH=. timeout 90 $B --tag old --no-profile --only ceilings,decode --match "gpt-1.3b/sampler/b1/") 2>&1 | tail -1
PYTHONPATH=. timeout 300 $B --tag run12 --only ceilings,kernels,decode \
  --match "gpt-1.3b/sampler/b1/,gpt-1.3b/fori/b2/p128+256[" 2>&1 | grep -v "^ \|^{$\|^}$" | tail -40
