#!/usr/bin/env bash
# Nothing hangs outside the collectives either: the watchdog (comm/watchdog.h) also bounds the
# trainer's checkpoint I/O and its waits for the data loader, on one process too, and a second
# Ctrl-C ends a stuck run at once. The stalls are made by the test hook SWITCHT5_STALL
# (train/stall_hook.h), with parallel.timeout_s 2:
#  1. data-np1: one process sleeps for ever in step 3's wait for its training batch: exit 3
#     within the deadline, one watchdog line naming step 3 and the data loader wait, in the
#     output and in train.log;
#  2. checkpoint-np1: one process sleeps for ever inside the save of step 4's checkpoint: exit 3,
#     the line names the checkpoint file; the checkpoint of step 2 and `latest` are
#     byte-identical to before, and no .tmp file was left for `latest` to name;
#  3. checkpoint-np2: rank 1 stops itself (SIGSTOP) as the save of step 4 begins; rank 0 waits
#     inside parallel HDF5's collective file creation, where none of our collectives polls: its
#     watchdog thread ends the job (exit 3) with rank 0's line naming the checkpoint save;
#  4. double-sigint: a process stalled in its data wait (parallel.timeout_s large) gets SIGINT:
#     it announces that it will stop after the step; a second SIGINT ends it at once, exit 130,
#     "second SIGINT" on stderr, metrics.jsonl and the checkpoints byte-identical.
#   tests/mpi/test_stall.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$2 src=$3
test_name=test_stall
# shellcheck source=checkpoint_test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/checkpoint_test_lib.sh"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; done
  rm -rf "$dir"
}
trap cleanup EXIT
timeout_s=2
bound_s=$((timeout_s + 15))
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# start NAME NP STALL [train options...]: starts training in the background; sets pid.
start() {
  local name=$1 np=$2 stall=$3
  shift 3
  local run=$dir/$name
  local cmd=("$bin" train --config "$config" --run-dir "$run" --set log.every=1
             --set train.steps=100000 --set parallel.data="$np" --set parallel.expert="$np" "$@")
  if ((np == 1)); then SWITCHT5_STALL=$stall "${cmd[@]}" >"$run.log" 2>&1 &
  else SWITCHT5_STALL=$stall bash "$mpirun_sh" -np "$np" -x SWITCHT5_STALL "${cmd[@]}" >"$run.log" 2>&1 & fi
  pid=$!
  pids+=("$pid")
}

