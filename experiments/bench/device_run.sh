#!/usr/bin/env bash
# The GPU measurements recorded in BENCHMARKS.md, on one GPU: the ceilings, the training
# step on synthetic and on packed rows (gpt2-124m with the default "auto" attention, gpt-1.3b),
# batch-1 decoding, and the flash-attention kernel against cuDNN. One process per set of XLA
# flags; rows go to $OUT/bench.jsonl and the table is printed last. Per-run scripts of
# earlier sessions are in git history (BENCHMARKS.md says where).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
BENCH="python3 -m experiments.bench --out $OUT --iters 15"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version --format=csv
python3 -c "import inspect, jax; print(jax.__version__, jax.devices()[0].device_kind);
print(inspect.signature(jax.nn.dot_product_attention))" 2>&1 | tee "$OUT/api.txt"
date -u
timeout "${TRAIN_S:-240}" $BENCH --tag default --budget-s $(( ${TRAIN_S:-240} - 40 )) \
  --only ceilings,train,decode \
  --match "${MATCH:-gpt2-124m/T1024/b64[,gpt2-124m/T1024/b64/packed[,gpt-1.3b/T2048/b8[,gpt-1.3b/sampler/b1/}"
timeout "${KERNEL_S:-150}" $BENCH --iters 10 --only kernels --match flash_attention >"$OUT/kernels.log" 2>&1
date -u
python3 -m experiments.bench.report "$OUT/bench.jsonl"
