#!/usr/bin/env bash
# scripts/sweep.py: a 2 x 2 grid over tiny-synthetic makes one run directory per point (its
# point.yaml validated by plan, the trainer's config.yaml), trains each, and writes summary.md and
# summary.csv whose numbers are the runs' metrics.jsonl; a rerun skips every finished point
# (metrics.jsonl untouched); a deleted point is the only one trained again; --slurm prints one
# sbatch command per unfinished point; a bad grid key is one line, exit 2, before any run.
#   tests/mpi/test_sweep.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$2 src=$3
test_name=test_sweep
# shellcheck source=checkpoint_test_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/checkpoint_test_lib.sh"
out=$dir/sweep
cat >"$dir/s.yaml" <<YAML
base: $src/configs/tiny-synthetic.yaml
out: $out
set:
  train.steps: 12
  train.eval_every: 6
  log.every: 3
grid:
  model.num_experts: [2, 4]
  train.seed: [1, 2]
YAML
sweep() { python3 "$src/scripts/sweep.py" --switcht5 "$bin" "$@"; }

sweep "$dir/s.yaml" >"$dir/first.log" 2>&1
check "(($? == 0))" "the sweep failed: $(tail -n 3 "$dir/first.log")"
names="num_experts-2_seed-1 num_experts-2_seed-2 num_experts-4_seed-1 num_experts-4_seed-2"
for n in $names; do
  check "[[ -f '$out/$n/point.yaml' && -f '$out/$n/config.yaml' && -f '$out/$n/sweep-done.json' ]]" "$n: run directory incomplete"
done
check "grep -q 'num_experts: 4' '$out/num_experts-4_seed-2/config.yaml' && grep -q 'seed: 2' '$out/num_experts-4_seed-2/config.yaml'" \
  "the trainer's resolved config does not have the point's values"
# The table is the runs' own numbers.
check "python3 - '$out' <<'PY'
import csv, json, os, sys
out = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(out, 'summary.csv'))))
assert len(rows) == 4, rows
for r in rows:
    lines = [json.loads(l) for l in open(os.path.join(r['run_dir'], 'metrics.jsonl'))]
    assert float(r['final_loss']) == lines[-1]['loss'], (r, lines[-1])
    assert float(r['best_val_loss']) == min(l['val_loss'] for l in lines if 'val_loss' in l), r
    assert int(r['last_step']) == 12 and r['status'] == 'done', r
    assert int(r['parameters']) > int(r['active_parameters']) > 0, r
assert rows[0]['parameters'] != rows[2]['parameters'], 'more experts, more parameters'
PY" "summary.csv does not match metrics.jsonl"
check "[[ \$(grep -c '^| [24] | [12] | done' '$out/summary.md') -eq 4 ]]" "summary.md lacks the 4 points"

# Rerun: everything skipped, nothing trained.
before=$(stat -c '%Y %s' "$out"/*/metrics.jsonl)
sweep "$dir/s.yaml" >"$dir/second.log" 2>&1
check "(($? == 0))" "the rerun failed"
check "[[ \$(grep -c 'finished earlier, skipped' '$dir/second.log') -eq 4 ]]" "the rerun did not skip 4 points"
check "[[ \"\$(stat -c '%Y %s' '$out'/*/metrics.jsonl)\" == '$before' ]]" "the rerun touched a metrics.jsonl"

# A deleted point is trained again, alone; --slurm first lists just it.
rm -rf "$out/num_experts-4_seed-1"
sweep "$dir/s.yaml" --slurm >"$dir/slurm.log" 2>&1
check "[[ \$(grep -c '^SWITCHT5_RUN_DIR=.* sbatch --job-name=num_experts-4_seed-1 .*scripts/slurm/train.sbatch .*point.yaml$' '$dir/slurm.log') -eq 1 && \$(grep -c sbatch '$dir/slurm.log') -eq 1 ]]" \
  "--slurm did not print exactly the unfinished point's sbatch command: $(cat "$dir/slurm.log")"
check "[[ ! -e '$out/num_experts-4_seed-1/metrics.jsonl' ]]" "--slurm trained something"
sweep "$dir/s.yaml" >"$dir/third.log" 2>&1
check "[[ \$(grep -c 'training' '$dir/third.log') -eq 1 && -f '$out/num_experts-4_seed-1/sweep-done.json' ]]" "the deleted point was not the one retrained"

# A typo in the grid: one line, exit 2, nothing made.
sed 's/model.num_experts/model.num_expertz/' "$dir/s.yaml" | sed "s|$out|$dir/typo|" >"$dir/typo.yaml"
sweep "$dir/typo.yaml" >"$dir/typo.log" 2>&1
status=$?
check "((status == 2))" "a bad grid key: exit $status, expected 2"
check "[[ \$(wc -l <'$dir/typo.log') -eq 1 ]] && grep -q 'sweep.py: error: point num_expertz-2_seed-1: .*num_expertz' '$dir/typo.log'" \
  "a bad grid key: not one line naming the key: $(cat "$dir/typo.log")"
check "[[ -z \"\$(ls '$dir/typo' 2>/dev/null)\" ]]" "a bad sweep made run directories"
exit $fail
