#!/usr/bin/env bash
# The HuggingFace side of bench/run.sh: a venv at build/benchenv (or $1) with PyTorch and
# transformers from PyPI, pinned. Benchmarks only: the test suite's environment is
# scripts/python_env.sh (Debian's torch 1.13, which has no torch.compile and is not what users
# of HF run). PyPI's Linux torch wheel depends on NVIDIA's CUDA libraries, so this downloads
# about 3 GB and takes 5.6 GB on disk, CPU runs included. Idempotent: returns at once when the
# marker file lists these pins.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-build/benchenv}
PINS=(torch==2.15.0 transformers==5.24.0 pyyaml==6.0.4)
marker="$VENV/.switcht5-bench-pins"
if [[ -f "$marker" && "$(cat "$marker")" == "${PINS[*]}" ]]; then exit 0; fi
PY=${PYTHON:-python3}
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q "${PINS[@]}"
echo "${PINS[*]}" > "$marker"
