#!/usr/bin/env bash
# switcht5 itself under mpirun, as a user runs it:
#  1. `train` with data 2 x expert 2 on 2 ranks succeeds; rank 0 alone writes metrics.jsonl, one
#     line per logged step, with the per-layer routing statistics gathered over the ranks;
#  2. one rank failing (it cannot create its own log file: rank-1.log is a directory) ends the
#     whole job within seconds with a non-zero status and that rank's tagged message, while the
#     other rank is already waiting in a collective;
#  3. a layout that does not match the number of processes is one clear error, printed once;
#  4. a NaN injected into rank 1's gradients at step 3 (SWITCHT5_INJECT_NAN) skips that step:
#     the line says so, names the tensor and rank, and every metrics.jsonl line is valid JSON;
#  5. mpirun's piped output, train.log and the per-rank logs are plain text (no escape codes).
#   tests/mpi/test_train_mpi.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$2 src=$3
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail=0
check() { if ! eval "$1"; then echo "test_train_mpi: FAILED: $2"; fail=1; fi; }

bash "$mpirun_sh" -np 2 "$bin" train --config "$src/configs/tiny-synthetic.yaml" --run-dir "$dir/ok" \
  --set train.steps=6 --set log.every=2 --set parallel.data=2 --set parallel.expert=2 \
  --set log.per_rank_files=true >"$dir/ok.log" 2>&1
status=$?
cat "$dir/ok.log"
check "((status == 0))" "the 2-rank run exited with status $status"
check "[[ \$(wc -l < '$dir/ok/metrics.jsonl') -eq 4 ]]" "metrics.jsonl should have 4 lines (steps 1,2,4,6)"
check "grep -q '\"router\": \[{\"layer\": \"encoder.block.1\"' '$dir/ok/metrics.jsonl'" \
  "per-layer routing statistics missing from metrics.jsonl"
check "grep -q 'expert_fraction' '$dir/ok/metrics.jsonl'" "expert fractions missing"
check "[[ -s '$dir/ok/rank-1.log' ]]" "rank 1 wrote no log of its own"
# Under mpirun a rank's stdout is a pseudo-terminal even though mpirun's output goes to a file
# here: neither that output nor the log files may carry ANSI escape sequences.
for f in "$dir/ok.log" "$dir/ok/train.log" "$dir/ok/rank-0.log" "$dir/ok/rank-1.log"; do
  check "! grep -q \$'\\x1b' '$f'" "$f contains an escape character"
done

mkdir -p "$dir/bad/rank-1.log"
start_ms=$(($(date +%s%N) / 1000000))
timeout 120 bash "$mpirun_sh" -np 2 "$bin" train --config "$src/configs/tiny-synthetic.yaml" \
  --run-dir "$dir/bad" --set parallel.data=2 --set log.per_rank_files=true >"$dir/bad.log" 2>&1
status=$?
elapsed_ms=$(($(date +%s%N) / 1000000 - start_ms))
cat "$dir/bad.log"
echo "test_train_mpi: failing run: status $status, ${elapsed_ms} ms"
check "((status != 0 && status != 124))" "the failing job ended with status $status"
check "grep -q '^\[rank 1\] switcht5: error: .*rank-1.log' '$dir/bad.log'" "rank 1's tagged error is missing"
check "((elapsed_ms < 30000))" "the failing job took ${elapsed_ms} ms"

bash "$mpirun_sh" -np 2 "$bin" train --config "$src/configs/tiny-synthetic.yaml" --run-dir "$dir/x" \
  --set parallel.data=4 >"$dir/layout.log" 2>&1
status=$?
cat "$dir/layout.log"
check "((status == 2))" "a wrong layout should exit 2, got $status"
check "[[ \$(grep -c 'but mpirun started 2 processes' '$dir/layout.log') -eq 1 ]]" "the layout error should be printed once"
SWITCHT5_INJECT_NAN=3:1 bash "$mpirun_sh" -np 2 "$bin" train --config "$src/configs/tiny-synthetic.yaml" \
  --run-dir "$dir/nan" --set train.steps=5 --set log.every=1 --set parallel.data=2 \
  --set parallel.expert=2 >"$dir/nan.log" 2>&1
status=$?
check "((status == 0))" "the NaN run exited with status $status"
check "grep -q 'step 3: non-finite loss or gradient, update skipped on every rank; first non-finite: .*gradient (rank 1)' '$dir/nan.log'" \
  "the skipped step is not reported with its tensor and rank"
check "python3 -c 'import json,sys; [json.loads(l) for l in open(sys.argv[1])]' '$dir/nan/metrics.jsonl'" \
  "metrics.jsonl is not valid JSON"
check "[[ \$(grep -c '\"skipped\": true' '$dir/nan/metrics.jsonl') -eq 1 ]]" "exactly one step should be skipped"
exit $fail
