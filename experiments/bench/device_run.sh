#!/usr/bin/env bash
# The GPU measurements recorded in BENCHMARKS.md, on one GPU: the ceilings (JAX's and
# PyTorch's copy), the training step on synthetic and on packed rows (gpt2-124m with the
# default "auto" attention; gpt-1.3b at batch 8 and 16), batch-1 decoding, the optimizer
# update alone, and the flash-attention kernel against cuDNN. Rows go to $OUT/bench.jsonl
# and the table is printed last. Per-run scripts of earlier sessions are in git history
# (BENCHMARKS.md says where).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-runs/bench}
mkdir -p "$OUT"
BENCH="python3 -m experiments.bench --out $OUT --iters 15"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version --format=csv
python3 -c "import inspect, jax; print(jax.__version__, jax.devices()[0].device_kind);
print(inspect.signature(jax.nn.dot_product_attention))" 2>&1 | tee "$OUT/api.txt"
date -u
timeout 60 python3 -m experiments.bench.torch_copy | tee "$OUT/torch_copy.json"
# (names with "]": "gpt-1.3b/T2048/b8[attention_backend=cudnn" would also pick its scan variant)
timeout "${TRAIN_S:-300}" $BENCH --tag default --budget-s $(( ${TRAIN_S:-300} - 40 )) \
  --only ceilings,train,decode \
  --match "${MATCH:-gpt2-124m/T1024/b64[attention_backend=auto],gpt2-124m/T1024/b64/packed[attention_backend=auto],gpt-1.3b/T2048/b8[attention_backend=cudnn],gpt-1.3b/T2048/b16[attention_backend=cudnn],gpt-1.3b/sampler/b1/p128+256}"
timeout 60 python3 -m experiments.bench.optimizer_step --preset gpt-1.3b | tee -a "$OUT/optimizer.jsonl"
timeout "${KERNEL_S:-150}" $BENCH --iters 10 --only kernels --match flash_attention >"$OUT/kernels.log" 2>&1
date -u
python3 -m experiments.bench.report "$OUT/bench.jsonl"
