#!/usr/bin/env bash
# A checkpoint resumes on any layout, and `eval` reads it on any number of processes:
#  1. saved at step 10 on 4 ranks (data 4 x expert 4, Adafactor), resumed to step 20 on 2 ranks
#     (data 2 x expert 2) and on 1 process: the losses of steps 11-20 match the uninterrupted
#     4-rank run's to 1e-5 relative (only the order of the sums differs);
#  2. the same from 4 ranks of data 2 x model 2 x expert 2 with ZeRO-1 AdamW, resumed on 2 ranks
#     (data 2 x expert 2, ZeRO-1: other owners of the optimizer state) and on 1 process;
#  3. on the same layout (2 ranks, data 2 x expert 2, ZeRO-1 AdamW) 10 steps + resume + 10
#     steps is bitwise 20 steps: the same loss strings at steps 1-20 and the same checksum for
#     every dataset of ckpt-20;
#  4. `eval --checkpoint` of the step-10 checkpoint of (1) prints the same val_loss (1e-5
#     relative) on 1 process and on 2, and the same as the training run logged at step 10.
#   tests/mpi/test_resume_layouts.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$2 src=$3
test_name=test_resume_layouts
# shellcheck source=checkpoint_test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/checkpoint_test_lib.sh"

# resume_case NAME REF NP LAYOUT...: resumes REF's ckpt-10 on NP processes with LAYOUT to step
# 20 and compares the losses of steps 11-20 with REF's.
resume_case() {
  local name=$1 ref=$2 np=$3
  shift 3
  local run=$dir/$name
  run_train "$np" "$run" --resume "$dir/$ref/checkpoints/ckpt-00000010.h5" --set train.steps=20 "$@"
  local status=$?
  check "((status == 0))" "$name: resuming $ref's step 10 on $np process(es) exited with status $status"
  check "grep -q 'resumed from .*ckpt-00000010.h5 (step 10' '$run.log'" "$name: did not resume from step 10"
  check "[[ \$(steps_logged '$run/metrics.jsonl') == '$(seq -s ' ' 11 20)' ]]" \
    "$name: the resumed run logged steps $(steps_logged "$run/metrics.jsonl"), expected 11-20"
  local diffs
  diffs=$(losses_close "$(losses "$dir/$ref/metrics.jsonl" 11 20)" "$(losses "$run/metrics.jsonl" 11 20)" 1e-5)
  check "(($? == 0))" "$name: losses of steps 11-20 differ from $ref's by more than 1e-5 relative:
$diffs"
}

run_train 4 "$dir/ref4" --set train.steps=20 --set checkpoint.every=10 --set train.eval_every=10 \
  --set parallel.data=4 --set parallel.expert=4
check "(($? == 0))" "the 4-rank data 4 x expert 4 run failed"
resume_case np2-from-ref4 ref4 2 --set parallel.data=2 --set parallel.expert=2
resume_case np1-from-ref4 ref4 1

adamw=(--set train.optimizer=adamw)
run_train 4 "$dir/mp4" --set train.steps=20 --set checkpoint.every=10 --set parallel.data=2 \
  --set parallel.model=2 --set parallel.expert=2 --set parallel.zero1=true "${adamw[@]}"
check "(($? == 0))" "the 4-rank data 2 x model 2 x expert 2 ZeRO-1 run failed"
resume_case np2-from-mp4 mp4 2 --set parallel.data=2 --set parallel.expert=2 --set parallel.zero1=true "${adamw[@]}"
resume_case np1-from-mp4 mp4 1 "${adamw[@]}"

# Same layout: bitwise.
same=(--set parallel.data=2 --set parallel.expert=2 --set parallel.zero1=true "${adamw[@]}")
run_train 2 "$dir/whole" --set train.steps=20 --set checkpoint.every=10 "${same[@]}"
check "(($? == 0))" "the 20-step 2-rank run failed"
run_train 2 "$dir/halves" --set train.steps=10 "${same[@]}"
check "(($? == 0))" "the 10-step 2-rank run failed"
run_train 2 "$dir/halves" --resume auto --set train.steps=20 "${same[@]}"
check "(($? == 0))" "resuming the 10-step 2-rank run failed"
check "[[ \"\$(losses '$dir/halves/metrics.jsonl' 1 20)\" == \"\$(losses '$dir/whole/metrics.jsonl' 1 20)\" ]]" \
  "10 + 10 steps: the loss strings differ from 20 steps:
$(diff <(losses "$dir/halves/metrics.jsonl" 1 20) <(losses "$dir/whole/metrics.jsonl" 1 20))"
check "same_checksums '$dir/halves/checkpoints/ckpt-00000020.h5' '$dir/whole/checkpoints/ckpt-00000020.h5'" \
  "10 + 10 steps: ckpt-20 differs from the 20-step run's"
check "same_checksums '$dir/halves/checkpoints/ckpt-00000010.h5' '$dir/whole/checkpoints/ckpt-00000010.h5'" \
  "ckpt-10 of the 10-step run differs from the 20-step run's"

# eval of ref4's step 10 on 1 and 2 processes, and the val_loss ref4 logged at step 10.
val_loss() { python3 -c 'import json, sys; print(json.loads(sys.stdin.readlines()[-1])["val_loss"])'; }
ckpt10=$dir/ref4/checkpoints/ckpt-00000010.h5
eval1=$("$bin" eval --checkpoint "$ckpt10" 2>"$dir/eval1.err" | val_loss)
eval2=$(bash "$mpirun_sh" -np 2 "$bin" eval --checkpoint "$ckpt10" 2>"$dir/eval2.err" | val_loss)
logged=$(python3 -c 'import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m["step"] == 10: v = m.get("val_loss")
print(v)' "$dir/ref4/metrics.jsonl")
echo "$test_name: val_loss at step 10: eval 1 process $eval1, 2 processes $eval2, logged in training $logged"
check "rel_close '$eval1' '$eval2' 1e-5" "eval on 1 and 2 processes: val_loss $eval1 vs $eval2 $(cat "$dir/eval1.err" "$dir/eval2.err")"
check "rel_close '$eval1' '$logged' 1e-5" "eval's val_loss $eval1 is not the one training logged at step 10 ($logged)"
exit $fail
