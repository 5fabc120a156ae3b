#!/usr/bin/env bash
# scripts/slurm/train.sbatch on a real SLURM: a job that SLURM signals before its time limit
# saves, requeues itself, resumes and ends exactly where a run that was never stopped ends.
#
# When SLURM signals (measured on Debian 12's SLURM 22.05): slurmctld checks time limits every
# 30 s from its start (PERIODIC_TIMEOUT, not configurable) and sends --signal=USR1@WARN at the
# first check where the job has at most WARN + 30 s left: with --time=1 and WARN = 25, the first
# check at least 5 s into the run. A requeued job starts again about 6 s after the requeue
# (local_slurm.sh: cred_expire=5, sched_interval=2), so a restart runs about 24 s before its own
# signal.
#  1. a one-node SLURM on localhost (local_slurm.sh: munged, slurmctld, slurmd, MpiDefault=pmix);
#  2. calibration: 60 steps of configs/tiny-synthetic.yaml at batch 256 on 2 ranks
#     (scripts/mpirun.sh); S steps take about 24 s at that speed;
#  3. the reference: S steps under mpirun, never stopped, with one metrics line per step;
#  4. `sbatch --time=1 --signal=USR1@25 scripts/slurm/train.sbatch` (the template itself, CPU
#     backend, 2 ranks through srun --mpi=pmix) for the same S steps, submitted 15 s after a
#     check: the signal comes at the next one, about 14 s (some 12 s of steps) into the run;
#  5. checks: the job COMPLETED with exit code 0 after at least one restart; job.out shows
#     start 0, exit 138 and the requeue, start 1 (SLURM_RESTART_COUNT), ..., exit 0 last; every
#     stop was SIGUSR1 mid-run with a checkpoint of that step, and the next start resumed from
#     it; the loss of every step equals the reference's (same layout: bitwise) and the final
#     checkpoints hold the same tensors (inspect's checksums).
# The job runs alone on the cores: a machine up to about 2x faster during the job than during the
# calibration is still stopped mid-run, and a slower one only adds restarts (30 s each).
# Every daemon, job and process the test started is stopped on every exit path (EXIT trap; TERM
# and INT exit through it), and it gives up after 220 s (ctest's TIMEOUT is 300) with the ends of
# the daemons' logs. Skips (exit 77), saying why, where SLURM is not installed, the test is not
# root (slurmd starts the job's processes), or srun has no pmix plugin.
#   tests/slurm/test_slurm_requeue.sh MPIRUN_SH SWITCHT5_BINARY SOURCE_DIR
set -uo pipefail
mpirun_sh=$1 bin=$(realpath "$2") src=$(realpath "$3")
test_name=test_slurm_requeue
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../mpi/checkpoint_test_lib.sh
source "$here/../mpi/checkpoint_test_lib.sh"  # $dir, $config, check, losses, same_checksums
# shellcheck source=local_slurm.sh
source "$here/local_slurm.sh"

why=$(slurm_missing)
if [[ -n "$why" ]]; then
  echo "$test_name: skipped: $why"
  exit 77
fi
# A surrounding SLURM job's variables (a developer inside salloc) must not reach our sbatch/srun.
unset "${!SLURM_@}" "${!SBATCH_@}" "${!SRUN_@}"
trap 'slurm_stop; rm -rf "$dir"' EXIT
chmod 711 "$dir"  # munged's socket is inside: every directory above it must be traversable
trap 'exit 143' TERM
trap 'exit 130' INT
deadline=$((SECONDS + 220))
job=""
give_up() {
  echo "$test_name: FAILED: $1"
  [[ -n "$job" ]] && { scontrol show job "$job" 2>&1 | head -n 30; echo "--- job.out ---"; tail -n 30 "$dir/job.out" 2>&1; }
  slurm_log_tails
  exit 1
}

ranks=2 warn=25
common=(--set train.batch_size=256 --set log.every=1 --set checkpoint.every=0
        --set parallel.data="$ranks" --set parallel.expert=2)
# mpi_train RUN_DIR [options]: the tiny config on 2 ranks under mpirun, output in RUN_DIR.log,
# ended at the test's deadline.
mpi_train() {
  local run=$1
  shift
  timeout $((deadline - SECONDS)) bash "$mpirun_sh" -np $ranks "$bin" train --config "$config" \
    --run-dir "$run" "${common[@]}" "$@" >"$run.log" 2>&1
}

# 1.
slurm_start "$dir/slurm" $ranks || give_up "the local SLURM did not start"
if ! srun --mpi=list 2>&1 | grep -qw pmix; then
  echo "$test_name: skipped: srun --mpi=list has no pmix (Debian: slurm-wlm-basic-plugins, libpmix-dev)"
  exit 77
fi

# 2. The mean step time, first steps (warm-up) left out.
mpi_train "$dir/calibrate" --set train.steps=60 ||
  give_up "the calibration run failed: $(tail -n 3 "$dir/calibrate.log")"
steps=$(python3 - "$dir/calibrate/metrics.jsonl" <<'EOF'
import json, sys
ms = [json.loads(line)["step_ms"] for line in open(sys.argv[1])][10:]
print(max(100, round(24e3 / (sum(ms) / len(ms)))))
EOF
) || give_up "no step times in the calibration run's metrics.jsonl"

