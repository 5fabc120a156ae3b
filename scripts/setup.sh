#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a trained tiny model:
#   1. installs every system dependency from Debian's archive (needs root or sudo),
#   2. builds Release into build/ (the CUDA backend too when the CUDA toolkit is present),
#   3. runs the main job: the tiny config trained on the CPU, logs in runs/tiny.
# Set SWITCHT5_SKIP_APT=1 to skip step 1, SWITCHT5_SKIP_RUN=1 to skip step 3.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake pkg-config ccache git
  libopenmpi-dev openmpi-bin libhdf5-openmpi-dev
  libyaml-cpp-dev libspdlog-dev libfmt-dev
  libsentencepiece-dev sentencepiece
  libdnnl-dev
  libgtest-dev libgmock-dev
  zlib1g-dev
)

if [[ "${SWITCHT5_SKIP_APT:-0}" != 1 ]]; then
  missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

JOBS=${JOBS:-$(nproc)}
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release ${SWITCHT5_CMAKE_ARGS:-}
cmake --build build -j "$JOBS" --target switcht5

if [[ "${SWITCHT5_SKIP_RUN:-0}" != 1 ]]; then
  ./build/switcht5 train --config configs/tiny.yaml --run-dir runs/tiny
  echo "setup: done; logs and metrics in runs/tiny"
fi
