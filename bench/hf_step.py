#!/usr/bin/env python3
"""The HuggingFace side of bench/run.sh: steady-state training-step time of
SwitchTransformersForConditionalGeneration (T5ForConditionalGeneration for a dense config) with
the same config, batch and lengths as `bench_step CONFIG`, PyTorch on the CPU.

    python bench/hf_step.py CONFIG [--set section.key=value ...] [--steps N] [--warmup N]
                            [--compile] [--json FILE]

The model comes from the same mapping scripts/export_hf.py writes into config.json (dims, sparse
steps, router coefficients, dropout), with one difference: expert_capacity is the *training*
capacity, ceil(capacity_factor * inputs_length / num_experts) per sequence, as ours routes the
encoder (HF has one capacity for both stacks; its decoder groups are shorter, so it drops fewer
decoder tokens than ours: HF's experts run on the routed tokens only, with no padded slots, so
the capacity changes which tokens are dropped, not the work per token).
A step is what bench_step times: forward with the router losses on (output_router_logits=True:
z-loss and load-balancing loss added to the loss), backward, Adafactor (HF's, set as SwitchT5's
from the config: parameter scale, decay rate, clipping; the config's schedule), zero_grad.
Inputs and labels are uniform random token ids (3 .. vocab-100), fresh per step; the timed steps are those after the warm-up (torch.compile's
compilation happens in the warm-up). Prints one line and writes --json: ms per step (median, min,
max), the phases (forward + backward, optimizer) medians, tokens/s, peak RSS, parameters, torch
and transformers versions, threads, the allocator (LD_PRELOAD), torch's BLAS.
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
import export_hf  # noqa: E402  (the config mapping: one copy of it)


def load_config(path, sets):
    import yaml
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    for s in sets:
        key, _, value = s.partition("=")
        section, _, name = key.partition(".")
        doc.setdefault(section, {})[name] = yaml.safe_load(value)
    return doc


def lr_at(train, step):
    """SwitchT5's LrSchedule::lr for constant and rsqrt (src/train/schedule.cpp)."""
    base = float(train.get("learning_rate", 0.01))  # SwitchT5's defaults (src/config/config.h)
    warmup = int(train.get("warmup_steps", 0))
    kind = train.get("schedule", "rsqrt")
    if kind == "rsqrt":
        return base / math.sqrt(max(step, max(warmup, 1)))
    if kind != "constant":
        raise SystemExit(f"train.schedule {kind!r}: only constant and rsqrt here")
    return base * step / warmup if step <= warmup else base


def adafactor_options(train):
    """transformers' Adafactor as SwitchT5's (src/train/optimizer.h): no relative step, no
    momentum, the parameter scale (scale_parameter, eps[1]) and decay rate from the config."""
    if float(train.get("weight_decay", 0.0)) != 0.0:
        # HF's Adafactor would decay the norm scales too; SwitchT5 never does (optimizer.h).
        raise SystemExit("train.weight_decay: got a nonzero value; the HF side supports only 0")
    scale = train.get("adafactor_scale_parameter", False)
    if not isinstance(scale, bool):
        raise SystemExit(f"train.adafactor_scale_parameter: got {scale!r}, expected true or false")
    return {"scale_parameter": scale, "relative_step": False, "warmup_init": False,
            "decay_rate": -float(train.get("adafactor_decay_rate", 0.8)),
            "clip_threshold": float(train.get("adafactor_clipping_threshold", 1.0)),
            "eps": (float(train.get("adafactor_epsilon1", 1e-30)),
                    float(train.get("adafactor_epsilon2", 1e-3)))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers.optimization import Adafactor

    doc = load_config(args.config, args.set)
    m = export_hf.resolve_model(doc.get("model"))
    data = dict(export_hf.DATA_DEFAULTS)
    data.update({k: v for k, v in (doc.get("data") or {}).items() if k in data})
    train = doc.get("train") or {}
    batch = int(train.get("batch_size", 8))
    cfg = export_hf.hf_config(m, data, 0, args.config)
    cfg.pop("switcht5", None)
    dense = export_hf.is_dense(m)
    if not dense:
        cfg["expert_capacity"] = max(1, math.ceil(m["capacity_factor"] * data["inputs_length"]
                                                  / m["num_experts"] - 1e-9))
    for k in ("architectures", "model_type", "torch_dtype"):
        cfg.pop(k, None)
    if dense:
        model_cls, cfg_cls = transformers.T5ForConditionalGeneration, transformers.T5Config
    else:
        model_cls = transformers.SwitchTransformersForConditionalGeneration
        cfg_cls = transformers.SwitchTransformersConfig
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**cfg)).train()
    params = sum(p.numel() for p in model.parameters())
    # SwitchT5's optimizer and learning rate at each step (bench_step's), so that both models'
    # routing evolves under the same kind of steps: HF's experts run on the kept tokens only,
    # and a collapsed routing (as lr 1.0 without the parameter scale gives) makes them cheaper.
    opt = Adafactor(model.parameters(), lr=lr_at(train, 1), **adafactor_options(train))
    taken = [0]
    run = torch.compile(model) if args.compile else model
    V, Ti, Tt = m["vocab_size"], data["inputs_length"], data["targets_length"]
    gen = torch.Generator().manual_seed(1)
    kwargs = {} if dense else {"output_router_logits": True}

    def step():
        inp = torch.randint(3, V - 100, (batch, Ti), generator=gen)
        lab = torch.randint(3, V - 100, (batch, Tt), generator=gen)
        taken[0] += 1
        for grp in opt.param_groups:
            grp["lr"] = lr_at(train, taken[0])
        t0 = time.perf_counter()
        out = run(input_ids=inp, labels=lab, **kwargs)
        out.loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if not math.isfinite(float(out.loss.detach())):
            raise SystemExit(f"hf_step: non-finite loss {float(out.loss.detach())}")
        return (t2 - t0) * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3

    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    ms = sorted(t[0] for t in times)
    med = statistics.median(ms)
    tokens = batch * (Ti + Tt)
    blas = next((l.split("BLAS_INFO=")[1].split(",")[0] for l in torch.__config__.show().splitlines()
                 if "BLAS_INFO=" in l), "?")
    r = {
        "contender": "hf-compile" if args.compile else "hf-eager",
        "config": args.config, "sets": args.set, "model": model_cls.__name__,
        "batch": batch, "inputs_length": Ti, "targets_length": Tt,
        "expert_capacity": cfg.get("expert_capacity"), "steps": args.steps, "warmup": args.warmup,
        "ms_median": med, "ms_min": ms[0], "ms_max": ms[-1],
        "forward_backward_ms_median": statistics.median(t[1] for t in times),
        "optimizer_ms_median": statistics.median(t[2] for t in times),
        "tokens_per_s": tokens / (med * 1e-3),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "params": params, "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "blas": blas,
        "allocator": os.path.basename(os.environ.get("LD_PRELOAD", "")) or "glibc malloc",
    }
    print(f"{r['contender']} {os.path.basename(args.config)} {' '.join(args.set)}: median {med:.1f} ms/step "
          f"(min {ms[0]:.1f}), {r['tokens_per_s']:.0f} tokens/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
          f"torch {torch.__version__} threads {r['threads']} {r['allocator']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f)
            f.write("\n")


if __name__ == "__main__":
    main()