# 3.
t0=$SECONDS
mpi_train "$dir/reference" --set train.steps="$steps" ||
  give_up "the reference run failed: $(tail -n 3 "$dir/reference.log")"
echo "$test_name: $steps steps; the unstopped reference took $((SECONDS - t0)) s"

# 4.
now=$(date +%s)
at=$(( $(slurm_next_check $((now - 15))) + 15 ))  # 15 s after a check, now or later
((at > now)) && { echo "$test_name: submitting in $((at - now)) s (15 s after slurmctld's check)"; sleep $((at - now)); }
job=$(cd "$dir" && SWITCHT5=$bin SWITCHT5_RUN_DIR=$dir/slurm-run OMP_NUM_THREADS=1 \
  sbatch --parsable --job-name=requeue --nodes=1 --ntasks-per-node=$ranks --cpus-per-task=1 \
  --gpus-per-node=0 --time=1 --signal=USR1@$warn --output="$dir/job.out" \
  "$src/scripts/slurm/train.sbatch" "$config" --set train.backend=cpu --set train.steps="$steps" "${common[@]}" 2>&1)
[[ "$job" =~ ^[0-9]+$ ]] || { job=""; give_up "sbatch did not submit the job: $job"; }
t0=$SECONDS
state=""
while ((SECONDS < deadline)); do
  state=$(scontrol show job "$job" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
  [[ $state =~ ^(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED)$ ]] && break
  sleep 1
done
info=$(scontrol show job "$job" 2>/dev/null)
restarts=$(sed -n 's/.*Restarts=\([0-9]*\).*/\1/p' <<<"$info")
exit_code=$(sed -n 's/.* ExitCode=\([0-9:]*\).*/\1/p' <<<"$info")
echo "$test_name: job $job: $state after $((SECONDS - t0)) s, Restarts=$restarts ExitCode=$exit_code"
[[ $state == COMPLETED ]] || give_up "job $job is '$state' $((SECONDS - t0)) s after its submission, expected COMPLETED within the test's 220 s"
echo "--- job.out: the job script's, SLURM's and the trainer's stop and resume lines ---"
grep -E '^train.sbatch|^srun|slurmstepd|received SIG|resumed from|stopped at|done:' "$dir/job.out"
echo "---"

# 5. What SLURM says, what the job script said, what the trainer said, and the numbers.
check "((${restarts:-0} >= 1))" "job $job was never requeued (Restarts=${restarts:-?})"
check "[[ '$exit_code' == 0:0 ]]" "job $job ended with ExitCode=$exit_code, expected 0:0"
# train.sbatch's own lines: every start but the last ends in 138 and a requeue, the last in 0.
check "python3 - '$dir/job.out' '$job' <<'EOF'
import re, sys
lines = [l.strip() for l in open(sys.argv[1]) if l.startswith('train.sbatch: ')]
starts, ends = [], []
for l in lines:
    m = re.match(r'train.sbatch: job (\d+) \(restart (\d+)\)', l)
    if m:
        assert m.group(1) == sys.argv[2], l
        starts.append(int(m.group(2)))
    m = re.match(r'train.sbatch: switcht5 exited with status (\d+)', l)
    if m:
        ends.append((int(m.group(1)), 'requeueing job ' + sys.argv[2] in l))
assert len(starts) >= 2 and starts == list(range(len(starts))), f'starts {starts}'
assert ends[:-1] == [(138, True)] * (len(starts) - 1) and ends[-1] == (0, False), f'exits {ends}'
EOF" "job.out does not show restart 0 .. n, each ending in exit 138 and a requeue, then exit 0 last"
run=$dir/slurm-run
stops=$(sed -n 's/.*received SIGUSR1 *: saving a checkpoint after step \([0-9]*\).*/\1/p' "$run/train.log" | tr '\n' ' ')
resumes=$(sed -n 's/.*resumed from .*ckpt-0*\([0-9]*\)\.h5 (step \([0-9]*\),.*/\2/p' "$run/train.log" | tr '\n' ' ')
first=${stops%% *}
check "[[ -n '$first' ]] && ((first > 0 && first < steps))" "the first run was not stopped mid-run by SIGUSR1 (stop step '${first:-none}' of $steps)"
check "[[ '$stops' == '$resumes' ]]" "the runs stopped after steps '$stops' but resumed from '$resumes'"
for s in $stops; do
  check "grep -q 'checkpoint .*$(printf 'ckpt-%08d.h5' "$s") (stop signal)' '$run/train.log'" "no checkpoint of step $s saved on the stop signal"
done
echo "$test_name: stopped by SIGUSR1 after steps: $stops(of $steps); each requeued start resumed there"
ref_losses=$(losses "$dir/reference/metrics.jsonl" 1 "$steps")
job_losses=$(losses "$run/metrics.jsonl" 1 "$steps")
check "[[ '$ref_losses' != *missing* && '$ref_losses' == '$job_losses' ]]" \
  "the requeued job's losses differ from the unstopped run's: $(diff <(echo "$ref_losses") <(echo "$job_losses") | head -n 6 | tr '\n' ' ')"
final=$(printf 'ckpt-%08d.h5' "$steps")
check "same_checksums '$dir/reference/checkpoints/$final' '$run/checkpoints/$final'" \
  "the final checkpoints $final differ from the unstopped run's"
((fail == 0)) && echo "$test_name: passed: the loss of each of the $steps steps equals the unstopped run's, bit for bit"
exit $fail
