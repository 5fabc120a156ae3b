#!/usr/bin/env bash
# One command from a fresh Debian 12 machine to a trained tiny model:
#   1. installs every system dependency from Debian's archive (needs root or sudo),
#   2. builds Release into build/ (the CUDA backend too when the CUDA toolkit is present),
#   3. runs the main job: the tiny config pretrained on the CPU by 2 MPI ranks (data 2 x
#      expert 2), logs in runs/tiny. With the
#      sample data beside the checkout (../shared/data: the T5 vocabulary and 2,000 real C4
#      documents) it first tokenizes them into data/c4-sample/{train,val} and trains
#      configs/tiny.yaml on C4; without it, it trains configs/tiny-synthetic.yaml.
# Set SWITCHT5_SKIP_APT=1 to skip step 1, SWITCHT5_SKIP_RUN=1 to skip step 3;
# SWITCHT5_BUILD_DIR (default build) and SWITCHT5_CMAKE_ARGS change step 2.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake pkg-config ccache git
  libopenmpi-dev openmpi-bin libhdf5-openmpi-dev hdf5-tools
  libyaml-cpp-dev libspdlog-dev libfmt-dev
  libsentencepiece-dev sentencepiece
  libdnnl-dev ocl-icd-opencl-dev
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
BUILD=${SWITCHT5_BUILD_DIR:-build}
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release ${SWITCHT5_CMAKE_ARGS:-}
cmake --build "$BUILD" -j "$JOBS" --target switcht5 switcht5-data

if [[ "${SWITCHT5_SKIP_RUN:-0}" != 1 ]]; then
  shared=${SWITCHT5_SHARED_DATA:-../shared/data}
  if [[ -f "$shared/spiece.model" && -d "$shared/c4" ]]; then
    # --force and --resume auto: running setup.sh again remakes the same shards and continues
    # (or finds finished) the same run, instead of refusing to touch them.
    "$BUILD"/switcht5-data tokenize --force --spm "$shared/spiece.model" --output data/c4-sample/train \
      --input "$shared/c4/c4-en-train-00000-first1000.json.gz"
    "$BUILD"/switcht5-data tokenize --force --spm "$shared/spiece.model" --output data/c4-sample/val \
      --input "$shared/c4/olmo/c4-sample.00000-of-00001.json.gz"
    bash scripts/mpirun.sh -np 2 "$BUILD"/switcht5 train --config configs/tiny.yaml \
      --run-dir runs/tiny --resume auto --set parallel.data=2 --set parallel.expert=2
  else
    echo "setup: no sample C4 at $shared (set SWITCHT5_SHARED_DATA); training the synthetic task"
    bash scripts/mpirun.sh -np 2 "$BUILD"/switcht5 train --config configs/tiny-synthetic.yaml \
      --run-dir runs/tiny --resume auto --set parallel.data=2 --set parallel.expert=2
  fi
  echo "setup: done; logs and metrics in runs/tiny"
fi
