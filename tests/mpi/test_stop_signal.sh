#!/usr/bin/env bash
# SIGUSR1 / SIGTERM stop training cleanly: every rank finishes its step, a checkpoint of that
# step is saved, and the run exits with 128 + the signal; `--resume auto` continues from there.
#  1. SIGUSR1 to mpirun (2 ranks, data 2 x expert 2; mpirun forwards it to every rank): exit 138
#     (mpirun passes on the ranks' status); `latest` names the checkpoint of the last logged
#     step S, which `inspect` verifies; `--resume auto` logs S+1, S+2, S+3 next;
#  2. SIGTERM to rank 1 alone (2 ranks): rank 0 stops at the same step, exit 143, and the same;
#  3. SIGTERM to a single process: exit 143, and the same;
#  4. SIGINT (Ctrl-C) to a single process: the same as SIGTERM, exit 130 (a second SIGINT ends
#     a run at once: tests/mpi/test_stall.sh).
# The signal is sent once metrics.jsonl has a line (the handlers are installed by then).
#   tests/mpi/test_stop_signal.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$2 src=$3
test_name=test_stop_signal
# shellcheck source=checkpoint_test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/checkpoint_test_lib.sh"

# stop_case NAME NP SIGNAL TARGET EXPECTED_STATUS: TARGET is mpirun, rank1 or process.
stop_case() {
  local name=$1 np=$2 signal=$3 target=$4 expected=$5
  local run=$dir/$name
  local cmd=("$bin" train --config "$config" --run-dir "$run" --set log.every=1 --set train.steps=100000
             --set checkpoint.every=0 --set parallel.data="$np" --set parallel.expert="$np")
  # Not through run_train: $! must be switcht5's (or mpirun's: the wrapper execs it) own pid.
  if ((np == 1)); then "${cmd[@]}" >"$run.log" 2>&1 &
  else bash "$mpirun_sh" -np "$np" "${cmd[@]}" >"$run.log" 2>&1 & fi
  local pid=$!
  for _ in $(seq 400); do [[ -s $run/metrics.jsonl ]] && break; sleep 0.05; done
  local victim=$pid
  if [[ $target == rank1 ]]; then
    for child in $(pgrep -P "$pid"); do
      tr '\0' '\n' <"/proc/$child/environ" 2>/dev/null | grep -qx 'OMPI_COMM_WORLD_RANK=1' && victim=$child
    done
    check "((victim != pid))" "$name: rank 1's process not found"
  fi
  kill -s "$signal" "$victim"
  # A run that ignored the signal would train 100000 steps: give up after 60 s.
  for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then  # mpirun ends its ranks on SIGTERM; SIGKILL would not
    check false "$name: still running 60 s after $signal"
    if ((np == 1)); then kill -9 "$pid"; else kill "$pid"; fi
  fi
  wait "$pid"
  local status=$?
  check "((status == expected))" "$name: $signal to $target: status $status, expected $expected"
  check "grep -q 'received SIG$signal *: saving a checkpoint after step' '$run.log'" "$name: no stop message"

  local logged stop latest
  logged=$(steps_logged "$run/metrics.jsonl")
  stop=${logged##* }
  latest=$(latest_of "$run")
  echo "$test_name: $name: stopped after step $stop; latest ${latest##*/}"
  check "[[ '$latest' == '$run/checkpoints/$(printf 'ckpt-%08d.h5' "$stop")' ]]" \
    "$name: latest is '$latest', expected the checkpoint of the last logged step $stop"
  check "'$bin' inspect '$latest' >/dev/null 2>&1 && [[ \$(ckpt_step '$latest') == '$stop' ]]" \
    "$name: inspect does not verify $latest as step $stop"
  check "[[ '$logged' == '$(seq -s ' ' 1 "$stop")' ]]" "$name: the stopped run logged steps $logged"

  run_train "$np" "$run" --resume auto --set train.steps=$((stop + 3)) --set parallel.data="$np" \
    --set parallel.expert="$np"
  status=$?
  check "((status == 0))" "$name: resuming exited with status $status"
  check "[[ \$(steps_logged '$run/metrics.jsonl') == '$logged $((stop + 1)) $((stop + 2)) $((stop + 3))' ]]" \
    "$name: after resuming metrics.jsonl logs steps $(steps_logged "$run/metrics.jsonl"), expected $logged then $((stop + 1))-$((stop + 3))"
}

stop_case usr1-mpirun 2 USR1 mpirun 138
stop_case term-rank1 2 TERM rank1 143
stop_case term-process 1 TERM process 143
stop_case int-process 1 INT process 130
exit $fail
