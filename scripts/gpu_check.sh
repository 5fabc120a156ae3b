#!/usr/bin/env bash
# The one command for a lent GPU machine: every GPU check of the CUDA backend, each phase
# time-bounded, in under 8 minutes on one H200 (the limits below sum to 450 s).
#
#   scripts/gpu_check.sh OUTDIR [--cpu-dry-run]
#
# Run from the project root after `tar --zstd -xf .device/pack.tar.zst && source .device/env.sh`
# (../shared/tools/device-pack build-cuda made the pack here: the build ships prebuilt with its
# libraries; the GPU machine has no apt and no network). BUILD (default build-cuda) names the
# build. Phases (limit in seconds):
#   info        (10)  GPU name, driver, CUDA runtime, cuBLAS, NCCL, torch: nvidia-smi,
#                     scripts/cuda_versions.py (the libraries our binaries load) and python
#   ctest      (130)  ctest -L gpu: the op tests' CUDA cases and tests/test_cuda_model.cpp (model
#                     fp32/bf16 vs CPU, 50 training steps vs CPU, cross-backend resume, CUDA
#                     graphs on vs off bitwise, arena vs plan), the NCCL data plane (every call
#                     on a one-rank communicator; 2 ranks on the GPU, mpi and nccl planes, equal
#                     to one rank); a test that skips on this machine counts as a failure
#   memcheck    (40)  compute-sanitizer --tool memcheck over test_backend_ops' CUDA cases
#   racecheck   (30)  the same with --tool racecheck (shared-memory hazards)
#   equivalence (35)  `switcht5 train` on tiny-synthetic, 50 steps, dropout/jitter off, on cpu and
#                     on cuda: metrics.jsonl losses within 1e-4 relative at every step until the
#                     routing first differs, which must not be in the first 20 steps (see
#                     compare_losses)
#   mpi         (25)  mpirun -np 2 (data 2, expert 2) on cuda, both ranks on the one GPU
#                     (SWITCHT5_CUDA_MEMORY_FRACTION=0.4), 10 steps: losses within 1e-4 of the
#                     one-process cuda run's first 10, same routing (parallelism does not change
#                     the math)
#   bench      (180)  scripts/bench_gpu.sh OUTDIR/bench --quick (switch-base-8 bf16 vs HF), with
#                     the memory check: the arena's measured peak against `switcht5 plan --json`
#                     of the same run ("plan X GB vs peak Y GB (+z%)"); it fails when the bytes
#                     held differ from the plan by more than allocation alignment (one 256-byte
#                     block per live block), or the peak exceeds the plan by more than the
#                     measured transient GEMM scratch the plan leaves out (bench_gpu_report.py
#                     memory_check)
# Each phase's log is OUTDIR/<phase>.log; OUTDIR/summary.json holds each result, seconds and key
# number; the last thing printed is the summary table. A failing phase does not stop the others.
# Exit status: 0 every phase passed (or skipped for a missing tool), 1 some phase failed or
# timed out, 3 nothing ran (no GPU: every phase "skipped: no GPU").
# The device tool returns at most 8 files from $OUT, so on the GPU machine write elsewhere and
# pack:  scripts/gpu_check.sh /tmp/gc; rc=$?; tar -C /tmp -czf $OUT/gc.tgz gc;
#        cp /tmp/gc/summary.json /tmp/gc/bench/bench_gpu.md $OUT/; exit $rc
# --cpu-dry-run (for this CPU machine): run the phases' mechanics with the cpu backend in place
# of cuda and tiny-synthetic in place of switch-base-8. It proves the script, nothing about a GPU.
# The memory check then holds the CPU backend's own count of its live 64-byte blocks to the plan
# (exact as on cuda, with no transient scratch): the same comparison and tolerance rule, not peak
# RSS, which is mostly the process (libraries, loader, host copies) and says nothing of the plan.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
[[ $# -ge 1 && "$1" != --* ]] || { echo "usage: scripts/gpu_check.sh OUTDIR [--cpu-dry-run]"; exit 2; }
OUT=$1
DRY=0
[[ "${2:-}" == --cpu-dry-run ]] && DRY=1
BUILD=${BUILD:-build-cuda}
PY=${PYTHON:-python3}
SAN=/usr/local/cuda/bin/compute-sanitizer
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$OUT/work
rm -rf "$WORK" && mkdir -p "$WORK"
GPU_BACKEND=cuda
[[ $DRY == 1 ]] && GPU_BACKEND=cpu

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }
GPU=0
{ [[ $DRY == 1 ]] || have_gpu; } && GPU=1

PHASES=()
declare -A RESULT SECONDS_OF KEY
# run_phase NAME LIMIT FUNCTION: runs FUNCTION with its output in OUTDIR/NAME.log under a time
# limit. FUNCTION prints its key number on the last line of $WORK/NAME.key and returns 0 (pass),
# 1 (fail) or 4 (skipped, with the reason in $WORK/NAME.skip).
run_phase() {
  local name=$1 limit=$2 fn=$3 rc t0 t1
  PHASES+=("$name")
  if [[ $GPU == 0 ]]; then
    RESULT[$name]="skipped: no GPU"; SECONDS_OF[$name]=0; KEY[$name]=""
    echo "skipped: no GPU (nvidia-smi lists none)" > "$OUT/$name.log"
    printf '== %-12s skipped: no GPU\n' "$name"
    return
  fi
  printf '== %-12s (limit %ss) ...\n' "$name" "$limit"
  t0=$(date +%s.%N)
  # The phase runs in its own shell under `timeout`, so a hang ends at the limit whatever it
  # does; the functions and variables reach it through export -f / the environment.
  timeout -k 10 "$limit" bash -c "$fn" < /dev/null > "$OUT/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  SECONDS_OF[$name]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  KEY[$name]=$(tail -n 1 "$WORK/$name.key" 2>/dev/null | tr -d '"\\')
  case $rc in
    0) RESULT[$name]=pass;;
    4) RESULT[$name]="skipped: $(cat "$WORK/$name.skip" 2>/dev/null | tr -d '"\\')";;
    124|137) RESULT[$name]="timeout";;
    *) RESULT[$name]="fail";;
  esac
  printf '   %-12s %s in %ss  %s\n' "$name" "${RESULT[$name]}" "${SECONDS_OF[$name]}" "${KEY[$name]}"
}
export OUT WORK BUILD PY SAN DRY GPU_BACKEND
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # the cpu runs: tiny shapes gain nothing from more

