#!/usr/bin/env bash
# scripts/slurm/train.sbatch on a real SLURM: a job that SLURM signals before its time limit
# saves, requeues itself, resumes and ends exactly where a run that was never stopped ends.
#
# When SLURM signals (measured with sleeping jobs on Debian 12's SLURM 22.05): slurmctld
# checks time limits every 30 s from its start, and at the first check where a job has at most
# warn + 30 s left it signals (--signal=USR1@warn). With --time=1 and warn = 25 that is the
# first check at least 5 s into the job. A requeued job starts again at a later check.
#  1. a one-node SLURM on localhost (local_slurm.sh: munged, slurmctld, slurmd, MpiDefault=pmix);
#  2. calibration: 1000 steps of configs/tiny-synthetic.yaml on 2 ranks (scripts/mpirun.sh);
#     from their fastest step times, S steps that take at least 25 s here;
#  3. `sbatch --time=1 --signal=USR1@25 train.sbatch` for S steps on 2 ranks (srun --mpi=pmix,
#     CPU backend), submitted 15 s after a check so that the signal comes at the next, about
#     14 s into the run; meanwhile the reference: S steps under mpirun, never stopped;
#  4. checks: the job COMPLETED, exit code 0, after at least one restart; the first run stopped
#     mid-run (0 < stop step < S) on SIGUSR1 with a checkpoint of that step; the second resumed
#     from it; every logged loss equals the reference's (same layout: bitwise) and the final
#     checkpoints hold the same tensors (inspect's checksums). A slow machine only adds
#     restarts (each run gets about 28 s before the next signal).
# Every daemon, job and process the test started is stopped on every exit path (EXIT trap; TERM
# and INT exit through it), and the test gives up after 240 s (ctest's TIMEOUT is 300). Skips
# (exit 77) with the reason when SLURM is not installed or the test is not root.
#   tests/slurm/test_slurm_requeue.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$(realpath "$2") src=$(realpath "$3")
test_name=test_slurm_requeue
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../mpi/checkpoint_test_lib.sh
source "$here/../mpi/checkpoint_test_lib.sh"
# shellcheck source=local_slurm.sh
source "$here/local_slurm.sh"

why=$(slurm_missing)
if [[ -n "$why" ]]; then
  echo "$test_name: skipped: $why"
  exit 77
fi
trap 'slurm_stop; rm -rf "$dir"' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
chmod 711 "$dir"  # munged's socket directory is inside: its parents must be traversable
deadline=$((SECONDS + 240))
give_up() { echo "$test_name: FAILED: $1"; exit 1; }

ranks=2 every=50 warn=25
common=(--set log.every=$every --set checkpoint.every=0 --set parallel.data=$ranks --set parallel.expert=2)

# 1.
slurm_start "$dir/slurm" $ranks || give_up "the local SLURM did not start"
srun --mpi=list 2>&1 | grep -qw pmix || give_up "srun --mpi=list has no pmix (Debian: slurm-wlm-basic-plugins)"

# 2. The 10th-percentile step time of 1000 steps: close to this machine's speed when nothing
#    else runs (a busy machine makes the runs longer, which costs only time).
run_train $ranks "$dir/calibrate" --set train.steps=1000 --set log.every=10 --set checkpoint.every=0 \
  --set parallel.data=$ranks --set parallel.expert=2 || give_up "calibration run failed: $(tail -n 3 "$dir/calibrate.log")"
