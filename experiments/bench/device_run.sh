#!/usr/bin/env bash
# The GPU measurements recorded in BENCHMARKS.md (third device run). One process per
# set of XLA flags (XLA reads them once per process); rows go to $OUT/bench.jsonl and
# the table is printed last. The first two runs' commands are in BENCHMARKS.md.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
BENCH="python3 -m experiments.bench --out $OUT --iters 15"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version --format=csv
date -u
timeout 215 $BENCH --tag default --budget-s 165 --only ceilings,train,decode \
  --match "gpt2-124m/T1024/b32[attention_backend=cudnn]","gpt2-124m/T1024/b64[","gpt-1.3b/T2048/b8[attention_backend=cudnn]","gpt-1.3b/fori/b1/","gpt-1.3b/sampler/b1/"
date -u
python3 -m experiments.bench.report "$OUT/bench.jsonl"
