"""scripts/plot_run.py on real runs (ctest test_plot_run).

Usage: build/pyenv/bin/python tests/py/test_plot_run.py --build-dir build --source-dir .
       [unittest arguments]

Trains two short runs of configs/tiny-synthetic.yaml (two Switch layers of 4 experts): "fast"
(learning rate 0.003, stopped at step 30 and resumed to 40, so its train.log has two sessions)
and "slow" (0.001, 20 steps). Then checks:
  - plot_run.py fast slow --out DIR writes loss_vs_step, loss_vs_time, expert_load_fast,
    expert_load_slow and dropped_fraction, each a valid PNG (signature, every chunk's CRC,
    IHDR, IDAT, IEND; Pillow decodes it) of the documented size (1000 x 600 px; the layered
    ones are 100 + 250 px a layer), not blank, and the overlaid plots hold both runs' colours;
  - one run without --out writes RUN_DIR/plots/{loss_vs_step,loss_vs_time,expert_load,
    dropped_fraction}.png;
  - the wall-clock time from train.log: sessions concatenated without the time between them, a
    step logged twice keeping its later time, multi-rank lines ("[rank 0]") read too; without
    train.log, the sum of step_ms;
  - metrics.jsonl: a repeated step's later line wins, a cut-short last line is skipped with a
    warning, a malformed line elsewhere, a missing run directory and several runs without
    --out are one-line errors with exit code 2.
"""
import argparse
import datetime
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest
import zlib

from PIL import Image

ARGS = None
RUNS = None  # {"fast": dir, "slow": dir}, trained once in setUpModule
TMP = None

LOSS_SIZE = (1000, 600)
LAYERED_SIZE = (1000, 100 + 250 * 2)  # tiny-synthetic: encoder.block.1 and decoder.block.1
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two line colours


def plot_run(*args):
    return subprocess.run([sys.executable, os.path.join(ARGS.source_dir, "scripts", "plot_run.py"),
                           *args], capture_output=True, text=True)


def train(run_dir, steps, lr, resume=False):
    cmd = [os.path.join(ARGS.build_dir, "switcht5"), "train", "--config",
           os.path.join(ARGS.source_dir, "configs", "tiny-synthetic.yaml"), "--run-dir", run_dir]
    for s in (f"train.steps={steps}", "log.every=5", "train.eval_every=10", "checkpoint.every=10",
              "train.eval_batches=1", f"train.learning_rate={lr}"):
        cmd += ["--set", s]
    if resume:
        cmd += ["--resume", "auto"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stdout}{p.stderr}")


def setUpModule():
    global RUNS, TMP
    TMP = tempfile.mkdtemp(prefix="switcht5_plot_run_")
    RUNS = {"fast": os.path.join(TMP, "fast"), "slow": os.path.join(TMP, "slow")}
    train(RUNS["fast"], 30, 0.003)
    train(RUNS["fast"], 40, 0.003, resume=True)
    train(RUNS["slow"], 20, 0.001)


def tearDownModule():
    shutil.rmtree(TMP, ignore_errors=True)


def import_plot_run():
    sys.path.insert(0, os.path.join(ARGS.source_dir, "scripts"))
    try:
        import plot_run
    finally:
        sys.path.pop(0)
    return plot_run


