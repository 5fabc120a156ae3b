#!/usr/bin/env bash
# run_python.sh PYTHON SCRIPT [ARGS...]: runs SCRIPT with PYTHON, or fails (exit 1) saying how
# to make the venv when PYTHON is not there. A missing venv is a failure, not a skip: CI
# installs it with scripts/python_env.sh.
set -euo pipefail
python=$1
shift
if [[ ! -x "$python" ]]; then
  venv=$(dirname "$(dirname "$python")")
  echo "FAILED: $python not found: run scripts/python_env.sh $venv (Debian's python3-torch" \
       "and the pinned transformers in a venv), then run the test again" >&2
  exit 1
fi
exec "$python" "$@"