steps=$(python3 - "$dir/calibrate/metrics.jsonl" <<'EOF'
import json, sys
ms = sorted(json.loads(line)["step_ms"] for line in open(sys.argv[1]))
print(max(2000, int(25e3 / ms[len(ms) // 10] / 100) * 100))
EOF
) || give_up "no step times in the calibration run's metrics.jsonl"

# 3.
now=$(date +%s)
at=$(( $(slurm_next_check $((now - 15))) + 15 ))  # 15 s after a check, now or later
((at > now)) && { echo "$test_name: submitting in $((at - now)) s (15 s after slurmctld's check)"; sleep $((at - now)); }
job=$(cd "$dir" && SWITCHT5=$bin SWITCHT5_RUN_DIR=$dir/slurm-run OMP_NUM_THREADS=1 \
  sbatch --parsable --job-name=requeue --nodes=1 --ntasks-per-node=$ranks --cpus-per-task=1 \
  --gpus-per-node=0 --time=1 --signal=USR1@$warn --output="$dir/job.out" \
  "$src/scripts/slurm/train.sbatch" "$config" --set train.backend=cpu --set train.steps="$steps" "${common[@]}")
[[ "$job" =~ ^[0-9]+$ ]] || give_up "sbatch did not submit the job: $job"
submitted=$(date +%s)
echo "$test_name: job $job: $steps steps, submitted; slurmctld's next check in $(( $(slurm_next_check "$submitted") - submitted )) s"
run_train $ranks "$dir/reference" --set train.steps="$steps" "${common[@]}" || give_up "reference run failed: $(tail -n 3 "$dir/reference.log")"
echo "$test_name: reference (never stopped) done $(( $(date +%s) - submitted )) s after the submission"

state=""
while ((SECONDS < deadline)); do
  state=$(scontrol show job "$job" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
  [[ $state == COMPLETED || $state == FAILED || $state == CANCELLED || $state == TIMEOUT || $state == NODE_FAIL ]] && break
  sleep 1
done
info=$(scontrol show job "$job" 2>/dev/null)
echo "$test_name: job $job: $state after $(($(date +%s) - submitted)) s; $(grep -o 'Restarts=[0-9]*' <<<"$info") $(grep -o ' ExitCode=[0-9:]*' <<<"$info")"
echo "--- job.out ---"; cat "$dir/job.out" 2>/dev/null | grep -v '\[info\].*step  *[0-9]* |' ; echo "---"
check "[[ '$state' == COMPLETED ]]" "job $job ended as '$state' (or not within the test's 240 s), expected COMPLETED"
restarts=$(sed -n 's/.*Restarts=\([0-9]*\).*/\1/p' <<<"$info")
check "((${restarts:-0} >= 1))" "job $job was never requeued (Restarts=${restarts:-?})"
check "grep -q ' ExitCode=0:0' <<<'$info'" "job $job: not exit code 0:0"

# 4. the stop, the resume and the numbers
run=$dir/slurm-run
stop=$(sed -n 's/.*received SIGUSR1 *: saving a checkpoint after step \([0-9]*\).*/\1/p' "$run/train.log" | head -n 1)
check "[[ -n '$stop' ]] && ((stop > 0 && stop < steps))" "the first run was not stopped mid-run by SIGUSR1 (stop step '${stop:-none}' of $steps)"
if [[ -n "$stop" ]]; then
  ckpt=$(printf 'ckpt-%08d.h5' "$stop")
  check "grep -q 'checkpoint .*$ckpt (stop signal)' '$run/train.log'" "no checkpoint of step $stop saved on the stop signal in train.log"
  check "grep -q 'resumed from .*$ckpt (step $stop' '$run/train.log'" "the requeued run did not resume from $ckpt"
  echo "$test_name: stopped at step $stop of $steps by SIGUSR1, requeued, resumed from $ckpt"
fi
check "grep -q 'requeueing job $job' '$dir/job.out'" "train.sbatch did not say it requeued the job"
check "grep -q 'restart 1' '$dir/job.out'" "no second start (restart 1) in job.out"
ref_losses=$(losses "$dir/reference/metrics.jsonl" "$every" "$steps" | awk -v k="$every" '$1 % k == 0')
job_losses=$(losses "$run/metrics.jsonl" "$every" "$steps" | awk -v k="$every" '$1 % k == 0')
check "[[ -n '$ref_losses' && '$ref_losses' == '$job_losses' ]]" \
  "the requeued job's losses differ from the unstopped run's: $(diff <(echo "$ref_losses") <(echo "$job_losses") | head -n 6 | tr '\n' ' ')"
final=$(printf 'ckpt-%08d.h5' "$steps")
check "same_checksums '$dir/reference/checkpoints/$final' '$run/checkpoints/$final'" \
  "the final checkpoints $final differ from the unstopped run's"
((fail == 0)) && echo "$test_name: passed: $(wc -l <<<"$job_losses") logged losses equal to the unstopped run's"
exit $fail
