"""The trainer's TensorBoard event files, read back by tensorboard itself (ctest
test_tensorboard_events).

Usage: build/pyenv/bin/python tests/py/test_tensorboard_events.py --build-dir build --source-dir .
       [unittest arguments]

Trains configs/tiny-synthetic.yaml for a few steps, logging every step, with a NaN injected
into step 3's gradients (SWITCHT5_INJECT_NAN: the update is skipped and grad_norm is null in
metrics.jsonl), then resumes from the step-4 checkpoint to step 10: steps 5-8 are trained and
logged twice, and the later lines of metrics.jsonl are the ones that count. Then:
  - every record of every event file has the right framing and both masked CRC-32Cs (checked
    here with tensorboard's own CRC code, since its loader stops quietly at a bad record);
    each file starts with file_version "brain.Event:2" and a SessionLog START at the first
    step its session trained (1, then 5);
  - tensorboard's EventAccumulator over the run directory holds exactly the scalars that
    metrics.jsonl's last line per step gives (tag by tag, step by step: none missing, none
    extra), each equal to the JSON value within the precision of the float that TensorBoard
    stores and the digits that metrics.jsonl prints; null values (grad_norm of the skipped
    step) are absent and train/skipped is 1 there; the redone steps show the second
    session's values (their timings differ);
  - every event's wall_time lies within the test's run.
The same comparison is made for a 2-rank run under scripts/mpirun.sh, which must leave one
event file (rank 0's).
"""
import argparse
import glob
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unittest

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

ARGS = None  # --build-dir / --source-dir, set in main()

# metrics.jsonl prints these with 9 significant digits, the rest ("{:.6g}") with 6; TensorBoard
# keeps a float32 (relative error <= 2^-24). The tolerances bound the sum of both roundings.
NINE_DIGITS = {"loss", "aux_loss", "z_loss", "lr", "grad_norm", "dropped_fraction", "val_loss"}
REL_TOL_9 = 2 ** -24 + 5e-9
REL_TOL_6 = 2 ** -24 + 5e-6

TRAIN_FIELDS = ["loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s",
                "dropped_fraction", "step_ms"]
RUN = ["log.every=1", "train.eval_every=4", "checkpoint.every=4", "train.eval_batches=1"]


def run(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: exit {p.returncode}\n"
                             f"--- stdout\n{p.stdout}--- stderr\n{p.stderr}")


def train_cmd(run_dir, steps, extra=()):
    cmd = [os.path.join(ARGS.build_dir, "switcht5"), "train", "--config",
           os.path.join(ARGS.source_dir, "configs", "tiny-synthetic.yaml"), "--run-dir", run_dir,
           "--set", f"train.steps={steps}"]
    for s in RUN:
        cmd += ["--set", s]
    return cmd + list(extra)


def expected_scalars(metrics_path):
    """{(tag, step): (value, rel_tol)} from metrics.jsonl, the later line of a repeated step
    winning; null values left out, as the writer leaves out non-finite ones."""
    by_step = {}
    with open(metrics_path) as f:
        for line in f:
            m = json.loads(line)
            by_step[m["step"]] = m
    out = {}

    def put(tag, step, value, nine):
        if value is not None:
            out[(tag, step)] = (value, REL_TOL_9 if nine else REL_TOL_6)

    for step, m in by_step.items():
        for field in TRAIN_FIELDS:
            put(f"train/{field}", step, m[field], field in NINE_DIGITS)
        put("train/skipped", step, 1.0 if m.get("skipped") else 0.0, True)
        if "val_loss" in m:
            put("val/loss", step, m["val_loss"], True)
        for r in m.get("router", []):
            prefix = f"routing/{r['layer']}/"
            for field in ("aux_loss", "z_loss", "dropped_fraction", "entropy", "top1_prob",
                          "top1_margin", "load_cv"):
                put(prefix + field, step, r[field], False)
            if "dead_experts" in r:
                put(prefix + "dead_experts", step, float(r["dead_experts"]), True)
            width = len(str(max(len(r["expert_fraction"]) - 1, 0)))
            for e, v in enumerate(r["expert_fraction"]):
                put(f"{prefix}expert_{e:0{width}d}_fraction", step, v, False)
            for e, v in enumerate(r.get("expert_grad_norm", [])):
                put(f"{prefix}expert_{e:0{width}d}_grad_norm", step, v, False)
    return out, by_step


def read_events(path):
    """The Event messages of one file, checking each record's framing and both CRCs."""
    with open(path, "rb") as f:
        data = f.read()
    events, at = [], 0
    while at < len(data):
        assert at + 12 <= len(data), f"{path}: truncated header at byte {at}"
        header = data[at:at + 8]
        (n,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[at + 8:at + 12])
        assert header_crc == masked_crc32c(header), f"{path}: length CRC at byte {at}"
        assert at + 12 + n + 4 <= len(data), f"{path}: truncated record at byte {at}"
        body = data[at + 12:at + 12 + n]
        (body_crc,) = struct.unpack("<I", data[at + 12 + n:at + 16 + n])
        assert body_crc == masked_crc32c(body), f"{path}: data CRC at byte {at}"
        events.append(event_pb2.Event.FromString(body))
        at += 16 + n
    return events


