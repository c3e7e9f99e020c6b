#!/usr/bin/env bash
# Run 7: fused norm/GELU backward passes (new tree) against the previous commit (.carry/old),
# and batch-1 decoding through the two-row sampler.
set -u
export PYTHONUNBUFFERED=1
B="python3 -m experiments.bench --out $OUT --iters 15 --warmup 3"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
(cd .carry/old && PYTHONPATH=. timeout 75 $B --tag old --no-profile --only train --match "gpt2-124m/T1024/b64[") 2>&1 | tail -1
PYTHONPATH=. timeout 110 $B --tag fused --only train --match "gpt2-124m/T1024/b64[" 2>&1 | tail -1
PYTHONPATH=. timeout 75 $B --tag fused --no-profile --only train --match "gpt2-124m/T1024/b32[attention_backend=cudnn]" 2>&1 | tail -1
PYTHONPATH=. timeout 90 $B --tag fused --no-profile --only train --match "gpt-1.3b/T2048/b8[attention_backend=cudnn]" 2>&1 | tail -1
PYTHONPATH=. timeout 120 $B --tag fused --only ceilings,decode --match "gpt-1.3b/sampler/b1/,gpt-1.3b/sampler/b64/" 2>&1 | tail -1
PYTHONPATH=. python3 -m experiments.bench.report $OUT/bench.jsonl
