#!/usr/bin/env python3
"""Config-driven sweeps for scaling experiments: one run directory per grid point, run one
after another (or sbatch commands with --slurm), finished points skipped, and a summary table.

    scripts/sweep.py SWEEP.yaml [--slurm] [--dry-run] [--switcht5 BIN]

SWEEP.yaml:
    base: configs/tiny-synthetic.yaml        # the config every point starts from
    out: runs/experts-sweep                  # the sweep's directory (default: runs/<file stem>)
    set:                                     # overrides every point shares (optional)
      train.steps: 300
    grid:                                    # the points: every combination, in this key order
      model.num_experts: [8, 32, 128]
      train.seed: [1, 2]
    np: 1                                    # processes per run (scripts/mpirun.sh), default 1

Each point gets OUT/<name> (name from the grid values, e.g. num_experts-8_seed-1) holding
point.yaml: the base config with the shared and the point's overrides applied, validated and
resolved by `switcht5 plan` (every key), which is what the run trains. A point is finished when
its run exited 0 and wrote OUT/<name>/sweep-done.json; a rerun of the sweep skips finished points
and continues unfinished ones from their latest checkpoint (--resume auto). The summary
(OUT/summary.md and OUT/summary.csv, rewritten after every point) has per point: the grid values,
the final training loss, the best val_loss, the median tokens/s of the logged steps after the
first, the parameters (total and active per token) from `switcht5 plan --json`, and the status.

--slurm prints one sbatch command per unfinished point (scripts/slurm/train.sbatch, the run
directory passed as SWITCHT5_RUN_DIR) instead of running anything; run the sweep again after
the jobs end to write the summary. A bad sweep file is one line on stderr and exit 2; a failed
run is recorded (status "failed (exit N)") and the sweep goes on; the exit status is 1 then.
"""
import argparse
import csv
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

PROG = "sweep.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UserError(Exception):
    pass


def load_sweep(path):
    try:
        import yaml
    except ImportError:
        raise UserError("PyYAML is missing (Debian: apt-get install python3-yaml)") from None
    try:
        with open(path) as f:
            spec = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a map with base, grid and optionally out, set, np")
    unknown = set(spec) - {"base", "out", "set", "grid", "np"}
    if unknown:
        raise UserError(f"{path}: unknown key {sorted(unknown)[0]!r} (expected base, out, set, grid, np)")
    if not isinstance(spec.get("base"), str):
        raise UserError(f"{path}: base: expected the path of a config file")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"{path}: grid: expected a map of section.key: [values, ...]")
    for key, values in grid.items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise UserError(f"{path}: grid: {key!r}: expected section.key")
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid: {key}: expected a non-empty list of values")
    shared = spec.get("set") or {}
    if not isinstance(shared, dict):
        raise UserError(f"{path}: set: expected a map of section.key: value")
    np_ = spec.get("np", 1)
    if not isinstance(np_, int) or np_ < 1:
        raise UserError(f"{path}: np: expected a whole number >= 1, got {np_!r}")
    base = spec["base"]
    if not os.path.isabs(base) and not os.path.exists(base):
        base = os.path.join(ROOT, base)
    out = spec.get("out") or os.path.join("runs", os.path.splitext(os.path.basename(path))[0])
    return {"base": base, "out": out, "set": shared, "grid": grid, "np": np_}


def scalar(v):
    """A value as `--set` takes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def points(grid):
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        yield dict(zip(keys, values))


def point_name(point):
    parts = []
    for key, value in point.items():
        short = key.split(".", 1)[1]
        parts.append(f"{short}-{re.sub(r'[^A-Za-z0-9.+-]', '_', scalar(value))}")
    return "_".join(parts)


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def plan(switcht5, config, sets):
    """(resolved YAML, plan JSON) of `config` with `sets`; UserError with switcht5's message."""
    args = [switcht5, "plan", "--config", config]
    for k, v in sets.items():
        args += ["--set", f"{k}={scalar(v)}"]
    p = run(args + ["--json"])
    if p.returncode != 0:
        raise UserError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"plan exited {p.returncode}")
    return json.loads(p.stdout)


def resolved_yaml(config, sets):
    """The base config with `sets` applied, as YAML (validated afterwards by plan)."""
    import yaml
    with open(config) as f:
        doc = yaml.safe_load(f) or {}
    for key, value in sets.items():
        section, name = key.split(".", 1)
        if not isinstance(doc.get(section), dict):
            doc[section] = {}
        doc[section][name] = value
    return yaml.safe_dump(doc, sort_keys=False)