# finish NAME: waits up to bound_s for pid; sets status and elapsed_ms (from the call).
finish() {
  local name=$1 start_ms
  start_ms=$(now_ms)
  for _ in $(seq $((bound_s * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  elapsed_ms=$(($(now_ms) - start_ms))
  if kill -0 "$pid" 2>/dev/null; then
    check false "$name: still running ${bound_s} s after the stall"
    pkill -KILL -P "$pid"; kill -KILL "$pid"
  fi
  wait "$pid"
  status=$?
  grep -v '^  \|^#\|^[a-z]*:$\|^$' "$dir/$name.log" | tail -n 8
  echo "$test_name: $name: exit status $status after ${elapsed_ms} ms"
}

# wait_for FILE PATTERN: until FILE has a line matching PATTERN (30 s at most).
wait_for() { for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# 1. The data loader never delivers.
start data-np1 1 data:3:0:sleep --set checkpoint.every=0 --set parallel.timeout_s=$timeout_s
check "wait_for '$dir/data-np1.log' 'SWITCHT5_STALL: stalling in data at step 3'" "data-np1: the stall hook did not run"
finish data-np1
run=$dir/data-np1
line='switcht5: watchdog: step 3: wait for the data loader \(training batch\) did not complete in 2 s; ending the job \(exit code 3\)\. Per-expert tokens \(top-1 choices\) of the last completed step, 2: encoder\.block\.1 \[[0-9 ]+\], decoder\.block\.1 \[[0-9 ]+\]$'
check "((status == 3))" "data-np1: exit status $status, expected 3 (the watchdog's)"
check "grep -Eq '^\[rank 0\] $line' '$run.log'" "data-np1: the watchdog line is missing"
check "[[ \$(grep -c 'switcht5: watchdog:' '$run.log') -eq 1 ]]" "data-np1: expected exactly one watchdog line"
check "grep -Eq '${line#switcht5: }' '$run/train.log'" "data-np1: the watchdog line is not in train.log"

# 2. The filesystem never answers during a save (one process).
start checkpoint-np1 1 checkpoint:4:0:sleep --set checkpoint.every=2 --set parallel.timeout_s=$timeout_s
run=$dir/checkpoint-np1
check "wait_for '$run.log' 'SWITCHT5_STALL: stalling in checkpoint at step 4'" "checkpoint-np1: the stall hook did not run"
before=$(cd "$run/checkpoints" 2>/dev/null && sha256sum latest ckpt-00000002.h5)
finish checkpoint-np1
check "((status == 3))" "checkpoint-np1: exit status $status, expected 3"
check "grep -Eq '^\[rank 0\] switcht5: watchdog: step 4: checkpoint save \($run/checkpoints/ckpt-00000004\.h5\) did not complete in 2(\.[0-9]+)? s; ending the job' '$run.log'" \
  "checkpoint-np1: the watchdog line naming the checkpoint save is missing"
check "[[ -n '$before' && \"\$(cd '$run/checkpoints' && sha256sum latest ckpt-00000002.h5)\" == '$before' ]]" \
  "checkpoint-np1: the checkpoint of step 2 or latest changed"
check "[[ \$(cat '$run/checkpoints/latest') == ckpt-00000002.h5 ]]" "checkpoint-np1: latest does not name step 2"

# 3. A rank stops as a collective save begins (two processes).
start checkpoint-np2 2 checkpoint:4:1:stop --set checkpoint.every=2 --set parallel.timeout_s=$timeout_s
run=$dir/checkpoint-np2
check "wait_for '$run.log' 'SWITCHT5_STALL: stalling in checkpoint at step 4'" "checkpoint-np2: the stall hook did not run"
victim=
for child in $(pgrep -P "$pid"); do
  tr '\0' '\n' <"/proc/$child/environ" 2>/dev/null | grep -qx 'OMPI_COMM_WORLD_RANK=1' && victim=$child
done
[[ -n $victim ]] && pids+=("$victim")
finish checkpoint-np2
check "((status == 3))" "checkpoint-np2: exit status $status, expected 3"
check "grep -Eq '^\[rank 0\] switcht5: watchdog: step 4: checkpoint save \($run/checkpoints/ckpt-00000004\.h5\) did not complete in 2(\.[0-9]+)? s; ending the job' '$run.log'" \
  "checkpoint-np2: rank 0's watchdog line naming the checkpoint save is missing"
check "[[ \$(cat '$run/checkpoints/latest') == ckpt-00000002.h5 ]]" "checkpoint-np2: latest does not name step 2"
sleep 1
check "! pgrep -f -- '--run-dir $run' >/dev/null" "checkpoint-np2: a process of the job is still running"

# 4. Ctrl-C twice: a stuck step is left at once.
start double-sigint 1 data:4:0:sleep --set checkpoint.every=2 --set parallel.timeout_s=600
run=$dir/double-sigint
check "wait_for '$run.log' 'SWITCHT5_STALL: stalling in data at step 4'" "double-sigint: the stall hook did not run"
before=$(cd "$run" && sha256sum metrics.jsonl checkpoints/latest checkpoints/ckpt-00000002.h5)
kill -INT "$pid"
check "wait_for '$run.log' 'received SIGINT: the run stops after the current step and saves a checkpoint (press Ctrl-C again'" \
  "double-sigint: the first SIGINT was not announced"
check "kill -0 $pid" "double-sigint: the first SIGINT ended the process"
kill -INT "$pid"
finish double-sigint
check "((status == 130))" "double-sigint: exit status $status, expected 130"
check "((elapsed_ms < 5000))" "double-sigint: the second SIGINT took ${elapsed_ms} ms to end the process"
check "grep -q '^switcht5: second SIGINT: exiting now without saving' '$run.log'" "double-sigint: no 'second SIGINT' message"
check "[[ \"\$(cd '$run' && sha256sum metrics.jsonl checkpoints/latest checkpoints/ckpt-00000002.h5)\" == '$before' ]]" \
  "double-sigint: metrics.jsonl or a checkpoint changed"
exit $fail
