#!/usr/bin/env bash
# Checkpoints survive a process dying in the middle of a save:
#  1. SWITCHT5_CRASH_IN_SAVE=POINT:4 kills the run (SIGKILL) inside the save of step 4 at each
#     POINT (datasets: half the datasets written to ckpt-4.h5.tmp; written: the .tmp complete;
#     renamed: ckpt-4.h5 in place, `latest` not updated; latest: `latest` updated, ckpt-4 not
#     pruned), on one process and on 2 ranks (data 2 x expert 2, ZeRO-1 AdamW). After each:
#     the status shows the SIGKILL; `latest` names a complete checkpoint that `inspect`
#     verifies (ckpt-4 once `latest` was updated, else ckpt-2); `--resume auto` never takes a
#     .tmp, even with `latest` deleted; it trains to step 6, and its ckpt-6 is bitwise the one an
#     uninterrupted 6-step run saves (every dataset checksum), with the same losses at steps 3-6
#     (the loss strings of metrics.jsonl); after the renamed and latest points ckpt-4 is bitwise
#     the uninterrupted run's too;
#  2. kill -9 from outside at three moments of a run saving every step: `latest` names a
#     checkpoint that `inspect` verifies, and `--resume auto` trains two more steps from it,
#     with the losses the killed run had logged for those steps where it got that far.
#   tests/mpi/test_checkpoint_crash.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$2 src=$3
test_name=test_checkpoint_crash
# shellcheck source=checkpoint_test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/checkpoint_test_lib.sh"

# crash_case NAME NP POINT LAYOUT...: the crash at POINT of step 4, then the resume, compared
# with the uninterrupted run $dir/NAME-ref.
crash_case() {
  local name=$1 np=$2 point=$3
  shift 3
  local run=$dir/$name-$point ref=$dir/$name-ref
  SWITCHT5_CRASH_IN_SAVE=$point:4 run_train "$np" "$run" --set train.steps=6 --set checkpoint.every=2 \
    --set checkpoint.keep=3 "$@" 2>/dev/null
  local status=$?
  local what="$name, crash at $point:4"
  check "((status == 137))" "$what: the run should die of SIGKILL (status 137), got $status"
  check "grep -q 'SWITCHT5_CRASH_IN_SAVE=$point:4: killing' '$run.log'" "$what: the crash point was not reached"
  ((np > 1)) && check "grep -q 'exited on signal 9' '$run.log'" "$what: mpirun does not report the SIGKILL"

  local expect=ckpt-00000002.h5
  [[ $point == latest ]] && expect=ckpt-00000004.h5
  local latest
  latest=$(latest_of "$run")
  check "[[ '$latest' == '$run/checkpoints/$expect' ]]" "$what: latest names '$latest', expected $expect"
  check "'$bin' inspect '$latest' >/dev/null 2>&1" "$what: inspect does not verify $latest"
  check "[[ \$(ckpt_step '$latest') == \$((10#\${expect:5:8})) ]]" "$what: $latest does not hold its step"
  case $point in
    datasets | written)
      check "[[ -f '$run/checkpoints/ckpt-00000004.h5.tmp' && ! -e '$run/checkpoints/ckpt-00000004.h5' ]]" \
        "$what: expected ckpt-4.h5.tmp and no ckpt-4.h5" ;;
    *) check "same_checksums '$run/checkpoints/ckpt-00000004.h5' '$ref/checkpoints/ckpt-00000004.h5'" \
         "$what: the renamed ckpt-4 differs from the uninterrupted run's" ;;
  esac
  # Without `latest`, auto takes the newest complete ckpt-*.h5: never the half-written .tmp.
  if [[ $point == datasets ]]; then
    check "! '$bin' inspect '$run/checkpoints/ckpt-00000004.h5.tmp' >/dev/null 2>&1" \
      "$what: inspect accepts the half-written .tmp"
    rm "$run/checkpoints/latest"
  fi

  run_train "$np" "$run" --resume auto --set train.steps=6 --set checkpoint.every=2 --set checkpoint.keep=3 "$@"
  status=$?
  check "((status == 0))" "$what: the resumed run exited with status $status"
  check "grep -q 'resumed from $run/checkpoints/$expect (step' '$run.log'" "$what: did not resume from $expect"
  check "[[ \$(latest_of '$run') == '$run/checkpoints/ckpt-00000006.h5' ]]" "$what: latest is not ckpt-6"
  check "same_checksums '$run/checkpoints/ckpt-00000006.h5' '$ref/checkpoints/ckpt-00000006.h5'" \
    "$what: the resumed ckpt-6 differs from the uninterrupted run's"
  check "[[ \"\$(losses '$run/metrics.jsonl' 3 6)\" == \"\$(losses '$ref/metrics.jsonl' 3 6)\" ]]" \
    "$what: losses at steps 3-6 differ from the uninterrupted run's"
  check "! compgen -G '$run/checkpoints/*.tmp' >/dev/null" "$what: a .tmp file outlived the next save"
}