def png_size(path):
    """(width, height) of a structurally valid PNG; AssertionError otherwise."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: no PNG signature"
    at, chunks, size = 8, [], None
    while at < len(data):
        (n,) = struct.unpack(">I", data[at:at + 4])
        kind = data[at + 4:at + 8]
        body = data[at + 8:at + 8 + n]
        (crc,) = struct.unpack(">I", data[at + 8 + n:at + 12 + n])
        assert crc == zlib.crc32(kind + body), f"{path}: bad CRC in chunk {kind!r}"
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        chunks.append(kind)
        at += 12 + n
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks, \
        f"{path}: chunks {chunks}"
    return size


class PlotRun(unittest.TestCase):
    def setUp(self):
        self.out = tempfile.mkdtemp(prefix="plots_", dir=TMP)

    def check_png(self, path, size, colours=()):
        self.assertEqual(png_size(path), size, path)
        with Image.open(path) as im:
            im.load()
            self.assertEqual(im.size, size, path)
            rgb = im.convert("RGB")
        distinct = rgb.getcolors(maxcolors=1 << 20)
        self.assertGreater(len(distinct), 50, f"{path}: {len(distinct)} colours: blank?")
        present = {c for _, c in distinct}
        for c in colours:
            self.assertIn(c, present, f"{path}: no pixel of colour {c}: a run is not drawn")

    def test_several_runs_overlaid(self):
        p = plot_run(RUNS["fast"], RUNS["slow"], "--out", self.out)
        self.assertEqual(p.returncode, 0, p.stderr)
        written = p.stdout.split()
        expected = ["loss_vs_step.png", "loss_vs_time.png", "expert_load_fast.png",
                    "expert_load_slow.png", "dropped_fraction.png"]
        self.assertEqual(written, [os.path.join(self.out, n) for n in expected])
        self.assertEqual(sorted(os.listdir(self.out)), sorted(expected))  # no leftover .tmp
        for name in ("loss_vs_step.png", "loss_vs_time.png"):
            self.check_png(os.path.join(self.out, name), LOSS_SIZE, colours=(C0, C1))
        self.check_png(os.path.join(self.out, "dropped_fraction.png"), LAYERED_SIZE,
                       colours=(C0, C1))
        for run in ("fast", "slow"):
            self.check_png(os.path.join(self.out, f"expert_load_{run}.png"), LAYERED_SIZE)

    def test_one_run_default_out(self):
        run_dir = os.path.join(TMP, "single")
        shutil.copytree(RUNS["slow"], run_dir)
        p = plot_run(run_dir)
        self.assertEqual(p.returncode, 0, p.stderr)
        plots = os.path.join(run_dir, "plots")
        self.assertEqual(sorted(os.listdir(plots)), ["dropped_fraction.png", "expert_load.png",
                                                     "loss_vs_step.png", "loss_vs_time.png"])
        self.check_png(os.path.join(plots, "expert_load.png"), LAYERED_SIZE)

    def test_wall_clock_from_train_log(self):
        pr = import_plot_run()
        log = [
            "[2026-01-01 10:00:00.000] [info] switcht5 train: run dir r, config c",
            "[2026-01-01 10:00:00.000] [info] resolved config:",
            "model:",
            "[2026-01-01 10:00:01.000] [info] step      1 | loss 7.0",
            "[2026-01-01 10:00:03.000] [info] step      2 | loss 6.0",
            "[2026-01-01 10:00:04.000] [info] checkpoint c/ckpt-00000002.h5 (stop signal)",
            # resumed an hour later from step 1's checkpoint: step 2 is redone
            "[2026-01-01 11:00:00.000] [info] [rank 0] switcht5 train: run dir r, config c",
            "[2026-01-01 11:00:01.500] [warning] [rank 0] step      2 | loss 6.1",
            "[2026-01-01 11:00:02.000] [info] [rank 0] step      3 | loss 5.0",
        ]
        self.assertEqual(pr.elapsed_from_train_log(log), {1: 1.0, 2: 4.0 + 1.5, 3: 4.0 + 2.0})

        # The real run: two sessions; every logged step has a time, increasing with the step.
        run = pr.Run(RUNS["fast"])
        self.assertEqual(run.time_source, "train.log")
        self.assertEqual(run.steps, [1, 5, 10, 15, 20, 25, 30, 35, 40])
        self.assertTrue(all(math.isfinite(t) for t in run.elapsed_s))
        self.assertEqual(list(run.elapsed_s), sorted(run.elapsed_s))
        with open(os.path.join(RUNS["fast"], "train.log")) as f:
            starts = [line for line in f if "switcht5 train: run dir" in line]
        self.assertEqual(len(starts), 2)
        # No downtime in it: at most the sum of both sessions' spans.
        stamps = []
        with open(os.path.join(RUNS["fast"], "train.log")) as f:
            for line in f:
                m = pr.LOG_LINE.match(line)
                if m:
                    stamps.append(datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f"))
        self.assertLessEqual(run.elapsed_s[-1], (stamps[-1] - stamps[0]).total_seconds() + 1e-6)

    def test_wall_clock_without_train_log_sums_step_ms(self):
        pr = import_plot_run()
        run_dir = os.path.join(TMP, "no_log")
        os.makedirs(run_dir)
        lines = [{"step": 1, "loss": 7.0, "step_ms": 100.0},
                 {"step": 5, "loss": 6.0, "step_ms": 10.0},
                 {"step": 10, "loss": 5.0, "step_ms": 20.0}]
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in lines)
        run = pr.Run(run_dir)
        self.assertEqual(run.time_source, "step_ms")
        self.assertEqual([round(t, 9) for t in run.elapsed_s], [0.1, 0.14, 0.24])
        p = plot_run(run_dir, "--out", self.out)  # a dense run: loss plots only
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("no routing statistics", p.stderr)
        self.assertEqual(sorted(os.listdir(self.out)), ["loss_vs_step.png", "loss_vs_time.png"])
        self.check_png(os.path.join(self.out, "loss_vs_time.png"), LOSS_SIZE)

    def test_metrics_lines(self):
        pr = import_plot_run()
        run_dir = os.path.join(TMP, "lines")
        shutil.copytree(RUNS["slow"], run_dir)
        path = os.path.join(run_dir, "metrics.jsonl")
        with open(path) as f:
            lines = f.read().splitlines()
        redo = json.loads(lines[1])
        redo["loss"] = 99.0
        # A repeated step (the later line wins), then a last line cut short.
        with open(path, "w") as f:
            f.write("\n".join(lines + [json.dumps(redo), lines[2][:40]]))
        p = plot_run(run_dir, "--out", self.out)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn(f"{path}:{len(lines) + 2}: the last line is not a whole metrics object",
                      p.stderr)
        self.assertEqual(pr.Run(run_dir).metrics[redo["step"]]["loss"], 99.0)

        # A malformed line that is not the last: an error naming the line.
        with open(path, "w") as f:
            f.write("\n".join([lines[0], "{not json"] + lines[1:]) + "\n")
        p = plot_run(run_dir, "--out", self.out)
        self.assertEqual(p.returncode, 2)
        self.assertEqual(len(p.stderr.splitlines()), 1, p.stderr)
        self.assertIn(f"plot_run.py: error: {path}:2: expected a JSON object", p.stderr)

    def test_user_errors(self):
        missing = os.path.join(TMP, "missing")
        p = plot_run(missing)
        self.assertEqual(p.returncode, 2)
        self.assertEqual(p.stderr, f"plot_run.py: error: {missing}: not a directory "
                                   f"(expected a switcht5 --run-dir)\n")
        p = plot_run(self.out)  # a directory without metrics.jsonl
        self.assertEqual(p.returncode, 2)
        self.assertIn(f"{self.out}/metrics.jsonl: not found", p.stderr)
        p = plot_run(RUNS["fast"], RUNS["slow"])
        self.assertEqual(p.returncode, 2)
        self.assertEqual(p.stderr, "plot_run.py: error: 2 run directories: pass --out DIR for "
                                   "the plots that overlay them\n")
        self.assertFalse(os.path.exists(os.path.join(RUNS["fast"], "plots")))


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--build-dir", required=True)
    p.add_argument("--source-dir", required=True)
    ARGS, rest = p.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
