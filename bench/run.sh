#!/usr/bin/env bash
# The benchmarks side by side (not tests): SwitchT5 against HuggingFace/PyTorch on the CPU,
# switch-8 against its FLOP-matched dense model, 8/32/128 experts, 1 process against 2 ranks,
# and the GPU rows of scripts/bench_gpu.sh when given. Contenders alternate within each round
# (bench/run.py has the method); results go to bench/results/DATE-run[-quick].{json,md}.
#   bench/run.sh [--quick] [--repeats N] [--only hf,moe,experts,np,paired] [--gpu-json FILE] [--readme]
# --quick: one round, fewer steps, no torch.compile and no switch-base-8 rows (about 5 minutes
# on 2 cores); the full run takes about 30 minutes on 2 cores. --readme writes the tables into
# README.md's benchmark block. Run it on a quiet machine: the load average is recorded.
# HF needs build/benchenv (bench/python_env.sh: PyPI torch and transformers, about 3 GB to
# download); without it the HF rows say "not run". Each HF row runs with glibc's malloc and,
# where Debian's libjemalloc2 is installed, again with jemalloc preloaded: which is PyTorch's
# faster differs between machines, and the results credit HF with its fastest row.
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build -j "$(nproc)" --target bench_step > /dev/null
hf=()
if bash bench/python_env.sh build/benchenv; then
  hf=(--hf-python build/benchenv/bin/python)
else
  echo "bench/run.sh: no HF environment (bench/python_env.sh failed): the HF rows are not run" >&2
fi
exec python3 bench/run.py "${hf[@]}" "$@"
