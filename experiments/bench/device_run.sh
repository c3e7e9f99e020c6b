#!/usr/bin/env bash
# The GPU measurements recorded in BENCHMARKS.md: one process per set of XLA flags
# (flags are read once per process). Rows go to $OUT/bench.jsonl; the table is printed last.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
BENCH="python3 -m experiments.bench --out $OUT --iters 15"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version --format=csv
date -u
timeout 220 $BENCH --tag default --budget-s 190 --only ceilings,train,decode \
  --match "gpt2-124m/T1024/b32[attention_backend=cudnn]","gpt2-124m/T1024/b64[","gpt-1.3b/T2048/b8[attention_backend=cudnn]","gpt-1.3b/fori/b1/","gpt-1.3b/sampler/b1/"
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1" \
  timeout 110 $BENCH --tag cmdbuf-while --budget-s 80 --no-profile --only ceilings,decode \
  --match "gpt-1.3b/fori/b1/","gpt-1.3b/sampler/b1/","gpt-1.3b/fori/b64/"
XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
  timeout 140 $BENCH --tag notriton --budget-s 110 --no-profile --only train \
  --match "gpt2-124m/T1024/b64[","gpt-1.3b/T2048/b8[attention_backend=cudnn]","gpt2-124m/T1024/b128["
timeout 90 $BENCH --tag default --budget-s 60 --no-profile --only train,decode \
  --match "gpt-1.3b/T2048/b16/mb2","gpt-1.3b/fori/b64/"
date -u
python3 -m experiments.bench.report "$OUT/bench.jsonl"