def summarize(run_dir):
    """final loss, best val_loss, median tokens/s (logged steps after the first) of a run."""
    path = os.path.join(run_dir, "metrics.jsonl")
    by_step = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    m = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                by_step[m["step"]] = m  # a resumed run's later line wins
    steps = sorted(by_step)
    vals = [by_step[s]["val_loss"] for s in steps if by_step[s].get("val_loss") is not None]
    tps = [by_step[s]["tokens_per_s"] for s in steps[1:] if by_step[s].get("tokens_per_s")]
    return {
        "last_step": steps[-1] if steps else None,
        "final_loss": by_step[steps[-1]]["loss"] if steps else None,
        "best_val_loss": min(vals) if vals else None,
        "tokens_per_s": statistics.median(tps) if tps else None,
    }


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def write_summary(out, keys, rows):
    header = keys + ["status", "last_step", "final_loss", "best_val_loss", "tokens_per_s",
                     "parameters", "active_parameters", "run_dir"]
    with open(os.path.join(out, "summary.csv.tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([scalar(r["point"][k]) for k in keys] +
                       [r["status"], r.get("last_step") or "", r.get("final_loss") or "",
                        r.get("best_val_loss") or "", r.get("tokens_per_s") or "",
                        r["parameters"], r["active_parameters"], r["run_dir"]])
    os.replace(os.path.join(out, "summary.csv.tmp"), os.path.join(out, "summary.csv"))
    lines = ["| " + " | ".join(header[:-1]) + " |", "|" + " --- |" * (len(header) - 1)]
    for r in rows:
        lines.append("| " + " | ".join(
            [scalar(r["point"][k]) for k in keys] +
            [r["status"], str(r.get("last_step") or ""), fmt(r.get("final_loss"), ".4f"),
             fmt(r.get("best_val_loss"), ".4f"), fmt(r.get("tokens_per_s"), ".0f"),
             str(r["parameters"]), str(r["active_parameters"])]) + " |")
    with open(os.path.join(out, "summary.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out, "summary.md.tmp"), os.path.join(out, "summary.md"))


def main(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", metavar="SWEEP.yaml")
    ap.add_argument("--slurm", action="store_true", help="print sbatch commands, run nothing")
    ap.add_argument("--dry-run", action="store_true", help="make the run directories and print "
                    "the commands, run nothing")
    ap.add_argument("--switcht5", default=os.environ.get("SWITCHT5", os.path.join(ROOT, "build", "switcht5")))
    args = ap.parse_args(argv)
    try:
        spec = load_sweep(args.sweep)
        if not os.access(args.switcht5, os.X_OK):
            raise UserError(f"--switcht5 {args.switcht5}: not an executable file (build first, or set SWITCHT5)")
        keys = list(spec["grid"])
        out = spec["out"]
        os.makedirs(out, exist_ok=True)
        # Every point validated before anything runs: a typo in the grid fails at once.
        todo = []
        for point in points(spec["grid"]):
            sets = dict(spec["set"])
            sets.update(point)
            name = point_name(point)
            try:
                p = plan(args.switcht5, spec["base"], sets)
            except UserError as e:
                raise UserError(f"point {name}: {e}") from None
            todo.append((point, name, sets, p))
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    rows, failed = [], False
    for point, name, sets, p in todo:
        run_dir = os.path.join(out, name)
        os.makedirs(run_dir, exist_ok=True)
        config = os.path.join(run_dir, "point.yaml")
        text = resolved_yaml(spec["base"], sets)
        with open(config + ".tmp", "w") as f:
            f.write(f"# sweep {args.sweep}, point {name}: {spec['base']} with "
                    + ", ".join(f"{k}={scalar(v)}" for k, v in sets.items()) + "\n" + text)
        os.replace(config + ".tmp", config)
        row = {"point": point, "run_dir": run_dir, "parameters": p["parameters"],
               "active_parameters": p["active_parameters"]}
        done = os.path.join(run_dir, "sweep-done.json")
        np_sets = [] if spec["np"] == 1 else ["--set", f"parallel.data={spec['np']}"]
        if os.path.exists(done):
            row.update(summarize(run_dir), status="done (skipped)")
            print(f"{PROG}: {name}: finished earlier, skipped")
        elif args.slurm:
            print(f"SWITCHT5_RUN_DIR={shlex.quote(run_dir)} sbatch --job-name={shlex.quote(name)} "
                  f"--ntasks={spec['np']} scripts/slurm/train.sbatch {shlex.quote(config)}")
            row.update(summarize(run_dir), status="submitted?")
        else:
            cmd = [args.switcht5, "train", "--config", config, "--run-dir", run_dir,
                   "--resume", "auto"] + np_sets
            if spec["np"] > 1:
                cmd = ["bash", os.path.join(ROOT, "scripts", "mpirun.sh"), "-np", str(spec["np"])] + cmd
            if args.dry_run:
                print(" ".join(shlex.quote(c) for c in cmd))
                row.update(summarize(run_dir), status="not run (dry run)")
            else:
                print(f"{PROG}: {name}: training ({run_dir})", flush=True)
                with open(os.path.join(run_dir, "sweep-train.out"), "a") as log:
                    status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
                summary = summarize(run_dir)
                if status == 0:
                    with open(done + ".tmp", "w") as f:
                        json.dump(summary, f)
                    os.replace(done + ".tmp", done)
                    row.update(summary, status="done")
                else:
                    failed = True
                    row.update(summary, status=f"failed (exit {status})")
                    print(f"{PROG}: {name}: training exited {status}; see {run_dir}/sweep-train.out",
                          file=sys.stderr)
        rows.append(row)
        write_summary(out, keys, rows)
    if not args.slurm and not args.dry_run:
        print(f"{PROG}: summary in {os.path.join(out, 'summary.md')} and summary.csv")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
