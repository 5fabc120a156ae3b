"""HuggingFace parity of scripts/export_hf.py and scripts/import_hf.py (ctest test_hf_parity).

Usage: build/pyenv/bin/python tests/hf/test_hf_parity.py --build-dir build --source-dir .
       [unittest arguments, e.g. -k import]

Export: `switcht5 train` a few steps of configs/tiny-synthetic.yaml, export the checkpoint,
load it with transformers, and run it on the first validation batch that
`switcht5 eval --dump-batch` wrote together with our logits and loss.
Import: save a random transformers model, import it, and run `switcht5 eval --dump-batch`
on the imported checkpoint; compare with the transformers model on the dumped batch.

Compared, in eval mode, float32, with no token past capacity (model.eval_capacity_factor = 4
gives capacity 12 = tokens per sequence; imported models have expert_capacity 64), where HF's
and our routing agree exactly:
  logits   at decoder positions with decoder_mask = 1:
           rel = max|ours - hf| / max|hf|   (one scale for the whole tensor: logits near 0
           carry no relative meaning)
  loss     our dumped mean cross-entropy against (a) the cross-entropy of HF's logits over the
           labels != -100 and (b) HF's own loss with output_router_logits=False (HF's default,
           True, adds its router z- and balance losses): rel = |ours - hf| / |hf|.
Both must be <= TOLERANCE.

Training: from the same initial weights and on the same batches (build/dump_batches), 12 steps
of `switcht5 train` against 12 steps of transformers' model and Adafactor
(bench/hf_routing.py --mode paper), router losses and capacity drops on: every step's loss
within TOLERANCE and the same tokens routed and dropped per Switch layer, for at least
MIN_SAME_ROUTING steps (fp32 rounding eventually moves a token at a router's near-tie).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import h5py
import numpy as np
import torch

TOLERANCE = 1e-4
MIN_SAME_ROUTING = 8  # training parity: steps that must route identically (check_training)
ARGS = None  # --build-dir / --source-dir, set in main()

TINY_RUN = ["train.steps=3", "checkpoint.every=0", "train.eval_batches=1", "log.every=1",
            "model.eval_capacity_factor=4"]
DENSE_GATED = ["model.num_experts=0", "model.encoder_sparse_step=0", "model.decoder_sparse_step=0",
               "model.feed_forward_proj=gated-gelu"]


def run(cmd, expect_rc=0):
    """Runs cmd; returns (stdout, stderr). Fails the test with both when the exit code differs."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != expect_rc:
        raise AssertionError(f"{' '.join(cmd)}: exit {p.returncode}, expected {expect_rc}\n"
                             f"--- stdout\n{p.stdout}--- stderr\n{p.stderr}")
    return p.stdout, p.stderr


def script(name):
    """The command line of scripts/NAME, with the switcht5 binary it takes its name table from."""
    return [sys.executable, os.path.join(ARGS.source_dir, "scripts", name), "--switcht5", switcht5()]


def switcht5():
    return os.path.join(ARGS.build_dir, "switcht5")


def train(run_dir, overrides):
    """Trains configs/tiny-synthetic.yaml with `overrides`; returns the final checkpoint's path."""
    cmd = [switcht5(), "train", "--config", os.path.join(ARGS.source_dir, "configs", "tiny-synthetic.yaml"),
           "--run-dir", run_dir]
    for o in TINY_RUN + overrides:
        cmd += ["--set", o]
    run(cmd)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(ckpt_dir, "latest")) as fh:
        return os.path.join(ckpt_dir, fh.read().strip())


def eval_dump(ckpt, out, overrides=()):
    """`switcht5 eval --dump-batch`: the batch as torch tensors, our logits and loss."""
    cmd = [switcht5(), "eval", "--checkpoint", ckpt, "--dump-batch", out, "--force"]
    for o in overrides:
        cmd += ["--set", o]
    stdout, _ = run(cmd)
    json.loads(stdout.strip().splitlines()[-1])  # one JSON line with val_loss
    with h5py.File(out, "r") as f:
        batch = {k: torch.from_numpy(f[k][()]) for k in
                 ("encoder_input_tokens", "encoder_mask", "decoder_input_tokens", "decoder_mask", "labels")}
        return batch, f["logits"][()], float(f.attrs["loss"])


