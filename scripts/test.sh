#!/usr/bin/env bash
# Builds everything (Release, warnings as errors) and runs the whole test suite with ctest.
# Installs missing system packages first (scripts/setup.sh without the training run), then the
# test-only ones below, and the Python environment of the HuggingFace parity test
# (scripts/python_env.sh: Debian's PyTorch and a pinned transformers in build/pyenv).
# Extra arguments go to ctest, e.g. scripts/test.sh -R gradients.
set -euo pipefail
cd "$(dirname "$0")/.."

SWITCHT5_SKIP_RUN=1 bash scripts/setup.sh

# Test-only packages, not setup.sh's (training needs no SLURM): tests/slurm starts a one-node
# SLURM of its own from slurmctld, slurmd, slurm-client and munge; srun --mpi=pmix loads
# libpmix.so, which is in libpmix-dev. The test runs its own daemons from a temporary directory
# and needs none of the packages' services: dpkg starts none where there is no init system (a
# container, CI's chroot); on a systemd machine munge's service starts, and slurmd's and
# slurmctld's do not (they need an /etc/slurm/slurm.conf, which nothing here writes).
TEST_PACKAGES=(slurmctld slurmd slurm-client munge libpmix-dev)
if [[ "${SWITCHT5_SKIP_APT:-0}" != 1 ]]; then
  missing=()
  for p in "${TEST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    echo "test: installing ${missing[*]} (for tests/slurm)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi
bash scripts/python_env.sh build/pyenv
JOBS=${JOBS:-$(nproc)}
cmake --build build -j "$JOBS"
cd build
ctest --output-on-failure -j "$JOBS" "$@"
