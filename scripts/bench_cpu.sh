#!/usr/bin/env bash
# CPU benchmark (not a test): steady-state ms/step, tokens/s, peak RSS, heap allocations per
# step and matmul GFLOP/s vs the GEMM peak, for configs/bench-small.yaml (or the config given).
#   scripts/bench_cpu.sh [CONFIG] [--steps N] [--warmup N] [--set k=v ...] [--versus k=v ...]
# (--versus: a second model trained alternately in the same process, ratios per step pair)
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/bench-small.yaml}
shift || true
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build -j "$(nproc)" --target bench_step bench_gemm > /dev/null
echo "# $(nproc) cores, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
./build/bench_step "$config" "$@"
