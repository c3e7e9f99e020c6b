#!/usr/bin/env bash
# Issue 17 on one host with several GPUs: weak scaling of gpt-1.3b at the one-GPU benchmark's
# step (batch 8 per GPU, context 2048, cuDNN attention) over 1, 2, 4, 8 GPUs and several meshes,
# the effect of XLA's collective-overlap flags, and llama-7b on 4 GPUs with FSDP. The variants
# are `SCALE_GPU` in experiments/bench/suites.py; every row goes to $OUT/bench.jsonl (tag = the
# flag set) and the weak-scaling table (experiments/bench/scaling.py) is printed at the end.
#
#   OUT=runs/scale bash experiments/bench/scale_gpu.sh [--dry-run] [STAGE ...]
#
# STAGE  weak   every gpt-1.3b mesh that fits the host, default XLA flags
#        flags  gpt-1.3b on 1 GPU and on all GPUs (fsdp; fsdp x 2-way tensor), once per flag
#               set in FLAG_SETS (default: all of them, see below)
#        7b     llama-7b on 4 GPUs (fsdp; fsdp x tensor; batch 8 with full remat), default
#               flags and the latency-hiding scheduler
#        (none given: weak flags 7b; each stage is one or more processes of at most LIMIT_S)
# --dry-run  the same commands on CPU with 8 fake devices and tiny presets, so the script is
#            known to work before the GPUs are lent (tests/test_scale_recipe.py runs a part).
set -u
# First of all: NCCL's NVLink multicast (NVLS) can take the GPUs of these shared hosts out of
# service.
export NCCL_NVLS_ENABLE=0
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/scale}
PY=${PYTHON:-python3}

DRY=0
STAGES=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    weak | flags | 7b) STAGES+=("$arg") ;;
    *) echo "scale_gpu.sh: unknown argument '$arg'; takes --dry-run and stages weak, flags, 7b" >&2; exit 2 ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(weak flags 7b)

# XLA flag sets (names are the rows' tags). Checked against jaxlib 0.10.2's flag table and
# XLA's debug_options_flags.cc; defaults there: latency-hiding scheduler off, pipelined
# reduce-scatter on, pipelined all-gather / all-reduce off, windowed einsum (collective
# matmul) only above 100000 MiB, i.e. off.
LHS="--xla_gpu_enable_latency_hiding_scheduler=true"
declare -A FLAGS=(
  [default]=""
  [lhs]="$LHS"
  [lhs+pipelined]="$LHS --xla_gpu_enable_pipelined_all_gather=true --xla_gpu_enable_pipelined_reduce_scatter=true --xla_gpu_enable_pipelined_all_reduce=true --xla_gpu_enable_while_loop_double_buffering=true"
  [lhs+collective-matmul]="$LHS --xla_gpu_threshold_for_windowed_einsum_mib=0 --xla_gpu_multi_streamed_windowed_einsum=true"
  [lhs+combine-256MiB]="$LHS --xla_gpu_all_gather_combine_threshold_bytes=268435456 --xla_gpu_reduce_scatter_combine_threshold_bytes=268435456 --xla_gpu_all_reduce_combine_threshold_bytes=268435456"
)
read -r -a FLAG_SETS <<<"${FLAG_SETS:-lhs lhs+pipelined lhs+collective-matmul lhs+combine-256MiB}"
for f in "${FLAG_SETS[@]}"; do
  [ -n "${FLAGS[$f]+set}" ] || { echo "scale_gpu.sh: unknown flag set '$f'; known: ${!FLAGS[*]}" >&2; exit 2; }
done

if [ $DRY = 1 ]; then
  export JAX_PLATFORMS=cpu
  BASE_FLAGS="--xla_force_host_platform_device_count=8"
  SUITE=scale-cpu BIG=tiny SEQ=64 ROWS=2 SEVEN=tiny-llama LIMIT_S=${LIMIT_S:-300}
  ITERS=(--iters 2 --warmup 1)
else
  nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv
  nvidia-smi topo -m
  BASE_FLAGS=""
  SUITE=scale BIG=gpt-1.3b SEQ=2048 ROWS=8 SEVEN=llama-7b LIMIT_S=${LIMIT_S:-590}
  ITERS=(--iters 10 --warmup 3)
fi
export XLA_FLAGS="$BASE_FLAGS"
N=$($PY -c "import jax; print(jax.device_count())") || { echo "scale_gpu.sh: jax did not start" >&2; exit 1; }
echo "devices: $N  out: $OUT  stages: ${STAGES[*]}  dry run: $DRY"
mkdir -p "$OUT"

bench() { # TAG MATCH: the suite's variants matching MATCH under flag set TAG
  echo "== $1: $2"
  XLA_FLAGS="$BASE_FLAGS ${FLAGS[$1]}" timeout "$LIMIT_S" $PY -m experiments.bench \
    --suite $SUITE --only train --no-profile "${ITERS[@]}" --budget-s $((LIMIT_S - 90)) --tag "$1" --match "$2" --out "$OUT" \
    2>&1 | grep -E '^\{"bench"|Error|error:' | cut -c1-400
}
name() { # DATA FSDP TENSOR: the gpt-1.3b variant on that mesh
  echo "$BIG/T$SEQ/b$((ROWS * $1 * $2 * $3))/data$1.fsdp$2.tensor$3"
}

for stage in "${STAGES[@]}"; do
  case $stage in
    weak) bench default "$BIG/" ;;
    flags)
      all="$(name 1 1 1),$(name 1 "$N" 1)"
      [ "$N" -ge 2 ] && all="$all,$(name 1 $((N / 2)) 2)"
      for f in "${FLAG_SETS[@]}"; do bench "$f" "$all"; done
      ;;
    7b)
      bench default "$SEVEN/"
      bench lhs "$SEVEN/"
      ;;
  esac
done
$PY -m experiments.bench.scaling "$OUT/bench.jsonl"
