#!/usr/bin/env bash
# The GPU pipeline preset on the device machine (BENCHMARKS.md "Post-training pipeline on a
# GPU"): installs the carried wheels (.whl), runs `experiments.pipeline` with
# posttrain_gpu.py, and copies the report, the log and the loss curves to $OUT.
# Rerunning continues where it stopped: finished stages are skipped.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
W=runs/gpu_pipeline
mkdir -p $W
timeout ${PIPELINE_TIMEOUT_S:-540} python3 -m experiments.pipeline \
  --config=experiments/configs/posttrain_gpu.py --workdir=$W 2>&1 \
  | tee -a $W/pipeline.log | tail -60
cp $W/pipeline.log $OUT/
for f in report/summary.json pretrain/loss_curve.png pretrain/metrics.jsonl ppo/metrics.jsonl \
  sft/done.json reward/done.json; do
  [ -f $W/$f ] && cp $W/$f $OUT/$(echo $f | tr / _)
done
ls -la $W $W/*/ | head -60
