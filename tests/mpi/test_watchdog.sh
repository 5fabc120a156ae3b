#!/usr/bin/env bash
# A rank that stops or dies mid-training ends the whole job in bounded time; nobody hangs
# (comm/watchdog.h). Two ranks, data 2 x expert 2, parallel.timeout_s 3; once training has
# started (metrics.jsonl has a line), rank 1 gets
#  1. SIGSTOP: rank 0's watchdog ends the job: exit status 3, within the deadline plus mpirun's
#     teardown, with exactly one watchdog line (rank 0's, not the stopped rank's once mpirun
#     continues it to kill it) naming the step, the collective, its group and the per-expert
#     token counts of the last completed step, in the output and in train.log; no process of
#     the job is left running;
#  2. SIGKILL: mpirun sees the death and ends the job itself (Open MPI does so at once, before
#     any deadline): a non-zero status within the same bound, with mpirun's message naming the
#     rank and the signal;
#  3. SIGKILL under mpirun --enable-recovery, which keeps the job going after a death (as srun
#     does without --kill-on-bad-exit): rank 0's watchdog ends it within the same bound, with
#     its line. (mpirun then exits 0 whatever the ranks did: the status is not checked.)
# The stopped or killed process is continued and killed on the way out whatever happens.
#   tests/mpi/test_watchdog.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$2 src=$3
test_name=test_watchdog
timeout_s=3
# The deadline, then mpirun's teardown (SIGCONT, SIGTERM, SIGKILL to the ranks): about 1 s here.
bound_s=$((timeout_s + 12))
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do
    kill -CONT "$p" 2>/dev/null
    kill -KILL "$p" 2>/dev/null
  done
  rm -rf "$dir"
}
trap cleanup EXIT
fail=0
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
check() { if ! eval "$1"; then echo "$test_name: FAILED: $2"; fail=1; fi; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# signal_case NAME SIGNAL [MPIRUN_FLAGS]: trains until rank 1 gets SIGNAL; sets status,
# elapsed_ms, victim.
signal_case() {
  local name=$1 signal=$2 flags=${3:-}
  local run=$dir/$name
  SWITCHT5_MPIRUN_FLAGS=$flags bash "$mpirun_sh" -np 2 "$bin" train --config "$src/configs/tiny-synthetic.yaml" --run-dir "$run" \
    --set train.steps=100000 --set log.every=1 --set checkpoint.every=0 --set parallel.data=2 \
    --set parallel.expert=2 --set parallel.timeout_s=$timeout_s >"$run.log" 2>&1 &
  local pid=$!  # mpirun's own: the wrapper execs it
  pids+=("$pid")
  for _ in $(seq 600); do [[ -s $run/metrics.jsonl ]] && break; sleep 0.05; done
  victim=
  for child in $(pgrep -P "$pid"); do
    tr '\0' '\n' <"/proc/$child/environ" 2>/dev/null | grep -qx 'OMPI_COMM_WORLD_RANK=1' && victim=$child
  done
  check "[[ -n '$victim' ]]" "$name: rank 1's process not found"
  [[ -n $victim ]] && pids+=("$victim") && kill -s "$signal" "$victim"
  local start
  start=$(now_ms)
  for _ in $(seq $((bound_s * 10 + 300))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  elapsed_ms=$(($(now_ms) - start))
  if kill -0 "$pid" 2>/dev/null; then
    check false "$name: the job still runs $((elapsed_ms / 1000)) s after SIG$signal to rank 1"
    kill -CONT "$victim" 2>/dev/null
    kill "$pid"
  fi
  wait "$pid"
  status=$?
  cat "$run.log" | grep -v '^  \|^#\|^[a-z]*:$\|^$'  # the resolved config is noise here
  echo "$test_name: $name: SIG$signal to rank 1: exit status $status after ${elapsed_ms} ms"
  check "((elapsed_ms < bound_s * 1000))" "$name: the job took ${elapsed_ms} ms to end (bound ${bound_s} s)"
}

signal_case stop STOP
run=$dir/stop
check "((status == 3))" "stop: exit status $status, expected 3 (the watchdog's)"
line='switcht5: watchdog: step [0-9]+: [a-z_]+ over the (world|data|expert|expert-replica) group \(2 ranks[^)]*; call [0-9]+ on this group\) did not complete in 3 s; ending the job \(exit code 3\)\. Per-expert tokens \(top-1 choices\) of the last completed step, [0-9]+: encoder\.block\.1 \[[0-9]+ [0-9]+ [0-9]+ [0-9]+\], decoder\.block\.1 \[[0-9 ]+\]$'
check "grep -Eq '^\[rank 0\] $line' '$run.log'" "stop: rank 0's watchdog line is missing"
check "[[ \$(grep -c 'switcht5: watchdog:' '$run.log') -eq 1 ]]" "stop: expected exactly one watchdog line"
check "grep -Eq '\[error\] \[rank 0\] ${line#switcht5: }' '$run/train.log'" "stop: the watchdog line is not in train.log"
sleep 1
state=$(ps -o stat= -p "$victim" 2>/dev/null)
check "[[ -z '$state' || '$state' == Z* ]]" "stop: the stopped rank is still there (state $state)"

signal_case kill KILL
check "((status != 0))" "kill: exit status 0"
check "grep -q 'process rank 1 .* exited on signal 9' '$dir/kill.log'" "kill: mpirun's message naming rank 1 and signal 9 is missing"

signal_case kill-recovery KILL --enable-recovery
check "grep -Eq '^\[rank 0\] $line' '$dir/kill-recovery.log'" "kill-recovery: rank 0's watchdog line is missing"
exit $fail
