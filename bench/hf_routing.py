#!/usr/bin/env python3
"""Trains HuggingFace SwitchTransformersForConditionalGeneration on the batches SwitchT5 trains
on, from SwitchT5's initial weights, and logs the routers per step as `switcht5 train` does:
is a router behaviour ours, or the model's? (issue 15: the headline's drops at 32 experts.)

    build/pyenv/bin/python bench/hf_routing.py CONFIG --hf-dir HF --batches B.h5 --out OUT.jsonl
        [--mode hf|paper] [--set section.key=value ...] [--steps N]

HF:      scripts/export_hf.py of the checkpoint that `build/dump_batches CONFIG B.h5 --init DIR`
         wrote (the trainer's own initialisation from train.seed).
B.h5:    the same dump_batches' training batches (steps 1..N of a one-process run).
CONFIG:  with the same --set as the SwitchT5 run: the learning rate and its schedule, the router
         coefficients, jitter, group size and capacity factor are read from it.

Routing groups: HF routes each sequence as one group; here every Switch layer's input [B, T, d]
is cut into groups of model.group_size consecutive tokens (row-major over [B, T], as SwitchT5
does), capacity ceil(capacity_factor * group_size / E) per expert and group, tokens placed in
group order (position priority), as in both.

--mode hf (default): transformers' own Switch layer and loss, as released (4.49), which differ
  from the paper (and from SwitchT5) in three ways:
  (1) a token past capacity leaves the layer as p * x (its layer-normed input scaled by the
      router probability) instead of 0, so the residual stream and the router's gradient see it;
  (2) the load-balancing loss counts a dropped token as routed to expert 0;
  (3) the router jitter multiplies the layer-normed input in place, so the experts see it too;
  and its router losses are one per stack over the concatenated layers (a mean over layers;
  SwitchT5 sums the per-layer losses); and (4) an expert that received no token in a step has no
  gradient (None), so Adafactor skips it: its second moments and step count freeze while it idles.
--mode paper: the same model with SwitchT5's (and the paper's / Mesh-TF's) semantics: dropped
  tokens contribute 0, the load-balancing f counts the argmax before capacity, jitter only on
  the router's input, one load-balancing and one z-loss per layer, summed over layers, and
  dense gradients (an idle expert's is zero: Adafactor decays its moments and counts the step).
Both add SwitchT5's logit z-loss (train.z_loss * mean over target tokens of logsumexp^2).

Optimizer: transformers' Adafactor (relative_step and warmup_init False, no momentum,
scale_parameter and eps[1] from train.adafactor_scale_parameter and train.adafactor_epsilon2),
SwitchT5's Adafactor by construction (src/train/optimizer.h); the learning rate
of each step from train.schedule / learning_rate / warmup_steps (constant and rsqrt).
Writes one JSON line per step: step, loss (cross-entropy), lr, and per Switch layer (SwitchT5's
names) aux_loss, z_loss, dropped_fraction, expert_fraction (before capacity), dead_experts.
"""
import argparse
import json
import math
import os
import sys
import time

import h5py
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
# One copy of the YAML + --set reading, the schedule and the optimizer's options.
from hf_step import adafactor_options, load_config, lr_at  # noqa: E402


class Recorder:
    """Per Switch layer, what the last forward routed (for the step's log line)."""

    def __init__(self):
        self.layers = {}

    def put(self, name, **v):
        self.layers[name] = v


def switch_forward(mlp, name, rec, group, capacity, mode):
    """A replacement for SwitchTransformersSparseMLP.forward with routing groups of `group`."""
    router = mlp.router
    E = router.num_experts

    def forward(hidden):
        B, T, D = hidden.shape
        x = hidden.reshape(-1, group, D)                     # [groups, group, D]
        # hf: the router's in-place jitter reaches x (the experts' input) too; paper: a copy.
        probs, logits = router._compute_router_probabilities(x if mode == "hf" else x.clone())
        idx = torch.argmax(probs, dim=-1)                    # [g, S] before capacity
        onehot = torch.nn.functional.one_hot(idx, E)         # [g, S, E]
        keep = onehot * (torch.cumsum(onehot, dim=-2) <= capacity)
        pmax = probs.max(dim=-1).values.unsqueeze(-1)
        out = x.clone() if mode == "hf" else torch.zeros_like(x)
        kept = keep.bool()
        for e in torch.nonzero(kept.reshape(-1, E).sum(0), as_tuple=True)[0].tolist():
            sel = kept[:, :, e]
            out[sel] = mlp.experts[f"expert_{e}"](x[sel])
        out = pmax * out
        n = idx.numel()
        rec.put(name, dropped=1.0 - float(keep.sum()) / n,
                fraction=(onehot.reshape(-1, E).sum(0).double() / n).tolist(),
                logits=logits, index=idx)
        # The index the load-balancing loss counts: hf, after capacity (dropped -> expert 0).
        loss_index = torch.argmax(keep, dim=-1) if mode == "hf" else idx
        return out.reshape(B, T, D), (logits, loss_index)

    return forward


