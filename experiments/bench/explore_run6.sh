#!/usr/bin/env bash
# Exploration run 6: what the remaining gaps are made of (flags, batch, HLO of the gpt2 step).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
B="python3 -m experiments.bench --out $OUT --iters 12 --warmup 3"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
# 1. decode: batch 1 vs batch 2 (is the M=1 strength reduction the gap?), and command-buffer while loops
timeout 100 $B --tag base --only ceilings,decode --no-profile --match "gpt-1.3b/fori/b1/,gpt-1.3b/fori/b2/" 2>&1 | grep -v "^WARNING\|^I0000"
XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL timeout 70 $B --tag cmdbuf --only decode --no-profile --match "gpt-1.3b/fori/b1/" 2>&1 | tail -3
# 2. gpt2 b64 baseline with HLO dump + profile; cublasLt epilogues; batch 128
XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text" timeout 120 $B --tag base --only train --match "gpt2-124m/T1024/b64[" 2>&1 | tail -2
ls -S /tmp/dump/*after_optimizations.txt | head -3; f=$(ls -S /tmp/dump/*after_optimizations.txt | head -1); gzip -c "$f" > $OUT/gpt2_step_hlo.txt.gz
XLA_FLAGS=--xla_gpu_enable_cublaslt=true timeout 70 $B --tag cublaslt --no-profile --only train --match "gpt2-124m/T1024/b64[" 2>&1 | tail -2
timeout 80 $B --tag base --no-profile --only train --match "gpt2-124m/T1024/b128[" 2>&1 | tail -2
python3 -m experiments.bench.report $OUT/bench.jsonl