def hf_forward(model, batch):
    """HF logits and losses on a dumped batch: (logits, CE of the logits, HF's own loss,
    [router mask [B, T, E] of each Switch layer])."""
    model.eval()
    kwargs, masks, hooks = {}, [], []
    if "Switch" in type(model).__name__:
        kwargs["output_router_logits"] = False
        for module in model.modules():
            if type(module).__name__ == "SwitchTransformersTop1Router":
                hooks.append(module.register_forward_hook(lambda mod, inp, out: masks.append(out[0])))
    with torch.no_grad():
        out = model(input_ids=batch["encoder_input_tokens"].long(),
                    attention_mask=batch["encoder_mask"].long(),
                    decoder_input_ids=batch["decoder_input_tokens"].long(),
                    decoder_attention_mask=batch["decoder_mask"].long(),
                    labels=batch["labels"].long(), **kwargs)
    for h in hooks:
        h.remove()
    logits = out.logits.float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           batch["labels"].long().reshape(-1), ignore_index=-100)
    return logits.numpy(), float(ce), float(out.loss), masks


class Parity(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        torch.set_num_threads(2)
        self.tmp = tempfile.mkdtemp(prefix="switcht5-hf-")

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, name):
        return os.path.join(self.tmp, name)

    def assert_parity(self, model, batch, our_logits, our_loss):
        hf_logits, hf_ce, hf_loss, router_masks = hf_forward(model, batch)
        # HF's Switch layers dropped no token (a dropped one has an all-zero row) and used more
        # than one expert: the comparison covers routing, not a single expert.
        for mask in router_masks:
            self.assertTrue(bool((mask.sum(-1) == 1).all()), "HF dropped tokens")
            self.assertGreater(int((mask.sum((0, 1)) > 0).sum()), 1)
        keep = batch["decoder_mask"].numpy() > 0
        self.assertGreater(keep.sum(), 0)
        self.assertGreater((batch["labels"].numpy() != -100).sum(), 0)
        a, b = our_logits[keep], hf_logits[keep]
        rel_logits = np.abs(a - b).max() / np.abs(b).max()
        rel_ce = abs(our_loss - hf_ce) / abs(hf_ce)
        rel_loss = abs(our_loss - hf_loss) / abs(hf_loss)
        print(f"  {self.id().split('.')[-1]}: logits rel {rel_logits:.2e} (max|hf| {np.abs(b).max():.3f}), "
              f"loss ours {our_loss:.6f} hf-ce {hf_ce:.6f} hf-loss {hf_loss:.6f} "
              f"(rel {rel_ce:.2e}, {rel_loss:.2e})", flush=True)
        self.assertLessEqual(rel_logits, TOLERANCE)
        self.assertLessEqual(rel_ce, TOLERANCE)
        self.assertLessEqual(rel_loss, TOLERANCE)

    def load_hf(self, hf_dir, cls_name):
        import transformers
        with open(os.path.join(hf_dir, "config.json")) as fh:
            config = json.load(fh)
        self.assertEqual(config["architectures"], [cls_name])
        model, info = getattr(transformers, cls_name).from_pretrained(hf_dir, output_loading_info=True)
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            self.assertEqual(list(info[kind]), [], f"{hf_dir}: {kind}")
        return model

    # ---- training: our steps against HF's steps on the same batches -------------------------

    def check_training(self, overrides, steps=12):
        """From the same initial weights (dump_batches --init, exported) and on the same batches
        (dump_batches), `switcht5 train` and transformers (bench/hf_routing.py --mode paper: HF's
        model with the paper's dropped-token and load-balancing semantics, HF's Adafactor) take
        `steps` training steps, router losses and capacity drops on, no jitter, no dropout. Each
        step's loss depends on every earlier step's gradients and updates, so this compares the
        backward pass, the router losses' gradients and the optimizer, not only the forward."""
        config = os.path.join(ARGS.source_dir, "configs", "tiny-synthetic.yaml")
        sets = [f"train.steps={steps}", "train.learning_rate=0.01"] + overrides
        set_args = [a for o in sets for a in ("--set", o)]
        batches, init = self.path("batches.h5"), self.path("init")
        run([os.path.join(ARGS.build_dir, "dump_batches"), config, batches, "--steps", str(steps),
             "--init", init] + set_args)
        run(script("export_hf.py") + [os.path.join(init, "ckpt-00000000.h5"), self.path("hf")])
        run([switcht5(), "train", "--config", config, "--run-dir", self.path("run"),
             "--resume", os.path.join(init, "ckpt-00000000.h5")]
            + [a for o in TINY_RUN + sets for a in ("--set", o)])
        hf_out = self.path("hf.jsonl")
        run([sys.executable, os.path.join(ARGS.source_dir, "bench", "hf_routing.py"), config,
             "--hf-dir", self.path("hf"), "--batches", batches, "--out", hf_out, "--mode", "paper"]
            + set_args)
        with open(os.path.join(self.path("run"), "metrics.jsonl")) as fh:
            ours = [json.loads(line) for line in fh]
        with open(hf_out) as fh:
            hf = [json.loads(line) for line in fh]
        self.assertEqual([m["step"] for m in ours], list(range(1, steps + 1)))
        self.assertEqual([m["step"] for m in hf], list(range(1, steps + 1)))
        # Compared step by step until the routing first differs: fp32 rounding grows from ~1e-8
        # (step 1) by about 2x per step here, and a router near a tie then sends one token
        # elsewhere (seen at steps 15-18), after which the runs are different runs. The routing
        # must agree for at least MIN_SAME_ROUTING steps.
        dropped, same = 0.0, 0
        for a, b in zip(ours, hf):
            self.assertEqual([r["layer"] for r in a["router"]], [q["layer"] for q in b["router"]])
            rel = abs(a["loss"] - b["loss"]) / abs(b["loss"])
            drops = [(r["dropped_fraction"], q["dropped_fraction"]) for r, q in zip(a["router"], b["router"])]
            frac = max(abs(f - g) for r, q in zip(a["router"], b["router"])
                       for f, g in zip(r["expert_fraction"], q["expert_fraction"]))
            print(f"  step {a['step']}: loss ours {a['loss']:.6f} hf {b['loss']:.6f} (rel {rel:.1e}), "
                  f"dropped {' '.join(f'{x:.4f}/{y:.4f}' for x, y in drops)}, "
                  f"expert fractions differ by {frac:.1e}", flush=True)
            if frac > 1e-5 or any(abs(x - y) > 1e-6 for x, y in drops):
                print(f"  step {a['step']}: a token went to another expert (a router near a tie); "
                      f"compared no further", flush=True)
                break
            self.assertLessEqual(rel, TOLERANCE, f"step {a['step']}")
            dropped += sum(x for x, _ in drops)
            same += 1
        self.assertGreaterEqual(same, MIN_SAME_ROUTING, "the routing differed too early")
        self.assertGreater(dropped, 0.0, "no token was dropped: capacity went untested")
        self.assertLess(ours[-1]["loss"], ours[0]["loss"] - 0.05, "the steps did not train")

    def test_dump_batches_refusals(self):
        """build/dump_batches: one line naming the input, exit 2, nothing written."""
        tool = os.path.join(ARGS.build_dir, "dump_batches")
        config = os.path.join(ARGS.source_dir, "configs", "tiny-synthetic.yaml")
        out = self.path("b.h5")
        existing = self.path("existing.h5")
        with open(existing, "w") as fh:
            fh.write("keep me")
        cases = [
            ([config, out, "--steps", "0"], "--steps"),
            ([config, out, "--steps", "2", "--bogus", "1"], "--bogus"),
            ([config, out, "--steps", "2", "--init"], "--init needs a value"),
            ([config, out, "--steps", "2", "--set", "model.nope=1"], "model.nope"),
            ([self.path("missing.yaml"), out, "--steps", "2"], "missing.yaml"),
            ([config, existing, "--steps", "2"], "existing.h5"),
        ]
        for argv, named in cases:
            _, err = run([tool] + argv, expect_rc=2)
            lines = [l for l in err.splitlines() if l.strip()]
            self.assertEqual(len(lines), 1, err)
            self.assertIn(named, lines[0])
            self.assertFalse(os.path.exists(out), argv)
        with open(existing) as fh:
            self.assertEqual(fh.read(), "keep me")

    def test_training_matches_hf_per_sequence_groups(self):
        self.check_training([])

    def test_training_matches_hf_groups_across_sequences(self):
        # Groups of 48 tokens: four 12-token sequences per routing group, capacity 15 of 48.
        self.check_training(["model.group_size=48"])

    def test_training_matches_hf_parameter_scale(self):
        # Adafactor's parameter scale (HF's scale_parameter, T5X's multiply_by_parameter_scale):
        # each matrix steps lr * max(1e-3, rms(matrix)), so lr 0.1 moves the embedding (rms 1)
        # 0.1 and the smaller weights proportionally less.
        self.check_training(["train.adafactor_scale_parameter=true", "train.learning_rate=0.1"])

    # ---- export: our checkpoint -> HF ---------------------------------------------------------

    def check_export(self, overrides, cls_name):
        ckpt = train(self.path("run"), overrides)
        run(script("export_hf.py") + [ckpt, self.path("hf")])
        model = self.load_hf(self.path("hf"), cls_name)
        batch, logits, loss = eval_dump(ckpt, self.path("dump.h5"))
        self.assert_parity(model, batch, logits, loss)

    def test_export_switch_relu_tied(self):
        self.check_export([], "SwitchTransformersForConditionalGeneration")

    def test_export_switch_relu_untied(self):
        self.check_export(["model.tie_word_embeddings=false"], "SwitchTransformersForConditionalGeneration")

    def test_export_dense_gated_tied(self):
        self.check_export(DENSE_GATED, "T5ForConditionalGeneration")

    def test_export_dense_gated_untied(self):
        self.check_export(DENSE_GATED + ["model.tie_word_embeddings=false"], "T5ForConditionalGeneration")

    def check_refused(self, args, *words):
        _, stderr = run(script("export_hf.py") + args, expect_rc=2)
        lines = stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, stderr)
        self.assertTrue(lines[0].startswith("export_hf.py: error: "), stderr)
        for w in words:
            self.assertIn(w, lines[0])

    def test_export_refusals(self):
        gated = train(self.path("run"), ["model.feed_forward_proj=gated-gelu"])
        self.check_refused([gated, self.path("hf")], gated, "gated-gelu")
        self.assertFalse(os.path.exists(os.path.join(self.path("hf"), "model.safetensors")))
        # One flipped bit in one dataset: refused, naming the file and the dataset.
        bad = self.path("corrupt.h5")
        shutil.copy(gated, bad)
        with h5py.File(bad, "r+") as f:
            ds = f["params/encoder.block.0.layer.0.SelfAttention.q.weight"]
            w = ds[()]
            w.view(np.uint32)[0, 0] ^= 1
            ds[...] = w
        self.check_refused([bad, self.path("hf")], bad, "/params/encoder.block.0.layer.0.SelfAttention.q.weight",
                           "checksum")
        not_ckpt = self.path("not-a-checkpoint.h5")
        with open(not_ckpt, "w") as fh:
            fh.write("hello\n")
        self.check_refused([not_ckpt, self.path("hf")], not_ckpt, "not an HDF5 file")
        # The name table comes from the switcht5 binary: a wrong one is refused in one line.
        self.check_refused([gated, self.path("hf"), "--switcht5", "/nonexistent/switcht5"],
                           "--switcht5 /nonexistent/switcht5", "not an executable file")

    def test_outputs_never_overwritten_without_force(self):
        """export_hf.py and import_hf.py refuse to replace an existing file (one line, exit 2,
        the file unchanged) unless --force."""
        ckpt = train(self.path("run"), [])
        run(script("export_hf.py") + [ckpt, self.path("hf")])
        weights = os.path.join(self.path("hf"), "model.safetensors")
        with open(weights, "rb") as fh:
            before = fh.read()
        self.check_refused([ckpt, self.path("hf")], weights, "the file exists; pass --force")
        with open(weights, "rb") as fh:
            self.assertEqual(fh.read(), before)
        run(script("export_hf.py") + [ckpt, self.path("hf"), "--force"])
        imported = self.path("imported.h5")
        lengths = ["--inputs-length", "12", "--targets-length", "12"]
        run(script("import_hf.py") + [self.path("hf"), imported] + lengths)
        _, stderr = run(script("import_hf.py") + [self.path("hf"), imported] + lengths, expect_rc=2)
        self.assertEqual(stderr.strip().splitlines(),
                         [f"import_hf.py: error: {imported}: the file exists; pass --force to overwrite it"])
        run(script("import_hf.py") + [self.path("hf"), imported, "--force"] + lengths)

    # ---- import: HF -> our checkpoint ---------------------------------------------------------

    def random_hf_model(self, kind, tied):
        import transformers
        dims = dict(vocab_size=128, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2,
                    num_decoder_layers=2, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0, tie_word_embeddings=tied)
        if kind == "switch":
            config = transformers.SwitchTransformersConfig(
                num_experts=4, expert_capacity=64, num_sparse_encoder_layers=1,
                num_sparse_decoder_layers=1, router_jitter_noise=0.0, **dims)
            model = transformers.SwitchTransformersForConditionalGeneration(config)
        else:
            config = transformers.T5Config(feed_forward_proj="gated-gelu", **dims)
            model = transformers.T5ForConditionalGeneration(config)
        return model.eval()

    def check_import(self, kind, tied):
        model = self.random_hf_model(kind, tied)
        model.save_pretrained(self.path("hf"))
        ckpt = self.path("imported.h5")
        run(script("import_hf.py") + [self.path("hf"), ckpt, "--inputs-length", "12", "--targets-length", "12"])
        with h5py.File(ckpt, "r") as f:
            self.assertEqual(f.attrs["step"], 0)
            self.assertEqual(f.attrs["optimizer"], "none")
            self.assertNotIn("optimizer", f)
        batch, logits, loss = eval_dump(ckpt, self.path("dump.h5"), ["data.synthetic_vocab=16"])
        self.assert_parity(model, batch, logits, loss)
        # export(import(HF)) loads into the same class with bitwise the same tensors.
        run(script("export_hf.py") + [ckpt, self.path("hf2")])
        again = self.load_hf(self.path("hf2"), type(model).__name__)
        want, got = model.state_dict(), again.state_dict()
        self.assertEqual(sorted(want), sorted(got))
        for name in want:
            self.assertTrue(torch.equal(want[name], got[name]), name)

    def test_import_switch_tied(self):
        self.check_import("switch", True)

    def test_import_switch_untied(self):
        self.check_import("switch", False)

    def test_import_dense_gated_tied(self):
        self.check_import("t5", True)


def main():
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-dir", required=True)
    parser.add_argument("--source-dir", required=True)
    ARGS, rest = parser.parse_known_args()
    ARGS.build_dir, ARGS.source_dir = os.path.abspath(ARGS.build_dir), os.path.abspath(ARGS.source_dir)
    if not os.access(switcht5(), os.X_OK):
        print(f"FAILED: {switcht5()} not found: build the switcht5 target first", file=sys.stderr)
        return 1
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"tolerance {TOLERANCE} (relative)", flush=True)
    transformers.logging.set_verbosity_error()
    result = unittest.main(argv=[sys.argv[0]] + rest, exit=False, verbosity=2).result
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
