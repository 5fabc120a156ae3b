#!/usr/bin/env python3
"""Plots of switcht5 training runs, as PNG files, from each run directory's metrics.jsonl and
train.log.

Usage: build/pyenv/bin/python scripts/plot_run.py RUN_DIR [RUN_DIR...] [--out DIR]

Writes into --out (default RUN_DIR/plots for one run; required for several):
  loss_vs_step.png        loss (line) and val_loss (dots, dashed) against the step, runs
                          overlaid and labelled by their directory's name      1000 x 600 px
  loss_vs_time.png        the same against wall-clock training time            1000 x 600 px
  expert_load.png         per Switch layer, the fraction of tokens whose top-1 choice is each
                          expert, over the steps (a heatmap; 1/num_experts is balanced);
                          expert_load_<label>.png per run when there are several
                                                              1000 x (100 + 250 x layers) px
  dropped_fraction.png    per Switch layer, the fraction of tokens past expert capacity,
                          runs overlaid                       1000 x (100 + 250 x layers) px
It prints each file it writes and replaces files of these names (it made them; they are
derived from the run and made again by running it again). A run without routing statistics
(a dense model) has no expert_load and is left out of dropped_fraction.

metrics.jsonl: one JSON object per logged step (src/train/metrics.cpp, metrics_json); a step
logged twice (a resume from a checkpoint older than the last logged step redoes steps) counts
once, its later line winning. null (a non-finite value) is a gap in the line. A last line cut
short (a crash or a full disk while writing it) is skipped with a warning; any other line that
is not a JSON object is an error.

Wall-clock time: metrics.jsonl has no time of day, so the time of each step is read from
train.log, whose lines carry one ("[2026-12-01 11:14:10.631] [info] step      6 | ..."): a
step's time is the time since its session's first line, plus the length of the earlier
sessions (each from its first line to its last), so the time between a stop and the resume is
left out, while the time spent redoing steps after a resume counts. It includes evaluation,
checkpoint saves and start-up after the first line. Without a train.log (or without step lines
in it) the time is estimated as the sum of step_ms, each logged step_ms standing for the steps
since the previous logged one; such a run is marked "(time from step_ms)" in the legend.

Errors (a missing run directory or metrics.jsonl, a malformed line, no logged step, several
runs without --out) are one line on stderr and exit code 2.
"""
import argparse
import datetime
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

DPI = 100
WIDTH_IN = 10.0
LOSS_HEIGHT_IN = 6.0


def layered_height_in(layers):
    """Height of a figure with one row per Switch layer: 100 + 250 px a layer at DPI 100."""
    return 1.0 + 2.5 * layers


class UserError(Exception):
    pass


class Run:
    """One run directory: its logged steps (later line wins), in step order."""

    def __init__(self, run_dir):
        self.dir = run_dir
        self.label = os.path.basename(os.path.normpath(run_dir))
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if not os.path.isdir(run_dir):
            raise UserError(f"{run_dir}: not a directory (expected a switcht5 --run-dir)")
        if not os.path.isfile(metrics_path):
            raise UserError(f"{metrics_path}: not found (expected the run's metrics.jsonl)")
        self.metrics = read_metrics(metrics_path)
        self.steps = sorted(self.metrics)
        self.elapsed_s, self.time_source = wall_clock(run_dir, self.metrics)

    def series(self, field):
        """The field over self.steps, NaN where it is null or absent."""
        return np.array([nan_if_none(self.metrics[s].get(field)) for s in self.steps], dtype=float)

    def layers(self):
        """Switch layer names in the order the run reports them ([] for a dense model)."""
        names = []
        for s in self.steps:
            for r in self.metrics[s].get("router", []):
                if r["layer"] not in names:
                    names.append(r["layer"])
        return names

    def layer_series(self, layer, field):
        out = []
        for s in self.steps:
            r = next((r for r in self.metrics[s].get("router", []) if r["layer"] == layer), None)
            out.append(nan_if_none(r.get(field)) if r else math.nan)
        return np.array(out, dtype=float)

    def expert_load(self, layer):
        """[num_experts, len(self.steps)] fractions, NaN where a step lacks them."""
        rows = []
        for s in self.steps:
            r = next((r for r in self.metrics[s].get("router", []) if r["layer"] == layer), None)
            rows.append([nan_if_none(v) for v in r["expert_fraction"]] if r else None)
        experts = max(len(r) for r in rows if r is not None)
        load = np.full((experts, len(rows)), math.nan)
        for i, r in enumerate(rows):
            if r is not None:
                load[:len(r), i] = r
        return load


