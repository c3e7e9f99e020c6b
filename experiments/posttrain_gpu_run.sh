#!/usr/bin/env bash
# The GPU pipeline preset on one GPU (BENCHMARKS.md "Post-training pipeline on a GPU"):
# installs the carried wheels (.whl) if there are any, runs `experiments.pipeline` with
# posttrain_gpu.py (plus any --config.* overrides given as arguments), and copies the
# report, the log and the metrics to $OUT. Rerunning continues where it stopped: finished
# stages are skipped and the interrupted one resumes (SIGTERM from `timeout` saves first).
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
W=${WORKDIR:-runs/gpu_pipeline}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
timeout -s TERM "${PIPELINE_TIMEOUT_S:-540}" python3 -m experiments.pipeline \
  --config=experiments/configs/posttrain_gpu.py --workdir="$W" "$@" 2>&1 \
  | tr '\r' '\n' | grep -v '^\s*$' | tee -a "$W/pipeline.log" | grep -v 'it/s\]\|step/s' | tail -40
cp "$W/pipeline.log" "$OUT/"
for f in report/summary.json report/ground_truth.md pretrain/metrics.jsonl sft/metrics.jsonl \
  ppo/metrics.jsonl grpo/metrics.jsonl; do
  [ -f "$W/$f" ] && cp "$W/$f" "$OUT/$(echo "$f" | tr / _)"
done
ls -la "$W" | head -30
