#!/usr/bin/env bash
# Flash attention with segment ids on one H200: what jax.nn.dot_product_attention takes
# there; the gpt2-124m step on packed rows against whole rows; the kernel's error and
# time against cuDNN (dense mask; causal on whole rows). Logs under $OUT.
set -u
export PYTHONUNBUFFERED=1
B="python3 -m experiments.bench --out $OUT --tag ${TAG:-flash}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import inspect, jax; print(jax.__version__, jax.devices()[0].device_kind);
print(inspect.signature(jax.nn.dot_product_attention))" 2>&1 | tee $OUT/api.txt
timeout "${TRAIN_S:-150}" $B --iters 15 --warmup 3 --no-profile --only train \
  --match "${TRAIN_MATCH:-b64[attention_backend=cudnn,b64/packed[attention_}" >$OUT/train.log 2>&1
grep '^{"bench"' $OUT/train.log | cut -c1-300
timeout "${KERNEL_S:-200}" $B --iters 10 --only kernels --match flash_attention \
  >$OUT/kernels.log 2>&1
grep '^{"bench"' $OUT/kernels.log | cut -c1-300
python3 -m experiments.bench.report $OUT/bench.jsonl
