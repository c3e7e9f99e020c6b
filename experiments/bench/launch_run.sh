#!/usr/bin/env bash
# Launch-time measurements on one GPU (BENCHMARKS.md, "Speed round two"): the shakespeare_char recipe as shipped, wall time from launch to its best
# validation loss; gpt2-124m from launch to its first step, with an empty and with a filled
# compilation cache; where the start-up time goes, phase by phase. Needs the text at
# $SHAKESPEARE and gpt2_124m's data prepared in $GPT2_DATA (python -m data.prepare
# --corpus=stdlib --vocab_size=50000 --out=DIR). Rows go to $OUT/launch.jsonl.
set -u
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-runs/launch}
W=${W:-/tmp/launch_run}
rm -rf "$W" && mkdir -p "$W" "$OUT"
ROWS="$OUT/launch.jsonl"
TIMING="python3 -m experiments.bench.launch_timing"
row() { tail -n 1 | sed "s/^{/{\"run\": \"$1\", /" | tee -a "$ROWS"; }

# 1. shakespeare_char as shipped (first launch: data preparation and compiling included)
timeout "${SHK_S:-150}" $TIMING --workdir="$W/shk" --target=1.47 ${SHK_STOP:+--stop_at_target} \
  --log="$OUT/shakespeare.log" -- \
  python3 -m experiments.pretrain --config=experiments/configs/shakespeare_char.py \
  --workdir="$W/shk" --config.data.corpus="text:$SHAKESPEARE:val_tail=0.1" \
  | row shakespeare_char
# 2. gpt2-124m, launch to first step: empty cache, then the same command with it filled
for cache in cold warm; do
  timeout "${GPT2_S:-120}" $TIMING --workdir="$W/gpt2_$cache" --stop_at_first_step \
    --log="$OUT/gpt2_$cache.log" -- python3 -m experiments.pretrain \
    --config=experiments/configs/gpt2_124m.py --workdir="$W/gpt2_$cache" \
    --config.data.dir="$GPT2_DATA" --compilation_cache="$W/cache" | row "gpt2_first_step_$cache"
done
# 3. the phases, no cache; then (UNROLLED=1) the state init alone with JAX's default
# threefry lowering, what create_train_state did before
STARTUP="python3 -m experiments.bench.startup --config=experiments/configs/gpt2_124m.py"
if [ "${PHASES:-1}" = 1 ]; then
  timeout 120 $STARTUP --data_dir="$GPT2_DATA" 2>"$OUT/startup.log" | row startup_phases
fi
if [ "${UNROLLED:-1}" = 1 ]; then
  timeout "${UNROLLED_S:-100}" $STARTUP --data_dir="$GPT2_DATA" --init_only --nokernel_rng \
    2>>"$OUT/startup.log" | row startup_init_unrolled_threefry
fi
