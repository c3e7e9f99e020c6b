#!/usr/bin/env bash
# Run 13: fused LayerNorm kernels (kernel check, gpt2 batch 64 and gpt-1.3b batch 8 against
# the XLA norms in the same tree) and the decode-attention kernel with a repeated query row.
set -u
export PYTHONUNBUFFERED=1
B="python3 -m experiments.bench --out $OUT --iters 15 --warmup 3"
F='grep -v "^ \|^{$\|^}$"'
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
PYTHONPATH=. timeout 200 $B --tag run13 --only ceilings,kernels,decode \
  --match "gpt-1.3b/sampler/b1/,gpt-1.3b/fori/b2/p128+256[" 2>&1 | grep '^{"bench"'
PYTHONPATH=. timeout 80 $B --tag run13 --no-profile --only train --match "gpt2-124m/T1024/b64[attention_backend=cudnn]" 2>&1 | grep '^{"bench"'
PYTHONPATH=. timeout 110 $B --tag run13 --only train --match "gpt2-124m/T1024/b64[attention_backend=cudnn,norm" 2>&1 | grep '^{"bench"'
PYTHONPATH=. timeout 90 $B --tag run13 --no-profile --only train --match "gpt-1.3b/T2048/b8[attention_backend=cudnn,norm" 2>&1 | grep '^{"bench"'
PYTHONPATH=. python3 -m experiments.bench.report $OUT/bench.jsonl
