#!/usr/bin/env bash
# `switcht5 train` checks what it can before the first step, and a run that is refused changes
# nothing in its run directory:
#  1. fresh-over-checkpoints: a fresh start (no --resume) into a run directory holding
#     checkpoints: exit 2, the message names the latest checkpoint and --resume auto;
#     train.log, metrics.jsonl, config.yaml and the checkpoints byte-identical;
#  2. failed-resume: --resume of a file that is not a checkpoint, and of a checkpoint of another
#     model (d_ff differs): exit 2, and the same files byte-identical (no appended train.log, no
#     rewritten config.yaml);
#  3. unwritable checkpoint.dir (a path under a regular file; a read-only tmpfs where mounting
#     is permitted), on 1 and 2 processes: exit 2 before any step, the message names
#     checkpoint.dir, no metrics.jsonl;
#  4. memory: a model whose plan (switcht5 plan) exceeds this host's available memory: exit 2
#     within seconds, the message gives both numbers, nothing allocated (peak RSS < 1 GB);
#  5. low space: checkpoint.dir on a 64 kB tmpfs: a warning before the first step names the
#     free space and one checkpoint's size (the save itself then fails with exit 2).
#   tests/mpi/test_preflight.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$2 src=$3
test_name=test_preflight
# shellcheck source=checkpoint_test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/checkpoint_test_lib.sh"
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null; done
  rm -rf "$dir"
}
trap cleanup EXIT

# snapshot RUN: sha256 of every file of RUN (sorted), the lock file excluded.
snapshot() { (cd "$1" && find . -type f ! -name .switcht5.lock -print0 | sort -z | xargs -0 sha256sum); }
# refused NAME RUN_LOG FRAGMENT: the last run exited 2 with FRAGMENT on one line of RUN_LOG.
refused() {
  check "((status == 2))" "$1: exit status $status, expected 2"
  check "grep -qF -- \"$3\" '$2'" "$1: no message containing '$3'"
  check "! grep -q 'check failed\|\.cpp:' '$2'" "$1: an internal error's file:line in the message"
  [[ $status == 2 ]] && echo "$test_name: $1: $(grep -m1 'error' "$2")"
}

run=$dir/base
run_train 1 "$run" --set train.steps=3
check "(($? == 0))" "base: the first run failed"
before=$(snapshot "$run")
check "[[ \$(echo '$before' | grep -c 'ckpt-00000003.h5\|train.log\|metrics.jsonl\|config.yaml') -eq 4 ]]" "base: files missing"

# 1
run_train 1 "$run" --set train.steps=5; status=$?
refused fresh-over-checkpoints "$run.log" "holds checkpoints of an earlier run (the latest is $run/checkpoints/ckpt-00000003.h5); pass --resume auto"
check "[[ \"\$(snapshot '$run')\" == '$before' ]]" "fresh-over-checkpoints: the run directory changed"

# 2
run_train 1 "$run" --set train.steps=5 --resume "$run/config.yaml"; status=$?
refused failed-resume-not-a-checkpoint "$run.log" "config.yaml"
check "[[ \"\$(snapshot '$run')\" == '$before' ]]" "failed-resume-not-a-checkpoint: the run directory changed"
run_train 1 "$run" --set train.steps=5 --resume auto --set model.d_ff=256; status=$?
refused failed-resume-other-model "$run.log" "ckpt-00000003.h5"
check "[[ \"\$(snapshot '$run')\" == '$before' ]]" "failed-resume-other-model: the run directory changed"

# 3
for np in 1 2; do
  r=$dir/unwritable-np$np
  run_train "$np" "$r" --set train.steps=3 --set parallel.data=$np --set parallel.expert=$np \
    --set checkpoint.dir="$run/config.yaml/checkpoints"; status=$?
  refused "unwritable-np$np" "$r.log" "checkpoint.dir $run/config.yaml/checkpoints: cannot create the directory: Not a directory"
  check "[[ ! -e '$r/metrics.jsonl' && ! -e '$r/train.log' ]]" "unwritable-np$np: training started"
  check "[[ \$(grep -c 'error' '$r.log') -eq 1 ]]" "unwritable-np$np: expected one error line"
done
ro=$dir/read-only
mkdir -p "$ro"
if mount -t tmpfs -o ro,size=1m tmpfs "$ro" 2>/dev/null; then
  mounts+=("$ro")
  r=$dir/read-only-run
  run_train 1 "$r" --set train.steps=3 --set checkpoint.dir="$ro/checkpoints"; status=$?
  refused read-only "$r.log" "checkpoint.dir $ro/checkpoints: cannot create the directory: Read-only file system"
else
  echo "$test_name: read-only: skipped: cannot mount a tmpfs here (not root, or no mount permission)"
fi

# 4
experts=128
avail_kb=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
while :; do
  plan=$("$bin" plan --config "$config" --set model.d_model=512 --set model.d_ff=16384 \
    --set model.num_experts=$experts --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["total_bytes"])')
  ((plan / 1024 > avail_kb * 2 || experts >= 65536)) && break
  experts=$((experts * 2))
done
r=$dir/memory
start_s=$(date +%s)
rss_kb=$(peak_rss "$r.log" "$bin" train --config "$config" --run-dir "$r" \
  --set model.d_model=512 --set model.d_ff=16384 --set model.num_experts=$experts)
status=$?
refused memory "$r.log" "GB of host memory"
check "grep -Eq 'needs? [0-9.]+ GB of host memory .* but [0-9.]+ GB is available' '$r.log'" "memory: the numbers are missing"
check "(($(date +%s) - start_s < 30))" "memory: the refusal took $(($(date +%s) - start_s)) s"
check "((rss_kb < 1000000))" "memory: peak RSS $rss_kb kB before refusing"
echo "$test_name: memory: $experts experts, plan $((plan / 1000000000)) GB, available $((avail_kb / 1000000)) GB"

# 5
small=$dir/small
mkdir -p "$small"
if mount -t tmpfs -o size=64k tmpfs "$small" 2>/dev/null; then
  mounts+=("$small")
  r=$dir/low-space
  run_train 1 "$r" --set train.steps=2 --set checkpoint.dir="$small/checkpoints"; status=$?
  check "grep -Eq 'checkpoint.dir $small/checkpoints has [0-9]+ kB free but one checkpoint of this model takes [0-9.]+ MB' '$r/train.log'" \
    "low-space: no warning in train.log"
  check "[[ \$(grep -n 'free but one checkpoint' '$r/train.log' | cut -d: -f1) -lt \$(grep -En 'step +1 [|]' '$r/train.log' | head -n1 | cut -d: -f1) ]]" \
    "low-space: the warning does not come before step 1"
  check "((status == 2))" "low-space: exit status $status, expected 2 (the save fails)"
else
  echo "$test_name: low-space: skipped: cannot mount a tmpfs here (not root, or no mount permission)"
fi
exit $fail
