"""scripts/headline_report.py on synthetic run directories (ctest test_headline_report).

Usage: build/pyenv/bin/python tests/py/test_headline_report.py --build-dir build --source-dir .
       [unittest arguments]

No training: each run directory is a config.yaml and a metrics.jsonl written here, with
val_loss every 10 steps of 40 and hand-computed answers:

  run            seed  val_loss at 10/20/30/40   step_ms            logged
  dense          1     5.0 4.0 3.5 3.0           100                every step
  dense          2     5.0 4.0 3.2 3.1           100                every step
  switch-8       1     4.5 3.5 2.5 2.8           200                every step
  switch-8       2     4.0 3.0 2.9 2.9           200                every step
  switch-32      1     5.0 4.5 4.2 4.1           300                every 5 steps

Targets: dense's final val_loss per seed, 3.0 and 3.1. Dense reaches them at step 40 (the
interpolation between 30 and 40 lands on 40). switch-8 seed 1 first reaches 3.0 at step 30,
interpolated 20 + 10 x (3.5 - 3.0) / (3.5 - 2.5) = 25: step speedup 40 / 25 = 1.60, time
4.0 s / (25 x 0.2 s) = 0.80. Seed 2: first at 20, interpolated 10 + 10 x 0.9 / 1.0 = 19: 40 / 19 =
2.11, time 4.0 / 3.8 = 1.05; means 1.85 and 0.93. switch-32 never reaches 3.0; its step_ms sum is
estimated (40 x 0.3 s = 12 s). switch-8 seed 1's best val_loss is at step 30 (it rose after).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import unittest

from PIL import Image

ARGS = None

RUNS = [  # (dir, experts, seed, val_loss at 10/20/30/40, step_ms, log every)
    ("dense/seed-1", 0, 1, [5.0, 4.0, 3.5, 3.0], 100.0, 1),
    ("dense/seed-2", 0, 2, [5.0, 4.0, 3.2, 3.1], 100.0, 1),
    ("switch/seed-1_num_experts-8", 8, 1, [4.5, 3.5, 2.5, 2.8], 200.0, 1),
    ("switch/seed-2_num_experts-8", 8, 2, [4.0, 3.0, 2.9, 2.9], 200.0, 1),
    ("switch/seed-1_num_experts-32", 32, 1, [5.0, 4.5, 4.2, 4.1], 300.0, 5),
]


def write_run(root, name, experts, seed, vals, step_ms, every):
    d = os.path.join(root, name)
    os.makedirs(d)
    sparse = 2 if experts else 0
    with open(os.path.join(d, "config.yaml"), "w") as f:
        f.write(f"model:\n  num_experts: {experts}\n  encoder_sparse_step: {sparse}\n"
                f"  decoder_sparse_step: {sparse}\ntrain:\n  steps: 40\n  seed: {seed}\n")
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for step in range(1, 41):
            if step % every and step != 1:
                continue
            m = {"step": step, "loss": 6.0 - step / 10, "step_ms": step_ms}
            if step % 10 == 0:
                m["val_loss"] = vals[step // 10 - 1]
            f.write(json.dumps(m) + "\n")
    return d


def report(*args):
    return subprocess.run([sys.executable, os.path.join(ARGS.source_dir, "scripts",
                                                        "headline_report.py"), *args],
                          capture_output=True, text=True)


def table(md, heading):
    """The rows (lists of cells) of the first table after `heading`, header row included."""
    lines = md.split(heading, 1)[1].splitlines()
    rows = [line for line in lines if line.startswith("|")]
    first = lines.index(rows[0])
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        if not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


class HeadlineReport(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.sweep = os.path.join(cls.tmp.name, "sweep")
        for r in RUNS:
            write_run(cls.sweep, *r)
        cls.out = os.path.join(cls.tmp.name, "out")
        cls.p = report(cls.sweep, "--out", cls.out)
        with open(os.path.join(cls.out, "headline.md")) as f:
            cls.md = f.read()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_writes_the_report_and_two_pngs(self):
        self.assertEqual(self.p.returncode, 0, self.p.stderr)
        names = [os.path.basename(line) for line in self.p.stdout.split()]
        self.assertEqual(names, ["headline.md", "val_loss_vs_step.png", "val_loss_vs_time.png"])
        for name in names[1:]:
            with Image.open(os.path.join(self.out, name)) as im:
                self.assertEqual(im.size, (1000, 600))
                self.assertGreater(len(im.convert("RGB").getcolors(1 << 20)), 10)  # not blank

    def test_val_loss_at_quarters(self):
        rows = table(self.md, "## val_loss at fixed steps")
        self.assertEqual(rows[0], ["model", "seed", "step 10", "step 20", "step 30", "step 40"])
        self.assertIn(["dense", "1", "5.0000", "4.0000", "3.5000", "3.0000"], rows)
        self.assertIn(["dense", "mean", "**5.0000**", "**4.0000**", "**3.3500**", "**3.0500**"], rows)
        self.assertIn(["switch-32", "1", "5.0000", "4.5000", "4.2000", "4.1000"], rows)
        self.assertEqual([r[0] for r in rows[1:]], ["dense"] * 3 + ["switch-8"] * 3 + ["switch-32"])

    def test_reaching_the_target(self):
        rows = {(r[0], r[1]): r for r in table(self.md, "## Reaching the target")[1:]}
        # model, seed, target, first step, interpolated, train s, quiet s, speedups x3
        self.assertEqual(rows[("dense", "1")][2:], ["3.0000", "40", "40", "4", "4", "1.00", "1.00", "1.00"])
        self.assertEqual(rows[("switch-8", "1")][2:], ["3.0000", "30", "25", "5", "5", "1.60", "0.80", "0.80"])
        self.assertEqual(rows[("switch-8", "2")][2:], ["3.1000", "20", "19", "4", "4", "2.11", "1.05", "1.05"])
        self.assertEqual(rows[("switch-8", "mean")][7:], ["**1.85**", "**0.93**", "**0.93**"])
        self.assertEqual(rows[("switch-32", "1")][3], "not reached in 40")
        self.assertEqual(rows[("switch-32", "1")][7], "")

    def test_runs_table(self):
        rows = {(r[0], r[1]): r for r in table(self.md, "## Runs")[1:]}
        # steps, median step_ms, sum s, train.log s, quiet s, final, best, best step
        self.assertEqual(rows[("switch-8", "1")][2:10],
                         ["40", "200.0", "8", "", "8", "2.8000", "2.5000", "30"])
        self.assertEqual(rows[("switch-32", "1")][4], "12 (estimated)")

    def test_target_value_and_errors(self):
        out = os.path.join(self.tmp.name, "fixed")
        p = report(self.sweep, "--out", out, "--target", "4.0")
        self.assertEqual(p.returncode, 0, p.stderr)
        with open(os.path.join(out, "headline.md")) as f:
            rows = {(r[0], r[1]): r for r in table(f.read(), "## Reaching the target")[1:]}
        self.assertEqual(rows[("switch-32", "1")][3:5], ["not reached in 40"] + [""])
        self.assertEqual(rows[("switch-8", "2")][3:5], ["10", "10"])  # first evaluation: no interpolation
        self.assertEqual(rows[("dense", "1")][3:5], ["20", "20"])

        p = report(os.path.join(self.sweep, "switch"), "--out", out)
        self.assertEqual(p.returncode, 2)
        self.assertIn("--target-model dense: no such run", p.stderr)
        empty = os.path.join(self.tmp.name, "empty")
        os.makedirs(empty)
        p = report(empty, "--out", out)
        self.assertEqual(p.returncode, 2)
        self.assertIn("no run directory", p.stderr)
        self.assertEqual(len(p.stderr.strip().splitlines()), 1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--source-dir", required=True)
    ARGS, rest = ap.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest)