def paper_router_losses(rec, names, E):
    """Per layer: lb = E * mean_g sum_e f_ge P_ge (f before capacity), z = mean lse^2."""
    lb_sum, z_sum, per = 0.0, 0.0, {}
    for name in names:
        logits, idx = rec.layers[name]["logits"], rec.layers[name]["index"]
        probs = torch.softmax(logits, dim=-1)
        f = torch.nn.functional.one_hot(idx, E).float().mean(dim=-2)  # [g, E]
        lb = E * (f * probs.mean(dim=-2)).sum(-1).mean()
        z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
        lb_sum, z_sum = lb_sum + lb, z_sum + z
        per[name] = (float(lb), float(z))
    return lb_sum, z_sum, per


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--batches", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["hf", "paper"], default="hf")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=0, help="default: train.steps")
    args = ap.parse_args()
    if os.path.exists(args.out):
        raise SystemExit(f"hf_routing: {args.out}: the file exists (never overwritten)")

    import transformers
    import torch.optim.lr_scheduler as sched
    if not hasattr(sched, "LRScheduler"):  # torch 1.13 (build/pyenv): the name torch 2 gave it
        sched.LRScheduler = sched._LRScheduler
    from transformers.optimization import Adafactor

    doc = load_config(args.config, args.set)
    mcfg, train = doc.get("model") or {}, doc.get("train") or {}
    steps = args.steps or int(train.get("steps", 100))
    torch.manual_seed(int(train.get("seed", 0)))
    model = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
        args.hf_dir, torch_dtype=torch.float32)
    hcfg = model.config
    E = hcfg.num_experts
    # The config's router settings win over the exported ones (a --set of the comparison).
    jitter = float(mcfg.get("router_jitter_noise", 0.01))
    aux_coef = float(mcfg.get("router_aux_loss_coef", 0.01))
    z_coef = float(mcfg.get("router_z_loss_coef", 0.001))
    logit_z = float(train.get("z_loss", 1e-4))
    group = int(mcfg.get("group_size", 0))
    cf = float(mcfg.get("capacity_factor", 1.0))
    model.router_z_loss_coef, model.router_aux_loss_coef = z_coef, aux_coef

    rec = Recorder()
    names = []
    with h5py.File(args.batches, "r") as f:
        data = {k: torch.from_numpy(f[k][:steps]) for k in
                ("encoder_input_tokens", "encoder_mask", "decoder_input_tokens", "decoder_mask",
                 "labels")}
    if data["labels"].shape[0] < steps:
        raise SystemExit(f"hf_routing: {args.batches} holds {data['labels'].shape[0]} batches, "
                         f"fewer than the {steps} steps asked for")
    B, Ti = data["encoder_input_tokens"].shape[1:]
    Tt = data["decoder_input_tokens"].shape[2]
    for mod_name, mod in model.named_modules():
        if isinstance(mod, transformers.models.switch_transformers.modeling_switch_transformers
                      .SwitchTransformersSparseMLP):
            stack, _, blk = mod_name.split(".")[:3]       # encoder.block.1.layer.1.mlp
            name = f"{stack}.block.{blk}"
            g = group or (Ti if stack == "encoder" else Tt)
            if (B * (Ti if stack == "encoder" else Tt)) % g:
                raise SystemExit(f"hf_routing: {name}: {B} sequences do not fill groups of {g}")
            fixed = int(mcfg.get("expert_capacity", 0))  # model.expert_capacity > 0 wins
            capacity = fixed if fixed > 0 else max(1, math.ceil(cf * g / E - 1e-9))
            mod.router.jitter_noise = jitter
            mod.forward = switch_forward(mod, name, rec, g, capacity, args.mode)
            names.append(name)
    model.train()
    opt = Adafactor(model.parameters(), lr=lr_at(train, 1), **adafactor_options(train))
    with open(args.out, "w") as out:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(train, step)
            for grp in opt.param_groups:
                grp["lr"] = lr
            i = step - 1
            labels = data["labels"][i].long()
            o = model(input_ids=data["encoder_input_tokens"][i].long(),
                      attention_mask=data["encoder_mask"][i].long(),
                      decoder_input_ids=data["decoder_input_tokens"][i].long(),
                      decoder_attention_mask=data["decoder_mask"][i].long(),
                      labels=labels, output_router_logits=True, return_dict=True)
            mask = labels != -100
            ce = torch.nn.functional.cross_entropy(o.logits[mask], labels[mask])
            lse = torch.logsumexp(o.logits[mask], dim=-1)
            lb_sum, z_sum, per = paper_router_losses(rec, names, E)
            if args.mode == "hf":
                loss = o.loss  # HF's: cross-entropy + its per-stack router losses
            else:
                loss = ce + aux_coef * lb_sum + z_coef * z_sum
            loss = loss + logit_z * (lse ** 2).mean()
            loss.backward()
            if args.mode == "paper":
                # Dense gradients, as in Mesh-TF / T5X: an expert that received no token has a
                # zero gradient, and Adafactor still decays its second moments and counts the
                # step. (PyTorch leaves its .grad None, and HF's Adafactor then skips the
                # parameter: its state and step count freeze while the expert idles.)
                for p in model.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not math.isfinite(float(ce)):
                raise SystemExit(f"hf_routing: step {step}: non-finite loss")
            line = {"step": step, "loss": float(ce), "lr": lr,
                    "step_ms": (time.perf_counter() - t0) * 1e3, "mode": args.mode, "router": []}
            for name in names:
                r = rec.layers[name]
                line["router"].append({
                    "layer": name, "aux_loss": per[name][0], "z_loss": per[name][1],
                    "dropped_fraction": r["dropped"], "expert_fraction": r["fraction"],
                    "dead_experts": sum(1 for x in r["fraction"] if x == 0.0)})
            out.write(json.dumps(line) + "\n")
            out.flush()
            if step == 1 or step % 10 == 0:
                d = " ".join(f"{x['dropped_fraction']:.3f}" for x in line["router"])
                print(f"step {step}: loss {line['loss']:.4f} drops {d} "
                      f"({line['step_ms']:.0f} ms)", flush=True)


if __name__ == "__main__":
    main()
