#!/usr/bin/env bash
# A diverged run never saves: on 2 ranks (data 2 x expert 2, ZeRO-1 AdamW: each rank owns part
# of the tensors, so the non-finite count is collective) a run resumed from step 2 with
# train.learning_rate 1e308 overflows its weights, and the save of step 4 is refused on every
# rank (they agree; exit 2), the job printing one line naming the tensor; ckpt-2 and `latest` are byte-identical to
# before, no ckpt-4 or .tmp appears, and ckpt-2 still resumes. (One process: test_checkpoint.)
#   tests/mpi/test_nonfinite_save.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$2 src=$3
test_name=test_nonfinite_save
# shellcheck source=checkpoint_test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/checkpoint_test_lib.sh"

two=(--set parallel.data=2 --set parallel.expert=2 --set parallel.zero1=true --set train.optimizer=adamw
     --set checkpoint.every=2)
run=$dir/run ck=$dir/run/checkpoints
run_train 2 "$run" --set train.steps=2 "${two[@]}"
check "(($? == 0))" "the run to step 2 failed: $(tail -n 3 "$run.log")"
cp -p "$ck/ckpt-00000002.h5" "$ck/latest" "$dir/"

run_train 2 "$run" --resume auto --set train.steps=6 --set train.learning_rate=1e308 "${two[@]}"
status=$?
check "((status == 2))" "the diverged run: exit status $status, expected 2: $(tail -n 3 "$run.log")"
errors=$(grep -E '^(\[rank [0-9]+\] )?switcht5: error: ' "$run.log")
check "[[ \$(wc -l <<<'$errors') == 1 ]] && ! grep -q MPI_ABORT '$run.log'" \
  "expected one error line and every rank exiting 2 (no abort), got: $errors"
check "grep -Eq '^switcht5: error: refusing to save checkpoint step 4: (parameter|optimizer state) [^ ]+ holds [0-9]+ non-finite values .*; the previous checkpoint $ck/ckpt-00000002.h5 is kept$' <<<'$errors'" \
  "the error does not name a tensor and the kept checkpoint: $errors"
check "grep -q 'non-finite loss or gradient' '$run.log'" "the run did not diverge (no skipped step logged)"
check "cmp -s '$dir/ckpt-00000002.h5' '$ck/ckpt-00000002.h5'" "ckpt-2 changed"
check "cmp -s '$dir/latest' '$ck/latest'" "latest changed: $(cat "$ck/latest")"
check "[[ ! -e '$ck/ckpt-00000004.h5' ]] && ! compgen -G '$ck/*.tmp' >/dev/null" \
  "the refused save left files: $(cd "$ck" && echo *)"
run_train 2 "$run" --resume auto --set train.steps=4 "${two[@]}"
check "(($? == 0))" "resuming from ckpt-2 with the learning rate back failed: $(tail -n 3 "$run.log")"
check "[[ \$(cat '$ck/latest') == ckpt-00000004.h5 ]]" "no ckpt-4 after resuming with the learning rate back"
exit $fail
