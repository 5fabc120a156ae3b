#!/usr/bin/env python3
"""The Switch paper's headline comparison from finished runs: a dense model against Switch
models of equal FLOPs per token, trained with the same steps, batch, seed and schedule (Fedus
et al. 2021, Fig. 1 right and Table 1: "steps for the Switch model to reach the dense model's
quality"). configs/sweeps/headline-dense.yaml and headline-switch.yaml make such runs.

Usage: build/pyenv/bin/python scripts/headline_report.py DIR [DIR...] --out OUT
       [--target-model dense] [--target VAL_LOSS]

Each DIR is a run directory (it holds metrics.jsonl and config.yaml) or a folder searched
recursively for run directories (a sweep's output). A run's model is read from its config.yaml:
"dense" when model.num_experts is 0 or both sparse steps are 0, else "switch-E" (E experts);
its seed is train.seed. Writes into OUT and prints each path:

  headline.md            the tables below, in markdown
  val_loss_vs_step.png   val_loss against the step, one colour per model, one line style per
                         seed, the targets as thin horizontal lines             1000 x 600 px
  val_loss_vs_time.png   the same against training time: the sum of step_ms    1000 x 600 px

Tables:
  1. val_loss at the evaluations nearest each quarter of the run (steps common to all runs),
     per model and seed, and the mean over seeds when there are several.
  2. Reaching a target val_loss. The target of a seed is the --target-model's final val_loss
     with that seed (the paper's "the dense model's final quality"; the validation pieces are
     the same for every seed, their span-corruption masks follow the seed, so each seed has its
     own target), or --target for all. Per run: the first evaluated step whose val_loss <= the
     target; that step interpolated linearly between it and the evaluation before (in val_loss),
     which removes most of the eval_every granularity; the training time to that step (the sum of
     step_ms of steps 1..step: training only, evaluation and logging excluded) and the
     quiet-machine estimate (step x the run's median step_ms); and the speedups against the
     target model with the same seed: its step over this run's step (both interpolated), and
     its time over this run's time (summed step_ms, and quiet estimates).
  3. Per run: steps, median step_ms (logged steps after the first), the sum of step_ms, the
     wall-clock from train.log's first to last line (evaluation, logging and checkpoints
     included), final and best val_loss and the best's step (a best before the end means
     val_loss rose afterwards: overfitting, or noise).

step_ms: with log.every 1 every step's time is logged and the sum is exact; otherwise each logged
step_ms stands for the steps since the previous logged one (as plot_run.py does), and table 3
says "estimated". Errors (no run found, a run without val_loss or config.yaml, no target) are
one line on stderr and exit code 2.
"""
import argparse
import math
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plot_run  # noqa: E402  (Run reading, train.log clock, PNG saving, matplotlib set up)
from plot_run import UserError, plt  # noqa: E402

PROG = "headline_report.py"


