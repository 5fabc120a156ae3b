#!/usr/bin/env bash
# A disk that fills or refuses writes ends a run with one clear error (exit 2), never a crash or
# a hang, and loses nothing already written:
#  1. checkpoint.dir on a tmpfs that holds exactly one checkpoint (resized to it once the first
#     is saved), on one process and on 2 ranks (data 2 x expert 2, ZeRO-1 AdamW): the save of
#     step 4 fails; every rank exits 2 (the ranks agree on the error) and the job prints it once,
#     "<ckpt-4>.h5.tmp: cannot write the checkpoint: No space left on device" (not once per rank:
#     a rank that aborted the job on its own error could kill the others before they printed, the
#     race that failed this test in a fresh root); no segmentation fault, no .tmp left, ckpt-2 and `latest` byte-identical
#     to copies taken before, ckpt-2 still verifies (inspect), metrics.jsonl whole JSON lines;
#     with the space back, --resume auto saves step 4;
#  2. the run directory on a 32 KiB tmpfs (checkpoint.every 0), on 1 process and on 2 ranks:
#     metrics.jsonl or train.log fills it; the error names that file and "No space left on
#     device", and metrics.jsonl holds whole JSON lines only (no partial last line);
#  3. metrics.jsonl and then train.log a link to /dev/full (every write: ENOSPC): the same
#     error at the first logged step. This part needs no mount;
#  4. eval --dump-batch onto a 16 KiB tmpfs: "<file>: cannot write the arrays: No space left on
#     device", exit 2, no partial file, no crash.
# Parts 1, 2 and 4 mount tmpfs file systems (root; unmounted on every exit path); where mounting
# is not permitted they are skipped, saying why (exit 77, ctest's SKIP_RETURN_CODE), after
# part 3 has run.
#   tests/mpi/test_storage_faults.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$2 src=$3
test_name=test_storage_faults
# shellcheck source=checkpoint_test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/checkpoint_test_lib.sh"

