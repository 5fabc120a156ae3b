#!/usr/bin/env bash
# One rank fails while the others wait in a collective: the job must end within seconds with a
# non-zero exit status and the failing rank's tagged message.
#   tests/mpi/test_abort.sh MPIRUN_SH ABORT_ON_ERROR_BINARY NP
set -uo pipefail
mpirun_sh=$1 binary=$2 np=$3
log=$(mktemp)
trap 'rm -f "$log"' EXIT

start_ms=$(($(date +%s%N) / 1000000))
timeout 120 bash "$mpirun_sh" -np "$np" "$binary" 1 >"$log" 2>&1
status=$?
elapsed_ms=$(($(date +%s%N) / 1000000 - start_ms))
cat "$log"
echo "test_abort: np $np, exit status $status, ${elapsed_ms} ms"

fail=0
if ((status == 0)); then echo "test_abort: FAILED: the job exited with status 0"; fail=1; fi
if ((status == 124)); then echo "test_abort: FAILED: the job hung (killed after 120 s)"; fail=1; fi
if ! grep -q "^\[rank 1\] abort_on_error: error: .*deliberate failure on rank 1 of $np" "$log"; then
  echo "test_abort: FAILED: the tagged error message of rank 1 is missing"
  fail=1
fi
if grep -q "left a collective" "$log"; then
  echo "test_abort: FAILED: a rank completed a collective without rank 1"
  fail=1
fi
if ((elapsed_ms >= 30000)); then echo "test_abort: FAILED: took ${elapsed_ms} ms (limit 30 s)"; fail=1; fi
exit $fail