class HeadlineRun:
    """A run directory with its model label, seed, evaluations and cumulative training time."""

    def __init__(self, run_dir):
        import yaml
        self.dir = run_dir
        cfg_path = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(cfg_path):
            raise UserError(f"{cfg_path}: not found (the run's resolved config, written by "
                            f"switcht5 train)")
        with open(cfg_path) as f:
            cfg = yaml.safe_load(f) or {}
        model, train = cfg.get("model", {}), cfg.get("train", {})
        experts = int(model.get("num_experts", 0))
        sparse = int(model.get("encoder_sparse_step", 0)) or int(model.get("decoder_sparse_step", 0))
        self.model = "dense" if experts == 0 or not sparse else f"switch-{experts}"
        self.experts = 0 if self.model == "dense" else experts
        self.seed = train.get("seed", 0)
        self.metrics = plot_run.read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        self.steps = sorted(self.metrics)
        self.last_step = self.steps[-1]
        self.evals = [(s, self.metrics[s]["val_loss"]) for s in self.steps
                      if self.metrics[s].get("val_loss") is not None]
        if not self.evals:
            raise UserError(f"{run_dir}: no val_loss in metrics.jsonl (train.eval_every 0, or no "
                            f"data.val_glob?)")
        # Cumulative step_ms: each logged step_ms stands for the steps since the previous one.
        self.cum_ms, t, previous = {}, 0.0, 0
        for s in self.steps:
            ms = self.metrics[s].get("step_ms")
            t += (s - previous) * (ms if ms is not None else math.nan)
            previous = s
            self.cum_ms[s] = t
        self.every_step_logged = self.steps == list(range(1, self.last_step + 1))
        logged_ms = [self.metrics[s]["step_ms"] for s in self.steps[1:]
                     if self.metrics[s].get("step_ms") is not None]
        self.median_ms = statistics.median(logged_ms) if logged_ms else math.nan
        log_path = os.path.join(run_dir, "train.log")
        self.log_wall_s = math.nan
        if os.path.isfile(log_path):
            with open(log_path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
            elapsed = plot_run.elapsed_from_train_log(lines)
            if elapsed:
                self.log_wall_s = elapsed.get(self.last_step, max(elapsed.values()))
        self.final_val = self.evals[-1][1]
        self.best_step, self.best_val = min(self.evals, key=lambda e: (e[1], e[0]))

    @property
    def label(self):
        return f"{self.model} seed {self.seed}"

    def val_at(self, step):
        return dict(self.evals).get(step)

    def reach(self, target):
        """(first evaluated step with val_loss <= target, that step interpolated) or (None, None)."""
        previous = None
        for s, v in self.evals:
            if v <= target:
                if previous is None or previous[1] <= v:
                    return s, float(s)
                s0, v0 = previous  # v0 > target >= v: linear in val_loss between the two
                return s, s0 + (s - s0) * (v0 - target) / (v0 - v)
            previous = (s, v)
        return None, None

    def train_ms_at(self, step):
        """Summed step_ms up to a (possibly fractional) step, linear between logged steps."""
        lo = max((s for s in self.steps if s <= step), default=None)
        hi = min((s for s in self.steps if s >= step), default=None)
        if lo is None or hi is None:
            return math.nan
        if lo == hi:
            return self.cum_ms[lo]
        return self.cum_ms[lo] + (self.cum_ms[hi] - self.cum_ms[lo]) * (step - lo) / (hi - lo)


def find_runs(paths):
    found = []
    for p in paths:
        if not os.path.isdir(p):
            raise UserError(f"{p}: not a directory (expected a run directory or a sweep's folder)")
        if os.path.isfile(os.path.join(p, "metrics.jsonl")):
            found.append(p)
            continue
        for root, dirs, files in os.walk(p):
            dirs.sort()
            if "metrics.jsonl" in files:
                found.append(root)
                dirs[:] = []  # a run's own subfolders (checkpoints, plots) hold no runs
    if not found:
        raise UserError(f"no run directory (one holding metrics.jsonl) under {', '.join(paths)}")
    return found


def model_order(model):
    return (0, 0) if model == "dense" else (1, int(model.split("-")[1]))


def fmt(v, spec=".4f"):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def quarter_steps(runs):
    """The evaluated steps nearest 1/4, 2/4, 3/4 and 4/4 of the shortest run, among the steps
    every run evaluated."""
    common = set.intersection(*(set(s for s, _ in r.evals) for r in runs))
    if not common:
        return []
    last = min(r.last_step for r in runs)
    out = []
    for q in (0.25, 0.5, 0.75, 1.0):
        s = min(common, key=lambda c: (abs(c - q * last), c))
        if s not in out:
            out.append(s)
    return out


def table_quarters(runs, models, seeds):
    steps = quarter_steps(runs)
    lines = ["| model | seed | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---|" + "---:|" * len(steps)]
    for m in models:
        rs = [r for r in runs if r.model == m]
        for r in rs:
            lines.append(f"| {m} | {r.seed} | " + " | ".join(fmt(r.val_at(s)) for s in steps) + " |")
        if len(rs) > 1:
            means = [statistics.mean(r.val_at(s) for r in rs) for s in steps]
            lines.append(f"| {m} | mean | " + " | ".join(f"**{fmt(v)}**" for v in means) + " |")
    return steps, lines


def reach_rows(runs, models, seeds, target_model, target_value):
    """Per run: dict of target, step, interpolated step, times and speedups."""
    rows = []
    for seed in seeds:
        by_model = {r.model: r for r in runs if r.seed == seed}
        if target_value is not None:
            target = target_value
        elif target_model in by_model:
            target = by_model[target_model].final_val
        else:
            continue  # no target for this seed
        base = by_model.get(target_model)
        base_reach = base.reach(target) if base else (None, None)
        base_ms = base.train_ms_at(base_reach[1]) if base and base_reach[1] else math.nan
        base_quiet = base_reach[1] * base.median_ms if base and base_reach[1] else math.nan
        for m in models:
            r = by_model.get(m)
            if r is None:
                continue
            step, interp = r.reach(target)
            row = {"run": r, "target": target, "step": step, "interp": interp,
                   "train_s": math.nan, "quiet_s": math.nan,
                   "step_speedup": math.nan, "time_speedup": math.nan, "quiet_speedup": math.nan}
            if interp is not None:
                row["train_s"] = r.train_ms_at(interp) / 1000.0
                row["quiet_s"] = interp * r.median_ms / 1000.0
                if base_reach[1]:
                    row["step_speedup"] = base_reach[1] / interp
                    row["time_speedup"] = base_ms / 1000.0 / row["train_s"]
                    row["quiet_speedup"] = base_quiet / 1000.0 / row["quiet_s"]
            rows.append(row)
    return rows


def table_reach(rows, models, target_model):
    lines = [f"| model | seed | target ({target_model} final) | first eval step <= target | "
             "interpolated step | train time (sum step_ms) s | quiet estimate s | "
             "step speedup | time speedup | quiet speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        r = row["run"]
        reached = row["step"] is not None
        lines.append(
            f"| {r.model} | {r.seed} | {fmt(row['target'])} | "
            f"{row['step'] if reached else f'not reached in {r.last_step}'} | "
            f"{fmt(row['interp'], '.0f')} | {fmt(row['train_s'], '.0f')} | "
            f"{fmt(row['quiet_s'], '.0f')} | {fmt(row['step_speedup'], '.2f')} | "
            f"{fmt(row['time_speedup'], '.2f')} | {fmt(row['quiet_speedup'], '.2f')} |")
    for m in models:
        rs = [row for row in rows if row["run"].model == m]
        if len(rs) > 1 and all(not math.isnan(row["step_speedup"]) for row in rs):
            lines.append(f"| {m} | mean | | | | | | "
                         f"**{fmt(statistics.mean(x['step_speedup'] for x in rs), '.2f')}** | "
                         f"**{fmt(statistics.mean(x['time_speedup'] for x in rs), '.2f')}** | "
                         f"**{fmt(statistics.mean(x['quiet_speedup'] for x in rs), '.2f')}** |")
    return lines


def table_runs(runs):
    lines = ["| model | seed | steps | median step_ms | sum step_ms s | train.log wall s | "
             "quiet estimate s | final val_loss | best val_loss | best at step | run dir |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        total = r.cum_ms[r.last_step] / 1000.0
        lines.append(
            f"| {r.model} | {r.seed} | {r.last_step} | {fmt(r.median_ms, '.1f')} | "
            f"{fmt(total, '.0f')}{'' if r.every_step_logged else ' (estimated)'} | "
            f"{fmt(r.log_wall_s, '.0f')} | {fmt(r.last_step * r.median_ms / 1000.0, '.0f')} | "
            f"{fmt(r.final_val)} | {fmt(r.best_val)} | {r.best_step} | {r.dir} |")
    return lines


def plot(runs, models, seeds, targets, out_dir, against_time):
    fig, ax = plt.subplots(figsize=(plot_run.WIDTH_IN, plot_run.LOSS_HEIGHT_IN),
                           layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    if against_time:
        top_s = max(r.cum_ms[r.last_step] for r in runs) / 1000.0
        scale, unit = plot_run.time_unit(plot_run.np.array([top_s]))
    for r in runs:
        color = colors[models.index(r.model) % len(colors)]
        style = styles[seeds.index(r.seed) % len(styles)]
        steps = [s for s, _ in r.evals]
        x = ([r.cum_ms[s] / 1000.0 / scale for s in steps] if against_time else steps)
        ax.plot(x, [v for _, v in r.evals], color=color, linestyle=style, marker="o",
                markersize=3, linewidth=1.5, label=r.label)
    for seed, target in targets.items():
        ax.axhline(target, color="grey", linewidth=0.8, alpha=0.6,
                   linestyle=styles[seeds.index(seed) % len(styles)] if seed in seeds else "-")
    ax.set_xlabel(f"training time, sum of step_ms ({unit})" if against_time else "step")
    ax.set_ylabel("validation cross-entropy (val_loss)")
    ax.set_title("val_loss against " + ("training time" if against_time else "step") +
                 " (grey: targets)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    plot_run.save(fig, out_dir, "val_loss_vs_time.png" if against_time else "val_loss_vs_step.png")


def main(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", metavar="DIR")
    ap.add_argument("--out", required=True, help="folder for headline.md and the PNGs")
    ap.add_argument("--target-model", default="dense",
                    help="the model whose final val_loss (per seed) is the target (default dense)")
    ap.add_argument("--target", type=float, help="one target val_loss for every seed instead")
    args = ap.parse_args(argv)
    try:
        runs = [HeadlineRun(d) for d in find_runs(args.dirs)]
        runs.sort(key=lambda r: (model_order(r.model), r.seed))
        models = sorted({r.model for r in runs}, key=model_order)
        seeds = sorted({r.seed for r in runs})
        if args.target is None and args.target_model not in models:
            raise UserError(f"--target-model {args.target_model}: no such run (models: "
                            f"{', '.join(models)}); give --target VAL_LOSS instead")
        os.makedirs(args.out, exist_ok=True)
        steps, quarters = table_quarters(runs, models, seeds)
        rows = reach_rows(runs, models, seeds, args.target_model, args.target)
        targets = {}
        for row in rows:
            targets[row["run"].seed] = row["target"]
        md = ["# Headline: dense vs Switch at equal FLOPs per token", "",
              f"Runs: {len(runs)} ({', '.join(models)}; seeds {', '.join(map(str, seeds))}).", "",
              "## val_loss at fixed steps", ""] + quarters + [
              "", "## Reaching the target val_loss", "",
              "Target: " + (f"{args.target} for every seed" if args.target is not None else
                            f"the final val_loss of {args.target_model} with the same seed") +
              ". Speedups are the target model's (interpolated step, or time) over the run's. "
              "Train time is the sum of step_ms (evaluation excluded); the quiet estimate is the "
              "interpolated step x the run's median step_ms.", ""] + table_reach(
              rows, models, args.target_model) + [
              "", "## Runs", ""] + table_runs(runs)
        path = os.path.join(args.out, "headline.md")
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(md) + "\n")
        os.replace(path + ".tmp", path)
        print(path)
        plot(runs, models, seeds, targets, args.out, against_time=False)
        plot(runs, models, seeds, targets, args.out, against_time=True)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
