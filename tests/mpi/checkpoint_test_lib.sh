# shellcheck shell=bash disable=SC2154,SC2034  # the caller sets the inputs and reads $fail
# Shared by the checkpoint shell tests (test_checkpoint_crash.sh, test_resume_layouts.sh,
# test_stop_signal.sh); sourced, not run. The caller sets, before sourcing:
#   test_name  prefix of every FAILED line;
#   mpirun_sh bin src   the test's three arguments (scripts/mpirun.sh, switcht5, source dir).
# It creates $dir (removed on exit) and $fail (the exit status: 1 once any check failed).
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail=0
config=$src/configs/tiny-synthetic.yaml
# One thread per process, as ctest runs them: OpenMP teams competing for 2 cores slow every
# parallel region (inspect's checksums among them) by an order of magnitude.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# check CONDITION MESSAGE: CONDITION is eval'ed; a false one prints MESSAGE and fails the test.
check() { if ! eval "$1"; then echo "$test_name: FAILED: $2"; fail=1; fi; }

# run_train NP RUN_DIR [train options...]: `switcht5 train` on the tiny config with one metrics
# line per step, on NP processes (1: no mpirun), output to RUN_DIR.log. Returns its status.
run_train() {
  local np=$1 run=$2
  shift 2
  local cmd=("$bin" train --config "$config" --run-dir "$run" --set log.every=1 "$@")
  if ((np == 1)); then "${cmd[@]}" >"$run.log" 2>&1; else bash "$mpirun_sh" -np "$np" "${cmd[@]}" >"$run.log" 2>&1; fi
}

# The last metrics.jsonl line of each step in FROM..TO as "STEP LOSS", LOSS exactly as written
# (a resumed run appends, so the last line of a step is the resumed run's). A step with no line
# prints "STEP missing"; a line that is not JSON prints "invalid JSON".
losses() {
  python3 - "$@" <<'EOF'
import json, re, sys
path, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
found = {}
for line in open(path):
    try:
        step = json.loads(line)["step"]
    except ValueError:
        print("invalid JSON: " + line.strip()[:80])
        continue
    found[step] = re.search(r'"loss": ([^,}]+)', line).group(1)
for s in range(first, last + 1):
    print(s, found.get(s, "missing"))
EOF
}

# The steps of metrics.jsonl's lines, in file order, on one line ("1 2 3 2 3": resumed at 1).
steps_logged() { python3 -c 'import json, sys; print(*(json.loads(l)["step"] for l in open(sys.argv[1])))' "$1"; }

# losses_close A B REL: two `losses` outputs agree step by step to REL relative difference
# (and none is missing); prints the steps that do not.
losses_close() {
  python3 - "$@" <<'EOF'
import sys
a, b, tol = sys.argv[1].split("\n"), sys.argv[2].split("\n"), float(sys.argv[3])
ok = len(a) == len(b) and len(a) > 0
for x, y in zip(a, b):
    (sa, la), (sb, lb) = x.split(" ", 1), y.split(" ", 1)
    try:
        close = sa == sb and abs(float(la) - float(lb)) <= tol * max(abs(float(la)), abs(float(lb)))
    except ValueError:
        close = False
    if not close:
        print(f"  step {sa}: {la} vs step {sb}: {lb}")
        ok = False
sys.exit(0 if ok else 1)
EOF
}

# rel_close X Y REL: two numbers agree to REL relative difference.
rel_close() { awk -v x="$1" -v y="$2" -v t="$3" 'BEGIN { d = x - y; m = (x < 0 ? -x : x); n = (y < 0 ? -y : y);
  if (n > m) m = n; exit !(x != "" && y != "" && (d < 0 ? -d : d) <= t * m) }'; }

# peak_rss OUT_FILE CMD...: runs CMD (stdout and stderr to OUT_FILE) and prints its peak resident
# set in kB (getrusage of the children: /usr/bin/time is not in a fresh Debian); returns its status.
peak_rss() {
  python3 -c '
import resource, subprocess, sys
with open(sys.argv[1], "w") as out:
    status = subprocess.run(sys.argv[2:], stdout=out, stderr=subprocess.STDOUT).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(status)' "$@"
}

# The checkpoint RUN_DIR/checkpoints/latest names (empty when there is no `latest`).
latest_of() { [[ -f "$1/checkpoints/latest" ]] && echo "$1/checkpoints/$(head -n1 "$1/checkpoints/latest")"; }

# checksums CKPT: `inspect`'s dataset lines (name, dtype, shape, checksum, ok), whitespace
# squeezed: two checkpoints hold the same tensors bit for bit iff these agree.
checksums() { "$bin" inspect "$1" 2>/dev/null | grep -E '^  (params|optimizer)/' | tr -s ' '; }

# The `step` attribute of CKPT.
ckpt_step() { "$bin" inspect "$1" 2>/dev/null | sed -n 's/^  step: \([0-9]*\)$/\1/p'; }

# same_checksums A B: the checkpoints' tensors are identical (and A has some); prints the
# first datasets that differ.
same_checksums() {
  local a b
  a=$(checksums "$1") b=$(checksums "$2")
  [[ -n "$a" && "$a" == "$b" ]] && return 0
  diff <(echo "$a") <(echo "$b") | head -n 6
  return 1
}