# ---- phases --------------------------------------------------------------------------------
phase_info() {
  echo "# nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1
  echo "# CUDA libraries our binaries load (scripts/cuda_versions.py)"
  $PY scripts/cuda_versions.py | tee "$WORK/versions.json"
  echo "# ldd $BUILD/switcht5 (CUDA and MPI)"
  ldd "$BUILD/switcht5" | grep -Ei 'cuda|cublas|nccl|mpi' || true
  echo "# torch"
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)' 2>&1 || true
  [[ -x $SAN ]] && $SAN --version | tail -n 1
  $PY - "$WORK/versions.json" > "$WORK/info.key" <<'EOF'
import json, subprocess, sys
v = json.load(open(sys.argv[1]))
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip().splitlines()[0]
except Exception:
    smi = "no nvidia-smi"
print(f"{smi}; CUDA {v.get('runtime')}; cuBLAS {v.get('cublas')}")
EOF
}

phase_ctest() {
  mkdir -p "$BUILD/tmp"  # the tests' TMPDIR (the pack carries no empty folders)
  ctest --test-dir "$BUILD" -L gpu --output-on-failure --timeout 100
  local rc=$?
  local summary
  summary=$(grep -E 'tests passed' "$OUT/ctest.log" | tail -n 1)
  echo "${summary:-no ctest summary}" > "$WORK/ctest.key"
  # On a GPU machine a skip means the test did not see the GPU: that is a failure here.
  # (tests/CMakeLists.txt makes ctest report a test whose gtest cases skipped as "Skipped".)
  if [[ $DRY == 0 ]] && grep -qE '\*\*\*Skipped|\(Skipped\)|^skipped: ' "$OUT/ctest.log"; then
    echo "gpu_check: tests skipped on a GPU machine:"; grep -E 'Skipped|^skipped: ' "$OUT/ctest.log" | sort -u
    echo "$summary; SKIPS" > "$WORK/ctest.key"
    return 1
  fi
  return $rc
}

sanitizer() {  # sanitizer TOOL NAME
  local tool=$1 name=$2 bin=$BUILD/tests/test_backend_ops
  if [[ ! -x $SAN ]]; then echo "skipped: no $SAN"; echo "no compute-sanitizer" > "$WORK/$name.skip"; return 4; fi
  [[ -x $bin ]] || { echo "missing $bin"; echo "no test binary" > "$WORK/$name.key"; return 1; }
  local filter=${SANITIZER_FILTER:-*cuda*:*Cuda*:*CUDA*}
  $SAN --tool "$tool" --error-exitcode 99 "$bin" --gtest_filter="$filter" --gtest_brief=1
  local rc=$?
  local s
  s=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$name.log" | tail -n 1 | sed 's/^=* *//')
  echo "${s:-no summary}; exit $rc" > "$WORK/$name.key"
  return $(( rc == 0 ? 0 : 1 ))
}
phase_memcheck() { sanitizer memcheck memcheck; }
phase_racecheck() { sanitizer racecheck racecheck; }

