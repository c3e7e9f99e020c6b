#!/usr/bin/env bash
# Run 10: the Pallas decode-attention kernel (kernel check, sampler batch 1 against the
# reference attention, profile of the two-row step) and the one-pass logsumexp in the
# cross-entropy (gpt2 batch 64 against the previous commit in .carry/old).
set -u
export PYTHONUNBUFFERED=1
B="python3 -m experiments.bench --out $OUT --iters 15 --warmup 3"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
PYTHONPATH=. timeout 200 $B --tag run10 --only ceilings,kernels,decode \
  --match "gpt-1.3b/sampler/b1/,gpt-1.3b/fori/b2/p128+256[" 2>&1 | grep -v "^ \|^{$\|^}$" | tail -40
(cd .carry/old && PYTHONPATH=. timeout 75 $B --tag old --no-profile --only train --match "gpt2-124m/T1024/b64[") 2>&1 | tail -1
PYTHONPATH=. timeout 110 $B --tag ce1pass --only train --match "gpt2-124m/T1024/b64[" 2>&1 | tail -1
PYTHONPATH=. python3 -m experiments.bench.report $OUT/bench.jsonl
