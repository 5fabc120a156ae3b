#!/usr/bin/env bash
# GPU benchmark (not a test): one switcht5 training step of Switch-Base-8 (configs/switch-base-8.yaml:
# 12 + 12 blocks, d_model 768, d_ff 3072, 8 experts every other block, vocab 32128, 512 input and
# 114 target tokens of the synthetic task) on the CUDA backend in bf16, against HuggingFace's
# SwitchTransformersForConditionalGeneration in bf16 on the same GPU, batch and lengths (eager and
# torch.compile, Adafactor, router losses on), with MFU against a measured bf16 GEMM peak and the
# H200/H100 datasheet's 989 TFLOP/s.
#
#   scripts/bench_gpu.sh OUTDIR [--quick]
#
# Run from the project root on the GPU machine, after
#   tar --zstd -xf .device/pack.tar.zst && source .device/env.sh
# (the build is shipped prebuilt; nothing is compiled here). Steps:
#   1. bench_step (BUILD/bench_step, warm-up then the median step) at the largest batch of
#      BATCHES that fits: an out-of-memory error moves on to the next, smaller one;
#   2. the bf16 GEMM peak: torch.matmul 8192^3 on random bf16 operands, CUDA events
#      (bench/hf_baseline_gpu.py gemm);
#   3. HF eager and HF torch.compile at the batch of step 1 (bench/hf_baseline_gpu.py hf);
#   4. bench/bench_gpu_report.py: OUTDIR/bench_gpu.json and OUTDIR/bench_gpu.md (bench/results
#      style, with GPU, driver, CUDA, cuBLAS, torch and transformers versions), including the
#      memory check: bench_step's measured backend peak (the CUDA arena's high-water mark) against
#      `switcht5 plan --json` of the same config and overrides (OUTDIR/plan_bBATCH.json), and
#      what cudaMemGetInfo says of the whole device (bench_gpu_report.py states the tolerance).
# Every step has its own time limit and log (OUTDIR/*.log); a failed HF step is reported, not fatal.
# --quick (scripts/gpu_check.sh): batch 16 only, 2 + 3 steps, limits that sum to 175 s (the graphs run included).
# Environment: BUILD (build-cuda), BATCHES ("64 32 16 8"), BENCH_CONFIG, BENCH_BACKEND (cuda),
# BENCH_PRECISION (bf16), PYTHON (python3). BENCH_BACKEND=cpu with a small BENCH_CONFIG runs
# the same mechanics on a machine without a GPU (the torch steps then report why they skipped).
# Exit status: 0 when bench_step measured a step and its memory peak is the plan's, 1 when it
# measured none or the memory check failed (or could not be made), 3 when there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
[[ $# -ge 1 && "$1" != --* ]] || { echo "usage: scripts/bench_gpu.sh OUTDIR [--quick]"; exit 2; }
OUT=$1
QUICK=0
[[ "${2:-}" == --quick ]] && QUICK=1
BUILD=${BUILD:-build-cuda}
CONFIG=${BENCH_CONFIG:-configs/switch-base-8.yaml}
BACKEND=${BENCH_BACKEND:-cuda}
PRECISION=${BENCH_PRECISION:-bf16}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [[ $QUICK == 1 ]]; then
  BATCHES=${BATCHES:-16}; WARMUP=2; STEPS=3; HF_WARMUP=2; HF_STEPS=3
  T_STEP=50; T_GRAPHS=30; T_GEMM=15; T_EAGER=35; T_COMPILE=45
else
  BATCHES=${BATCHES:-64 32 16 8}; WARMUP=3; STEPS=10; HF_WARMUP=3; HF_STEPS=10
  T_STEP=240; T_GRAPHS=240; T_GEMM=60; T_EAGER=180; T_COMPILE=420
fi

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }
if [[ $BACKEND == cuda ]] && ! have_gpu; then
  echo "bench_gpu: skipped: no GPU (nvidia-smi lists none)"
  echo '{"result": "skipped: no GPU"}' > "$OUT/bench_gpu.json"
  exit 3
fi

# Versions: the GPU and driver (nvidia-smi), the CUDA libraries our binaries load (ctypes).
{
  if have_gpu; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  else
    echo "no GPU"
  fi
} > "$OUT/gpu.txt" 2>&1
$PY scripts/cuda_versions.py > "$OUT/cuda_versions.json" 2>"$OUT/cuda_versions.log" || echo '{}' > "$OUT/cuda_versions.json"

# 1. switcht5: the largest batch that fits.
chosen=""
for b in $BATCHES; do
  log=$OUT/bench_step_b$b.log
  echo "bench_gpu: bench_step $CONFIG backend $BACKEND $PRECISION batch $b (limit ${T_STEP}s)"
  sets=(--set train.backend="$BACKEND" --set train.precision="$PRECISION" --set train.batch_size="$b")
  # The paper configs read C4 shards; a benchmark needs no data: synthetic span corruption gives
  # batches of the same shapes (a full encoder, T5's target length).
  if grep -Eq '^[[:space:]]+source:[[:space:]]*["'"'"']?shards' "$CONFIG"; then
    sets+=(--set data.source=synthetic --set data.task=span_corruption)
  fi
  timeout -k 10 "$T_STEP" "$BUILD/bench_step" "$CONFIG" --warmup "$WARMUP" --steps "$STEPS" \
    --json "$OUT/bench_step_b$b.json" "${sets[@]}" > "$log" 2>&1
  rc=$?
  tail -n 12 "$log"
  if [[ $rc == 0 && -s $OUT/bench_step_b$b.json ]]; then
    chosen=$b
    # The memory plan of exactly what bench_step ran (same config and --set overrides), which
    # the report holds the measured peak to (0.3 s for switch-base-8: it allocates nothing).
    echo "bench_gpu: switcht5 plan --json, the same config and overrides"
    timeout -k 2 10 "$BUILD/switcht5" plan --json --config "$CONFIG" "${sets[@]}" \
      > "$OUT/plan_b$b.json" 2> "$OUT/plan_b$b.log" \
      || echo "bench_gpu: switcht5 plan failed (exit $?), see plan_b$b.log"
    break
  fi
  if grep -qiE 'out of (device )?memory|MemoryAllocation|memory fraction|arena' "$log"; then
    echo "bench_gpu: batch $b does not fit (out of memory); trying the next"
    continue
  fi
  [[ $rc == 124 || $rc == 137 ]] && echo "bench_gpu: batch $b: timed out after ${T_STEP}s" \
                                 || echo "bench_gpu: batch $b: bench_step failed (exit $rc)"
  break
done

# 1b. The same step with train.cuda_graphs (one graph launch per step after the first two);
# a row of its own, informational: the equality of graphs on and off is a gpu test.
if [[ -n $chosen && $BACKEND == cuda ]]; then
  echo "bench_gpu: bench_step batch $chosen with train.cuda_graphs=true (limit ${T_GRAPHS}s)"
  timeout -k 10 "$T_GRAPHS" "$BUILD/bench_step" "$CONFIG" --warmup "$WARMUP" --steps "$STEPS" \
    --json "$OUT/bench_step_graphs.json" "${sets[@]}" --set train.cuda_graphs=true \
    > "$OUT/bench_step_graphs.log" 2>&1 || echo "bench_gpu: graphs run failed (exit $?), see bench_step_graphs.log"
fi

# 2 and 3: torch on the same GPU (skipped, with the reason, where torch sees none).
torch_gpu=$($PY -c 'import torch, transformers; print(int(torch.cuda.is_available()))' 2>/dev/null || echo "")
hf_batch=${chosen:-${BATCHES##* }}
if [[ $torch_gpu == 1 ]]; then
  echo "bench_gpu: bf16 GEMM peak (limit ${T_GEMM}s)"
  timeout -k 5 "$T_GEMM" $PY bench/hf_baseline_gpu.py gemm --json "$OUT/gemm_peak.json" \
    > "$OUT/gemm_peak.log" 2>&1 || echo "bench_gpu: GEMM peak failed (exit $?), see gemm_peak.log"
  for mode in eager compile; do
    limit=$T_EAGER; [[ $mode == compile ]] && limit=$T_COMPILE
    echo "bench_gpu: HF $mode, batch $hf_batch (limit ${limit}s)"
    timeout -k 10 "$limit" $PY bench/hf_baseline_gpu.py hf --mode "$mode" --batch "$hf_batch" \
      --warmup "$HF_WARMUP" --steps "$HF_STEPS" --json "$OUT/hf_$mode.json" > "$OUT/hf_$mode.log" 2>&1
    rc=$?
    if [[ $rc == 124 || $rc == 137 ]]; then
      echo "{\"mode\": \"$mode\", \"batch\": $hf_batch, \"error\": \"timed out after ${limit}s\"}" > "$OUT/hf_$mode.json"
    elif [[ ! -s $OUT/hf_$mode.json ]]; then
      err=$(grep -E 'Error|error' "$OUT/hf_$mode.log" | tail -n 1 | tr -d '"\\' | cut -c1-200)
      echo "{\"mode\": \"$mode\", \"batch\": $hf_batch, \"error\": \"exit $rc: $err\"}" > "$OUT/hf_$mode.json"
    fi
  done
else
  reason="no GPU visible to torch (or torch/transformers missing) in $PY"
  echo "bench_gpu: torch steps skipped: $reason"
  for f in gemm_peak hf_eager hf_compile; do echo "{\"skipped\": \"$reason\"}" > "$OUT/$f.json"; done
fi

# 4. Report.
$PY bench/bench_gpu_report.py "$OUT" --quick "$QUICK" --chosen "${chosen:-none}" --config "$CONFIG"
report_rc=$?
[[ -n $chosen && $report_rc == 0 ]] && exit 0 || exit 1