# tiny-synthetic with dropout, expert dropout and jitter off, every step logged (word-split on use).
export TINY_SETS_STR="--set log.every=1 --set model.dropout_rate=0 --set model.expert_dropout=0
  --set model.router_jitter_noise=0 --set train.eval_every=1000"

# compare_losses A.jsonl B.jsonl STEPS MIN_SAME_ROUTING: the rule of tests/test_cuda_model.cpp's
# expect_same_trajectory. Losses of steps 1..STEPS agree to 1e-4 relative until the first step
# whose routing (tokens per expert, dropped fraction, per layer) differs; routing is identical
# for at least MIN_SAME_ROUTING steps; after it differs, losses agree to 5e-2 (top-1 routing is
# discontinuous: reference vs cpu, both correct, first differ at step 42 of these 50 and drift
# to 2.3e-3). Prints the largest difference before routing differs.
compare_losses() {
  $PY - "$@" <<'EOF'
import json, math, sys
a_path, b_path, steps, min_same = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
TOL, AFTER_TOL = 1e-4, 5e-2
def steps_of(p):
    return {m["step"]: m for m in map(json.loads, open(p))}
def routing(m):
    return [(r.get("expert_fraction"), r.get("dropped_fraction")) for r in m.get("router", [])]
a, b = steps_of(a_path), steps_of(b_path)
worst, bad, diverged = 0.0, [], None
for s in range(1, steps + 1):
    if s not in a or s not in b:
        bad.append(f"step {s} missing"); continue
    if diverged is None and routing(a[s]) != routing(b[s]):
        diverged = s
    e = abs(a[s]["loss"] - b[s]["loss"]) / max(abs(b[s]["loss"]), 1e-30)
    tol = TOL if diverged is None else AFTER_TOL
    if not e <= tol:
        bad.append(f"step {s}: {a[s]['loss']!r} vs {b[s]['loss']!r} (rel {e:.3g} > {tol:g})")
    if diverged is None:
        worst = max(worst, e) if not math.isnan(e) else math.inf
if diverged is not None and diverged - 1 < min_same:
    bad.append(f"routing differs from step {diverged} (must agree for {min_same} steps)")
print("\n".join(bad[:10]))
where = "same routing" if diverged is None else f"routing differs from step {diverged}"
print(f"max rel loss diff {worst:.3g} over {steps} steps ({where}){'' if not bad else f'; {len(bad)} bad'}")
sys.exit(1 if bad else 0)
EOF
}
export -f compare_losses