one=(--set parallel.data=1)
two=(--set parallel.data=2 --set parallel.expert=2 --set parallel.zero1=true --set train.optimizer=adamw)
run_train 1 "$dir/one-ref" --set train.steps=6 --set checkpoint.every=2 "${one[@]}"
check "(($? == 0))" "the uninterrupted 1-process run failed"
run_train 2 "$dir/two-ref" --set train.steps=6 --set checkpoint.every=2 "${two[@]}"
check "(($? == 0))" "the uninterrupted 2-rank run failed"
for point in datasets written renamed latest; do crash_case one 1 "$point" "${one[@]}"; done
# datasets: the ranks die inside the collective write; renamed: rank 0 alone dies, rank 1 waits.
for point in datasets renamed; do crash_case two 2 "$point" "${two[@]}"; done

# wait_for_lines FILE N: until FILE has N lines (at most ~20 s).
wait_for_lines() {
  for _ in $(seq 400); do [[ -f $1 && $(wc -l <"$1") -ge $2 ]] && return 0; sleep 0.05; done
  return 1
}

# kill -9 from outside: once the run has logged LINES steps (each step is saved), plus DELAY s,
# so that the kill lands in a step or a save; on 2 ranks, rank 1 alone is killed.
for spec in 1:3:0 1:5:0.013 2:4:0.021; do
  IFS=: read -r np lines delay <<<"$spec"
  run=$dir/kill-$np-$lines what="kill -9 ($np process(es), after $lines steps + $delay s)"
  cmd=("$bin" train --config "$config" --run-dir "$run" --set log.every=1 --set train.steps=100000
       --set checkpoint.every=1 --set checkpoint.keep=2)
  layout=(--set "parallel.data=$np" --set "parallel.expert=$np")
  # Not through run_train: $! must be switcht5's (or mpirun's) own pid.
  if ((np == 1)); then "${cmd[@]}" "${layout[@]}" >"$run.log" 2>&1 &
  else bash "$mpirun_sh" -np "$np" "${cmd[@]}" "${layout[@]}" >"$run.log" 2>&1 & fi
  pid=$!
  wait_for_lines "$run/metrics.jsonl" "$lines"
  check "(($? == 0))" "$what: the run did not log $lines steps in 20 s"
  sleep "$delay"
  victim=$pid
  if ((np > 1)); then  # mpirun exec'ed by the wrapper; its child with OMPI_COMM_WORLD_RANK=1
    for child in $(pgrep -P "$pid"); do
      tr '\0' '\n' <"/proc/$child/environ" 2>/dev/null | grep -qx 'OMPI_COMM_WORLD_RANK=1' && victim=$child
    done
  fi
  if ((np > 1 && victim == pid)); then  # SIGTERM makes mpirun end its ranks; SIGKILL would not
    check false "$what: rank 1's process not found"
    kill "$pid"
    wait "$pid"
    continue
  fi
  kill -9 "$victim"
  wait "$pid" 2>/dev/null
  status=$?
  check "((status == 137))" "$what: status $status, expected 137"
  ((np > 1)) && check "grep -q 'exited on signal 9' '$run.log'" "$what: mpirun does not report the SIGKILL"
  latest=$(latest_of "$run")
  check "'$bin' inspect '$latest' >/dev/null 2>&1" "$what: inspect does not verify latest ($latest)"
  step=$(ckpt_step "$latest")
  echo "$test_name: $what: latest is ${latest##*/} (step $step); left: $(cd "$run/checkpoints" && echo *)"
  if [[ ! $step =~ ^[0-9]+$ ]]; then check false "$what: no step in $latest"; continue; fi
  killed=$(losses "$run/metrics.jsonl" $((step + 1)) $((step + 2)))
  run_train "$np" "$run" --resume auto --set train.steps=$((step + 2)) --set checkpoint.every=1 "${layout[@]}"
  status=$?
  check "((status == 0))" "$what: resuming from step $step exited with status $status"
  resumed=$(losses "$run/metrics.jsonl" $((step + 1)) $((step + 2)))
  check "[[ \$(latest_of '$run') == '$run/checkpoints/$(printf 'ckpt-%08d.h5' $((step + 2)))' ]]" \
    "$what: no checkpoint of step $((step + 2)) after resuming"
  # The killed run's lines come first for their steps; where it logged a step, the resumed
  # run's loss is the same string.
  while read -r s loss; do
    [[ $loss == missing ]] && continue
    check "grep -qx '$s $loss' <<<'$resumed'" "$what: step $s: the killed run logged $loss, the resumed run: $(grep "^$s " <<<"$resumed")"
  done <<<"$killed"
  check "! grep -q missing <<<'$resumed'" "$what: the resumed run did not log steps $((step + 1))-$((step + 2))"
done
exit $fail
