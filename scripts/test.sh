#!/usr/bin/env bash
# Builds everything (Release, warnings as errors) and runs the whole test suite with ctest.
# Installs missing system packages first (scripts/setup.sh without the training run), and the
# Python environment of the HuggingFace parity test (scripts/python_env.sh: Debian's PyTorch and
# a pinned transformers in build/pyenv).
# Extra arguments go to ctest, e.g. scripts/test.sh -R gradients.
set -euo pipefail
cd "$(dirname "$0")/.."

SWITCHT5_SKIP_RUN=1 bash scripts/setup.sh
bash scripts/python_env.sh build/pyenv
JOBS=${JOBS:-$(nproc)}
cmake --build build -j "$JOBS"
cd build
ctest --output-on-failure -j "$JOBS" "$@"