phase_equivalence() {
  local b rc=0
  for b in cpu "$GPU_BACKEND"; do
    local dir=$WORK/equiv_$b
    [[ $b == cpu && -d $WORK/equiv_cpu ]] && dir=$WORK/equiv_cpu_again
    echo "# switcht5 train, backend $b -> $dir"
    "$BUILD/switcht5" train --config configs/tiny-synthetic.yaml --run-dir "$dir" \
      --set train.backend="$b" --set train.steps=50 $TINY_SETS_STR 2>&1 | tail -n 3
    [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
  done
  local other=$WORK/equiv_$GPU_BACKEND
  [[ $GPU_BACKEND == cpu ]] && other=$WORK/equiv_cpu_again
  compare_losses "$other/metrics.jsonl" "$WORK/equiv_cpu/metrics.jsonl" 50 20 | tee "$WORK/equivalence.key"
  [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
  return $rc
}

phase_mpi() {
  export SWITCHT5_CUDA_MEMORY_FRACTION=0.4
  # The GPU machine runs commands as root (.device/env.sh allows it too).
  [[ $(id -u) == 0 ]] && export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  local dir=$WORK/mpi2
  mpirun -np 2 --oversubscribe -x SWITCHT5_CUDA_MEMORY_FRACTION \
    "$BUILD/switcht5" train --config configs/tiny-synthetic.yaml --run-dir "$dir" \
    --set train.backend="$GPU_BACKEND" --set train.steps=10 --set parallel.data=2 \
    --set parallel.expert=2 $TINY_SETS_STR 2>&1 | tail -n 5
  local rc=${PIPESTATUS[0]}
  [[ $rc == 0 && -s $dir/metrics.jsonl ]] || { echo "mpirun exit $rc" > "$WORK/mpi.key"; return 1; }
  local ref=$WORK/equiv_$GPU_BACKEND/metrics.jsonl
  if [[ ! -s $ref ]]; then
    echo "# no one-process $GPU_BACKEND run to compare with: one now"
    "$BUILD/switcht5" train --config configs/tiny-synthetic.yaml --run-dir "$WORK/mpi1" \
      --set train.backend="$GPU_BACKEND" --set train.steps=10 $TINY_SETS_STR 2>&1 | tail -n 2
    ref=$WORK/mpi1/metrics.jsonl
  fi
  compare_losses "$dir/metrics.jsonl" "$ref" 10 10 | tee "$WORK/mpi.key"
  return "${PIPESTATUS[0]}"
}

phase_bench() {
  if [[ $DRY == 1 ]]; then
    export BENCH_BACKEND=cpu BENCH_CONFIG=configs/tiny-synthetic.yaml BENCH_PRECISION=bf16
  fi
  scripts/bench_gpu.sh "$OUT/bench" --quick
  local rc=$?
  $PY - "$OUT/bench/bench_gpu.json" > "$WORK/bench.key" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(f"no report ({e})"); sys.exit()
rows = {x["system"]: x for x in r.get("rows", [])}
ours = next((x for k, x in rows.items() if k.startswith("switcht5")), None)
hf = rows.get("HF eager bf16", {})
f = lambda x, s: format(x, s) if isinstance(x, (int, float)) else "-"
gb = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.2f} MB"
m = r.get("memory") or {}
if "error" in m:
    mem = f"memory vs plan: FAIL: {m['error']}"
elif m:
    mem = (f"plan {gb(m['plan_total_bytes'])} vs peak {gb(m['peak_bytes'])} "
           f"({m['peak_minus_plan']:+.2%}){'' if m['pass'] else ': MEMORY CHECK FAIL'}")
else:
    mem = "no memory check"
pred = r.get("step_prediction") or {}
pred_s = f"; plan predicted {f(pred.get('predicted_ms'), '.1f')} ms" if pred else ""
graphs = next((x for k, x in rows.items() if "CUDA graphs" in k), {})
graphs_s = f"; graphs {f(graphs.get('ms'), '.1f')} ms" if graphs else ""
if ours:
    print(f"b{ours['batch']}: {f(ours['ms'], '.1f')} ms/step{pred_s}{graphs_s}, MFU "
          f"{f(ours.get('mfu_measured'), '.1%')} (989: {f(ours.get('mfu_datasheet'), '.1%')}); "
          f"HF eager {f(hf.get('ms'), '.1f')} ms; {mem}")
else:
    print("bench_step measured nothing")
EOF
  return $(( rc == 0 ? 0 : 1 ))
}
export -f phase_info phase_ctest sanitizer phase_memcheck phase_racecheck phase_equivalence phase_mpi phase_bench

[[ $DRY == 1 ]] && echo "gpu_check: DRY RUN on the CPU (cpu backend in place of cuda): proves the script only"
[[ $GPU == 0 ]] && echo "gpu_check: no GPU here (nvidia-smi lists none): every phase is skipped"
T_START=$(date +%s)
run_phase info 10 phase_info
run_phase ctest 130 phase_ctest
run_phase memcheck 40 phase_memcheck
run_phase racecheck 30 phase_racecheck
run_phase equivalence 35 phase_equivalence
run_phase mpi 25 phase_mpi
run_phase bench 180 phase_bench
TOTAL=$(( $(date +%s) - T_START ))

# ---- summary -------------------------------------------------------------------------------
failed=0; ran=0
for p in "${PHASES[@]}"; do
  case ${RESULT[$p]} in
    pass) ran=1;;
    skipped:*) ;;
    *) ran=1; failed=1;;
  esac
done
status=0
[[ $failed == 1 ]] && status=1
[[ $ran == 0 ]] && status=3
{
  printf '{"dry_run": %s, "gpu": %s, "total_seconds": %s, "exit": %s, "phases": [' \
    "$([[ $DRY == 1 ]] && echo true || echo false)" "$([[ $GPU == 1 ]] && echo true || echo false)" "$TOTAL" "$status"
  sep=""
  for p in "${PHASES[@]}"; do
    printf '%s\n {"phase": "%s", "result": "%s", "seconds": %s, "key": "%s"}' \
      "$sep" "$p" "${RESULT[$p]}" "${SECONDS_OF[$p]}" "${KEY[$p]}"
    sep=","
  done
  printf '\n]}\n'
} > "$OUT/summary.json"

echo
echo "gpu_check summary ($OUT; total ${TOTAL}s; exit $status$([[ $status == 3 ]] && echo ': nothing ran'))"
printf '%-12s %-30s %8s  %s\n' phase result seconds key
for p in "${PHASES[@]}"; do
  printf '%-12s %-30s %8s  %s\n' "$p" "${RESULT[$p]}" "${SECONDS_OF[$p]}" "${KEY[$p]}"
done
exit $status