mounts=()
cleanup() {
  local m
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m"; done
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # through the EXIT trap

# mount_tmpfs DIR SIZE: a tmpfs of SIZE at DIR; prints mount's error and fails where not permitted.
mount_tmpfs() {
  mkdir -p "$1"
  mount -t tmpfs -o "size=$2" tmpfs "$1" || return 1
  mounts+=("$1")
}

# no_crash LOG WHAT: the run ended by itself, with no signal and no core dump.
no_crash() {
  check "! grep -Eq 'Segmentation fault|Signal: |signal 11|core dumped|exited on signal' '$1'" \
    "$2: the run crashed: $(grep -Em1 'Segmentation fault|Signal: |signal 11|core dumped|exited on signal' "$1")"
}

# whole_json_lines FILE WHAT: every line of FILE is a JSON object and the file ends with a newline.
whole_json_lines() {
  local out
  out=$(python3 - "$1" <<'EOF'
import json, sys
data = open(sys.argv[1], "rb").read()
if data and not data.endswith(b"\n"):
    print("no newline at the end: a partial last line"); sys.exit(1)
for n, line in enumerate(data.decode().splitlines(), 1):
    try:
        json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        print(f"line {n} is not a metrics line: {line[:80]!r}"); sys.exit(1)
print(len(data.decode().splitlines()))
EOF
  )
  check "(($? == 0))" "$2: $1: $out"
}

# error_lines LOG: the error lines of LOG, "[rank r] " removed.
error_lines() { grep -E '^(\[rank [0-9]+\] )?switcht5: error: ' "$1" | sed -E 's/^\[rank [0-9]+\] //'; }

# ---- 3. /dev/full (no mount) -----------------------------------------------------------------
for file in metrics.jsonl train.log; do
  run=$dir/devfull-${file%%.*} what="$file on /dev/full"
  mkdir -p "$run"
  ln -s /dev/full "$run/$file"
  run_train 1 "$run" --set train.steps=3
  status=$?
  no_crash "$run.log" "$what"
  check "((status == 2))" "$what: exit status $status, expected 2"
  check "[[ \"\$(error_lines '$run.log')\" == 'switcht5: error: $run/$file: cannot write the '*': No space left on device' ]]" \
    "$what: expected one error naming $run/$file and the reason, got: $(error_lines "$run.log")"
done

if ! mount_tmpfs "$dir/probe" 1m 2>"$dir/probe.err"; then
  echo "$test_name: skipped: cannot mount a tmpfs here ($(head -n 1 "$dir/probe.err")); the /dev/full part ran"
  ((fail)) && exit 1
  exit 77
fi

# ---- 1. a checkpoint that does not fit -------------------------------------------------------
one=(--set parallel.data=1)
two=(--set parallel.data=2 --set parallel.expert=2 --set parallel.zero1=true --set train.optimizer=adamw)
for np in 1 2; do
  layout=("${one[@]}")
  ((np == 2)) && layout=("${two[@]}")
  what="checkpoint on a full disk ($np process(es))"
  fs=$dir/ckfs-$np run=$dir/ck-run-$np saved=$dir/ck-saved-$np
  mount_tmpfs "$fs" 64m || { check false "$what: cannot mount $fs"; continue; }
  opts=(--set checkpoint.every=2 --set "checkpoint.dir=$fs/ck" "${layout[@]}")
  run_train "$np" "$run" --set train.steps=2 "${opts[@]}"
  check "(($? == 0))" "$what: the run to step 2 failed: $(tail -n 3 "$run.log")"
  ckpt=$fs/ck/ckpt-00000002.h5
  if [[ ! -f $ckpt ]]; then check false "$what: no $ckpt"; continue; fi
  mkdir -p "$saved"
  cp -p "$ckpt" "$fs/ck/latest" "$saved/"
  # Room for half a checkpoint more than is used now: the next one cannot fit.
  used_kb=$(df -k --output=used "$fs" | tail -n 1 | tr -d ' ')
  size_kb=$(( used_kb + $(stat -c %s "$ckpt") / 2048 ))
  mount -o "remount,size=${size_kb}k" "$fs"
  check "(($? == 0))" "$what: cannot resize $fs to ${size_kb}k"

  run_train "$np" "$run" --resume auto --set train.steps=4 "${opts[@]}"
  status=$?
  no_crash "$run.log" "$what"
  check "((status == 2))" "$what: exit status $status, expected 2: $(tail -n 3 "$run.log")"
  expect="switcht5: error: $fs/ck/ckpt-00000004.h5.tmp: cannot write the checkpoint: No space left on device"
  errors=$(error_lines "$run.log")
  check "[[ '$errors' == '$expect' ]]" "$what: expected the one error line '$expect', got: $errors"
  check "! grep -q 'MPI_ABORT\|mpirun has exited due to process' '$run.log'" \
    "$what: a rank aborted the job instead of every rank exiting 2: $(tail -n 3 "$run.log")"
  check "! compgen -G '$fs/ck/*.tmp' >/dev/null" "$what: left $(cd "$fs/ck" && echo *.tmp)"
  check "cmp -s '$saved/ckpt-00000002.h5' '$ckpt'" "$what: ckpt-2 changed"
  check "cmp -s '$saved/latest' '$fs/ck/latest'" "$what: latest changed: $(cat "$fs/ck/latest")"
  check "[[ ! -e '$fs/ck/ckpt-00000004.h5' ]]" "$what: a ckpt-4 appeared"
  check "'$bin' inspect '$ckpt' >/dev/null 2>&1" "$what: ckpt-2 no longer verifies"
  whole_json_lines "$run/metrics.jsonl" "$what"
  check "[[ \$(steps_logged '$run/metrics.jsonl') == '1 2 3 4' ]]" \
    "$what: metrics.jsonl logs steps $(steps_logged "$run/metrics.jsonl"), expected 1 2 3 4"

  # With the space back, the same command goes on from ckpt-2 and saves step 4.
  mount -o remount,size=64m "$fs"
  run_train "$np" "$run" --resume auto --set train.steps=4 "${opts[@]}"
  check "(($? == 0))" "$what: resuming with space again failed: $(tail -n 3 "$run.log")"
  check "[[ \$(cat '$fs/ck/latest') == ckpt-00000004.h5 ]]" \
    "$what: latest does not name ckpt-4 after the space came back"
done

# ---- 2. metrics.jsonl and train.log on a full disk -------------------------------------------
for np in 1 2; do
  what="run directory on a full disk ($np process(es))"
  fs=$dir/runfs-$np
  mount_tmpfs "$fs" 32k || { check false "$what: cannot mount $fs"; continue; }
  run=$fs/run
  layout=(--set "parallel.data=$np")
  # Not run_train: its log goes beside the run directory, here on the full disk.
  cmd=("$bin" train --config "$config" --run-dir "$run" --set log.every=1 --set train.steps=5000
       --set checkpoint.every=0 "${layout[@]}")
  if ((np == 1)); then "${cmd[@]}" >"$dir/runfs-$np.log" 2>&1; else bash "$mpirun_sh" -np "$np" "${cmd[@]}" >"$dir/runfs-$np.log" 2>&1; fi
  status=$?
  log=$dir/runfs-$np.log
  no_crash "$log" "$what"
  check "((status == 2))" "$what: exit status $status, expected 2: $(tail -n 3 "$log")"
  check "error_lines '$log' | grep -Eq '^switcht5: error: $run/(metrics\.jsonl: cannot write the metrics of step [0-9]+|train\.log: cannot write the log): No space left on device$'" \
    "$what: expected an error naming metrics.jsonl or train.log and the reason, got: $(error_lines "$log")"
  whole_json_lines "$run/metrics.jsonl" "$what"
  echo "$test_name: $what: $(error_lines "$log" | head -n 1)"
done

# ---- 4. eval --dump-batch onto a full disk ---------------------------------------------------
what="eval --dump-batch on a full disk"
fs=$dir/dumpfs
if mount_tmpfs "$fs" 16k; then
  run_train 1 "$dir/dump-run" --set train.steps=1
  check "(($? == 0))" "$what: the run to step 1 failed"
  "$bin" eval --checkpoint "$dir/dump-run/checkpoints" --dump-batch "$fs/batch.h5" >"$dir/dump.log" 2>&1
  status=$?
  no_crash "$dir/dump.log" "$what"
  check "((status == 2))" "$what: exit status $status, expected 2: $(tail -n 3 "$dir/dump.log")"
  check "[[ \"\$(error_lines '$dir/dump.log')\" == 'switcht5: error: $fs/batch.h5: cannot write the arrays: No space left on device' ]]" \
    "$what: got: $(error_lines "$dir/dump.log")"
  check "[[ ! -e '$fs/batch.h5' ]]" "$what: the partial file was left"
else
  check false "$what: cannot mount $fs"
fi
exit $fail
