#!/usr/bin/env bash
# The Python environment of the HuggingFace tools (scripts/export_hf.py, scripts/import_hf.py)
# and of the parity test (tests/hf), of scripts/plot_run.py and of the tests that read a run's
# TensorBoard files and plots (tests/py): a venv at build/pyenv (or $1) on top of Debian's own
# PyTorch, so no CUDA wheels are downloaded. Callers run build/pyenv/bin/python; nothing is
# exported.
#   apt (root or sudo): python3-torch 1.13.1 (CPU), python3-h5py, python3-numpy, python3-yaml,
#                       python3-requests, python3-venv
#   venv (--system-site-packages, /usr/bin/python3): the pinned wheels below, --no-deps so pip
#                       never replaces Debian's numpy (torch is built against it).
# Why transformers 4.49.0: the newest release that imports with torch 1.13 (4.50 needs
# torch.distributed.tensor, i.e. torch >= 2.0); its Switch router is right in eval mode
# (4.36 and older apply router jitter in eval too; 4.44 mis-indexes which experts received
# tokens and can leave a used expert out, fixed in 4.46).
# tensorboard 2.21.0 and matplotlib 3.10.9 with every dependency pinned (--no-deps installs
# nothing else): matplotlib 3.10 is the newest that pip resolves against Debian's numpy 1.24;
# python-dateutil 2.9 because 4.0 also wants tzdata; typing-extensions 4.16 because grpcio wants
# >= 4.12 (Debian's is 4.4; torch is content with either). grpcio, werkzeug, markdown and
# tensorboard-data-server are there only so that build/pyenv/bin/tensorboard --logdir serves:
# reading event files needs tensorboard, protobuf and absl-py alone.
# Idempotent: when the venv's marker file already lists these pins and the apt packages are
# installed, it returns at once and prints nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-build/pyenv}
APT_PACKAGES=(python3-torch python3-h5py python3-numpy python3-yaml python3-requests python3-venv)
PINS=(
  transformers==4.49.0
  huggingface_hub==0.36.2
  safetensors==0.8.0
  tokenizers==0.21.4
  regex==2026.11.15
  tqdm==4.70.1
  filelock==4.2.11
  fsspec==2026.9.0
  packaging==26.3
  tensorboard==2.21.0
  protobuf==7.36.2
  absl-py==2.5.1
  grpcio==1.85.3
  typing-extensions==4.16.0
  werkzeug==3.1.9
  markupsafe==3.0.4
  markdown==3.11.3
  tensorboard-data-server==0.7.2
  matplotlib==3.10.9
  contourpy==1.3.2
  cycler==0.12.1
  fonttools==4.68.0
  kiwisolver==1.5.1
  pillow==13.0.0
  pyparsing==3.3.3
  python-dateutil==2.9.0.post0
  six==1.17.0
)
MARKER="$VENV/.switcht5-pins"
expected="$(printf '%s\n' "${APT_PACKAGES[@]}" "${PINS[@]}")"

apt_missing() {
  local p
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

mapfile -t missing < <(apt_missing)
if ((${#missing[@]} == 0)) && [[ -x "$VENV/bin/python" && -f "$MARKER" ]] &&
   [[ "$(cat "$MARKER")" == "$expected" ]]; then
  exit 0
fi

if ((${#missing[@]})); then
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  echo "python_env: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# A venv made by another interpreter or without the system packages is rebuilt.
if [[ -d "$VENV" ]] && ! grep -qx 'include-system-site-packages = true' "$VENV/pyvenv.cfg" 2>/dev/null; then
  echo "python_env: $VENV is not a --system-site-packages venv of /usr/bin/python3; recreating it"
  rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "python_env: creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
rm -f "$MARKER"
echo "python_env: installing ${PINS[*]}"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --no-deps "${PINS[@]}"
"$VENV/bin/python" - <<'EOF'
import h5py, numpy, safetensors, torch, transformers, yaml
from transformers import SwitchTransformersForConditionalGeneration, T5ForConditionalGeneration
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
EOF
printf '%s\n' "$expected" > "$MARKER.tmp"
mv "$MARKER.tmp" "$MARKER"
echo "python_env: ready: $VENV/bin/python (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'), transformers 4.49.0, tensorboard 2.21.0, matplotlib 3.10.9)"
