#!/usr/bin/env bash
# `switcht5 plan` predicts a CPU rank's memory: its host_total_bytes (the backend memory it counts
# plus the program's own footprint, measured in the plan process) is within 15% of the peak
# resident memory of a real `train` run, for three configs of 0.4-1.2 GB that differ in what
# dominates (experts and parameters; batch, lengths and vocabulary, i.e. activations; AdamW state
# with bf16 copies). One step each (the peak comes in the first step, plus the end-of-training
# save).
#   tests/mpi/test_plan_rss.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$2 src=$3
test_name=test_plan_rss
# shellcheck source=checkpoint_test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/checkpoint_test_lib.sh"

cases=(
  "experts|--set model.d_model=384 --set model.d_ff=1536 --set model.num_experts=16 --set model.d_kv=48 --set model.num_heads=8"
  "activations|--set train.batch_size=64 --set data.inputs_length=128 --set data.targets_length=128 --set model.d_model=256 --set model.d_ff=1024 --set model.vocab_size=8192"
  "adamw-bf16|--set train.optimizer=adamw --set train.precision=bf16 --set model.d_model=256 --set model.d_ff=2048 --set model.num_experts=16 --set train.batch_size=32 --set data.inputs_length=64 --set data.targets_length=64"
)
for c in "${cases[@]}"; do
  name=${c%%|*}
  read -ra sets <<<"${c#*|}"
  predicted=$("$bin" plan --config "$config" "${sets[@]}" --json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["host_total_bytes"])')
  rss_kb=$(peak_rss "$dir/$name.log" "$bin" train --config "$config" --run-dir "$dir/$name" "${sets[@]}" \
    --set train.steps=1 --set train.eval_every=0)
  status=$?
  check "((status == 0))" "$name: train exited with $status: $(tail -n 2 "$dir/$name.log")"
  measured=$((rss_kb * 1024))
  off=$(python3 -c "print(f'{100 * ($predicted - $measured) / $measured:+.1f}')")
  echo "$test_name: $name: plan $((predicted / 1000000)) MB, peak RSS $((measured / 1000000)) MB ($off%)"
  check "python3 -c 'import sys; sys.exit(abs($predicted - $measured) > 0.15 * $measured)'" \
    "$name: the plan is $off% off the measured peak (bound 15%)"
  check "((predicted > 300000000))" "$name: a plan of $((predicted / 1000000)) MB is too small to test the count"
done
exit $fail