def nan_if_none(v):
    return math.nan if v is None else float(v)


def read_metrics(path):
    """{step: metrics object}, the later line of a repeated step winning."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline after the last line
    by_step = {}
    for i, line in enumerate(lines, start=1):
        try:
            m = json.loads(line)
            if not isinstance(m, dict) or not isinstance(m.get("step"), int):
                raise ValueError("no integer \"step\"")
        except ValueError as e:
            if i == len(lines):
                print(f"plot_run.py: warning: {path}:{i}: the last line is not a whole metrics "
                      f"object (cut short by a crash?); left out", file=sys.stderr)
                continue
            raise UserError(f"{path}:{i}: expected a JSON object with an integer \"step\" "
                            f"({e})") from None
        by_step[m["step"]] = m
    if not by_step:
        raise UserError(f"{path}: no logged step")
    return by_step


LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\] \[[a-z]+\] "
                      r"(?:\[rank \d+\] )?(.*)$")
SESSION_START = "switcht5 train: run dir "
STEP_LINE = re.compile(r"^step\s+(\d+) \|")


def elapsed_from_train_log(lines):
    """{step: seconds of training time} from train.log's lines (see the module's docstring):
    each session's first line is its "switcht5 train: run dir" line; a step logged twice keeps
    its later time."""
    elapsed = {}
    earlier_sessions_s = 0.0
    start = last = None
    for line in lines:
        m = LOG_LINE.match(line)
        if not m:
            continue  # the resolved config's lines, a message's continuation lines
        t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
        message = m.group(2)
        if message.startswith(SESSION_START):
            if start is not None:
                earlier_sessions_s += (last - start).total_seconds()
            start = t
        if start is None:
            continue
        last = t
        step = STEP_LINE.match(message)
        if step:
            elapsed[int(step.group(1))] = earlier_sessions_s + (t - start).total_seconds()
    return elapsed


def wall_clock(run_dir, metrics):
    """(seconds at each logged step in step order, "train.log" or "step_ms")."""
    steps = sorted(metrics)
    log_path = os.path.join(run_dir, "train.log")
    from_log = {}
    if os.path.isfile(log_path):
        with open(log_path, encoding="utf-8", errors="replace") as f:
            from_log = elapsed_from_train_log(f.read().splitlines())
    if from_log:
        missing = [s for s in steps if s not in from_log]
        if missing:
            print(f"plot_run.py: warning: {log_path}: no line for step(s) "
                  f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}; "
                  f"left out of the time plot", file=sys.stderr)
        return np.array([from_log.get(s, math.nan) for s in steps]), "train.log"
    t, previous, out = 0.0, 0, []
    for s in steps:
        ms = metrics[s].get("step_ms")
        t += (s - previous) * (ms if ms is not None else math.nan) / 1000.0
        previous = s
        out.append(t)
    return np.array(out), "step_ms"


def time_unit(seconds):
    top = np.nanmax(seconds) if np.isfinite(seconds).any() else 0.0
    if top < 120:
        return 1.0, "s"
    if top < 2 * 3600:
        return 60.0, "min"
    return 3600.0, "h"


def save(fig, out_dir, name):
    """Writes the figure at its own size (no tight bounding box, so sizes are as documented),
    through a temporary file: an interrupted run leaves no half-written PNG under `name`."""
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    print(path)


def plot_loss(runs, out_dir, against_time):
    fig, ax = plt.subplots(figsize=(WIDTH_IN, LOSS_HEIGHT_IN), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if against_time:
        scale, unit = time_unit(np.concatenate([r.elapsed_s for r in runs]))
    for i, r in enumerate(runs):
        color = colors[i % len(colors)]
        label = r.label
        if against_time and r.time_source == "step_ms":
            label += " (time from step_ms)"
        x = r.elapsed_s / scale if against_time else np.array(r.steps, dtype=float)
        ax.plot(x, r.series("loss"), color=color, linewidth=1.5, label=f"{label}: loss")
        val = r.series("val_loss")
        has_val = np.isfinite(val)
        if has_val.any():
            ax.plot(x[has_val], val[has_val], color=color, linestyle="--", marker="o",
                    markersize=4, label=f"{label}: val_loss")
    ax.set_xlabel(f"wall-clock training time ({unit})" if against_time else "step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("loss against " + ("wall-clock time" if against_time else "step"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    save(fig, out_dir, "loss_vs_time.png" if against_time else "loss_vs_step.png")


def plot_expert_load(run, out_dir, name):
    layers = run.layers()
    fig, axes = plt.subplots(len(layers), 1, figsize=(WIDTH_IN, layered_height_in(len(layers))),
                             layout="constrained", squeeze=False)
    loads = [run.expert_load(layer) for layer in layers]
    top = max(np.nanmax(load) if np.isfinite(load).any() else 0.0 for load in loads)
    steps = np.array(run.steps, dtype=float)
    for ax, layer, load in zip(axes[:, 0], layers, loads):
        experts = load.shape[0]
        # shading="nearest": each logged step is a column centred on it, however uneven the
        # logging interval (step 1, every log.every steps, evaluation steps).
        mesh = ax.pcolormesh(steps, np.arange(experts), np.ma.masked_invalid(load),
                             shading="nearest", cmap="viridis", vmin=0.0, vmax=max(top, 1e-9))
        ax.set_title(f"{layer}: fraction of tokens whose top-1 is each expert "
                     f"(balanced: 1/{experts} = {1.0 / experts:.3g})", fontsize="medium")
        ax.set_ylabel("expert")
        if experts <= 16:
            ax.set_yticks(np.arange(experts))
    axes[-1, 0].set_xlabel("step")
    fig.colorbar(mesh, ax=axes[:, 0].tolist(), label="fraction of tokens")
    fig.suptitle(f"expert load: {run.label}")
    save(fig, out_dir, name)


def plot_dropped(runs, out_dir):
    layers = []
    for r in runs:
        layers += [layer for layer in r.layers() if layer not in layers]
    fig, axes = plt.subplots(len(layers), 1, figsize=(WIDTH_IN, layered_height_in(len(layers))),
                             layout="constrained", squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, layer in zip(axes[:, 0], layers):
        for i, r in enumerate(runs):
            if layer in r.layers():
                ax.plot(r.steps, r.layer_series(layer, "dropped_fraction"),
                        color=colors[i % len(colors)], label=r.label)
        ax.set_title(f"{layer}: fraction of tokens past expert capacity", fontsize="medium")
        ax.set_ylabel("dropped")
        ax.set_ylim(bottom=0.0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("step")
    save(fig, out_dir, "dropped_fraction.png")


def file_label(label):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="PNG plots of switcht5 runs: loss against step and wall-clock time, expert "
                    "load per Switch layer, dropped fraction per layer.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a switcht5 --run-dir")
    p.add_argument("--out", help="directory for the PNGs (default RUN_DIR/plots for one run; "
                                 "required for several); files of the same names are replaced")
    args = p.parse_args(argv)
    try:
        if len(args.run_dirs) > 1 and not args.out:
            raise UserError(f"{len(args.run_dirs)} run directories: pass --out DIR for the "
                            f"plots that overlay them")
        runs = [Run(d) for d in args.run_dirs]
        labels = [r.label for r in runs]
        for r in runs:  # two runs of the same name: their paths tell them apart
            if labels.count(r.label) > 1:
                r.label = os.path.normpath(r.dir)
        out_dir = args.out or os.path.join(args.run_dirs[0], "plots")
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {out_dir}: cannot create the directory: {e.strerror}")
        plot_loss(runs, out_dir, against_time=False)
        plot_loss(runs, out_dir, against_time=True)
        routed = [r for r in runs if r.layers()]
        for r in runs:
            if not r.layers():
                print(f"plot_run.py: {r.dir}: no routing statistics (a dense model): no expert "
                      f"load plot", file=sys.stderr)
        names = set()
        for r in routed:
            name = "expert_load.png" if len(runs) == 1 else f"expert_load_{file_label(r.label)}.png"
            while name in names:
                name = name[:-len(".png")] + "_.png"
            names.add(name)
            plot_expert_load(r, out_dir, name)
        if routed:
            plot_dropped(routed, out_dir)
    except UserError as e:
        print(f"plot_run.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"plot_run.py: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