class TensorBoardEvents(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="switcht5_tb_events_")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)

    def check_against_metrics(self, run_dir, t0, t1):
        expected, by_step = expected_scalars(os.path.join(run_dir, "metrics.jsonl"))
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        got = {}
        for tag in acc.Tags()["scalars"]:
            for ev in acc.Scalars(tag):
                self.assertNotIn((tag, ev.step), got, f"{tag} step {ev.step} twice")
                got[(tag, ev.step)] = ev.value
                self.assertTrue(t0 <= ev.wall_time <= t1,
                                f"{tag} step {ev.step}: wall_time {ev.wall_time} not in [{t0}, {t1}]")
        self.assertEqual(sorted(set(got) - set(expected)), [], "scalars not in metrics.jsonl")
        self.assertEqual(sorted(set(expected) - set(got)), [], "scalars missing from the events")
        for key, (want, tol) in expected.items():
            self.assertTrue(math.isclose(got[key], want, rel_tol=tol, abs_tol=0.0),
                            f"{key}: events {got[key]!r}, metrics.jsonl {want!r}")
        print(f"{run_dir}: {len(got)} scalars over {len(by_step)} steps match metrics.jsonl")
        return got, by_step

    def test_single_process_with_skipped_step_and_resume(self):
        run_dir = os.path.join(self.dir, "run")
        t0 = time.time()
        env = dict(os.environ, SWITCHT5_INJECT_NAN="3:0")
        run(train_cmd(run_dir, 8), env=env)
        ckpt = os.path.join(run_dir, "checkpoints", "ckpt-00000004.h5")
        self.assertTrue(os.path.exists(ckpt), os.listdir(os.path.join(run_dir, "checkpoints")))
        run(train_cmd(run_dir, 10, ["--resume", ckpt]))
        t1 = time.time()

        files = sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")))
        self.assertEqual(len(files), 2, files)
        host = os.uname().nodename
        for path, first_step in zip(files, (1, 5)):
            name = os.path.basename(path).split(".")
            self.assertEqual(name[:3], ["events", "out", "tfevents"], path)
            self.assertTrue(t0 - 1 <= int(name[3]) <= t1, path)
            self.assertIn(host, os.path.basename(path))
            events = read_events(path)
            self.assertEqual(events[0].file_version, "brain.Event:2", path)
            self.assertEqual(events[1].session_log.status, event_pb2.SessionLog.START, path)
            self.assertEqual(events[1].step, first_step, path)
            summaries = [e for e in events[2:] if e.HasField("summary")]
            self.assertEqual(len(summaries), len(events) - 2, path)
            steps = [e.step for e in summaries]
            self.assertEqual(steps, list(range(first_step, 9 if first_step == 1 else 11)), path)
            walls = [e.wall_time for e in events]
            self.assertEqual(walls, sorted(walls), f"{path}: wall_time goes back")

        got, by_step = self.check_against_metrics(run_dir, t0, t1)
        # The cases the comparison above must have met, so that it could have failed on them.
        self.assertIsNone(by_step[3]["grad_norm"], "the injected NaN left no null in metrics.jsonl")
        self.assertNotIn(("train/grad_norm", 3), got)
        self.assertEqual(got[("train/skipped", 3)], 1.0)
        self.assertEqual(sorted(s for (t, s) in got if t == "val/loss"), [4, 8, 10])
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual([m["step"] for m in lines], list(range(1, 9)) + list(range(5, 11)))
        first_session = {m["step"]: m for m in lines[:8]}
        redone = [s for s in range(5, 9)
                  if first_session[s]["step_ms"] != by_step[s]["step_ms"]]
        self.assertTrue(redone, "the redone steps' timings happen to repeat: nothing checks "
                                "that the later session's values win")

    def test_two_ranks_one_file(self):
        run_dir = os.path.join(self.dir, "mpi")
        t0 = time.time()
        cmd = train_cmd(run_dir, 6, ["--set", "parallel.data=2", "--set", "parallel.expert=2"])
        run(["bash", os.path.join(ARGS.source_dir, "scripts", "mpirun.sh"), "-np", "2"] + cmd)
        t1 = time.time()
        files = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
        self.assertEqual(len(files), 1, files)
        got, by_step = self.check_against_metrics(run_dir, t0, t1)
        self.assertEqual(sorted(by_step), list(range(1, 7)))


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--build-dir", required=True)
    p.add_argument("--source-dir", required=True)
    ARGS, rest = p.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
