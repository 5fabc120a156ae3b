#!/usr/bin/env python3
"""bench/run.sh's driver (standard library only): runs the contenders of every comparison
alternately, repeats the round, and writes the results as JSON and a markdown table.

    bench/run.py [--quick] [--repeats N] [--out STEM] [--hf-python PY] [--gpu-json FILE]
                 [--only GROUP,...] [--readme]

A case is one contender on one config: `bench_step` (switcht5, the exact Trainer::train_step)
or bench/hf_step.py (HuggingFace in PyTorch), each a fresh process that warms up and then times
its steps; its number is the median step. Rounds run every case once, in order, so that a
drift of the machine (another job, thermal) falls on every contender alike; a case's result is
the median over rounds of its medians, with the spread (min, max) beside it. Threads: every
single-process case gets OMP_NUM_THREADS = the cores (torch.set_num_threads follows it); the
2-rank case gets cores / 2 per rank. Cases whose contender is missing (no HF Python, no torch)
are reported as not run, with the reason.

Groups (full; --quick keeps the first of each and fewer steps):
  hf        bench-small: switcht5 vs HF eager and HF torch.compile (jemalloc preloaded for HF
            where installed: its fastest CPU setting), then switch-base-8 dimensions at batch 2
  moe       bench-small switch-8 vs the dense model of the same d_ff (equal FLOPs per token:
            top-1 runs one expert), fp32 and bf16
  experts   bench-small with 8, 32 and 128 experts (equal FLOPs per token)
  np        bench-small on 1 process vs 2 ranks (parallel.data=2, expert=2) under mpirun
  paired    the two ratio targets measured inside one process (bench_step --versus: the two
            models' steps alternate, the ratio is taken per step pair): switch-8 / dense and
            128 / 8 experts. Separate processes of one binary differ by up to 1.7x on a shared
            VM; a pair of steps seconds apart sees the same machine. Both again with
            model.router_force_balance (top-1 uniform at random): the CPU skips empty capacity
            rows, so the ratios depend on the routing; the forced rows say what exact balance
            gives, beside bench-small's own (1-15% dropped in its first 30 steps).
  gpu       the rows of scripts/bench_gpu.sh's bench_gpu.json (--gpu-json), when given
"""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SMALL = "configs/bench-small.yaml"
BASE8 = "configs/switch-base-8.yaml"
# The dense model of bench-small: the same blocks, every FFN dense with d_ff = one expert's.
DENSE = ["model.num_experts=0", "model.encoder_sparse_step=0", "model.decoder_sparse_step=0"]
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
# Benchmarks only: top-1 routing uniform at random (model.router_force_balance).
BALANCED = "model.router_force_balance=true"


def cores():
    return os.cpu_count() or 1


def case(group, name, kind, config, sets=(), np=1, hf_compile=False, steps=None, warmup=None,
         gemm_shapes=False, allocator=None, versus=()):
    return {"group": group, "name": name, "kind": kind, "config": config, "sets": list(sets),
            "np": np, "compile": hf_compile, "steps": steps, "warmup": warmup,
            "gemm_shapes": gemm_shapes, "allocator": allocator, "versus": list(versus)}


def hf_allocators(c):
    """An HF case once per allocator: glibc's malloc, and jemalloc where installed. Which is
    PyTorch's faster depends on the machine (jemalloc on one, glibc by 15-45% on another), so both
    run and the peer is credited with its best."""
    if not os.path.exists(JEMALLOC):
        return [dict(c, allocator="glibc")]
    return [dict(c, name=f"{c['name']} ({a})", allocator=a) for a in ("glibc", "jemalloc")]


def cases(quick):
    c = [case("hf", "switcht5 bench-small", "switcht5", SMALL, gemm_shapes=True)]
    c += hf_allocators(case("hf", "HF eager bench-small", "hf", SMALL))
    if not quick:
        c += hf_allocators(case("hf", "HF torch.compile bench-small", "hf", SMALL, hf_compile=True,
                                warmup=3))
        # switch-base-8.yaml reads C4 shards; synthetic span corruption has the same shapes.
        b2 = ["train.batch_size=2", "data.source=synthetic", "data.task=span_corruption"]
        c += [case("hf", "switcht5 switch-base-8 b2", "switcht5", BASE8, b2, steps=3, warmup=1)]
        c += hf_allocators(case("hf", "HF eager switch-base-8 b2", "hf", BASE8, b2, steps=3,
                                warmup=1))
    c += [case("moe", "switch-8 fp32", "switcht5", SMALL),
          case("moe", "dense fp32", "switcht5", SMALL, DENSE)]
    if not quick:
        c += [case("moe", "switch-8 bf16", "switcht5", SMALL, ["train.precision=bf16"]),
              case("moe", "dense bf16", "switcht5", SMALL, DENSE + ["train.precision=bf16"])]
    for e in ([8, 32] if quick else [8, 32, 128]):
        c.append(case("experts", f"{e} experts", "switcht5", SMALL, [f"model.num_experts={e}"]))
    c += [case("np", "np=1", "switcht5", SMALL),
          case("np", "np=2 (D2, E2)", "switcht5", SMALL, ["parallel.data=2", "parallel.expert=2"], np=2)]
    # Ratio = the versus model over the first: switch-8 over dense, 128 over 8 experts.
    paired_steps = 6 if quick else 10
    c += [case("paired", "switch-8 / dense (fp32)", "switcht5", SMALL, DENSE, steps=paired_steps,
               versus=["model.num_experts=8", "model.encoder_sparse_step=2",
                       "model.decoder_sparse_step=2"])]
    if not quick:
        c += [case("paired", "128 / 8 experts (fp32)", "switcht5", SMALL, steps=paired_steps,
                   versus=["model.num_experts=128"])]
        # The CPU's expert products skip empty capacity rows, so the ratios depend on how the
        # routing fills them: the same ratios with top-1 forced uniform at random as well.
        c += [case("paired", "switch-8 / dense (fp32, balanced routing)", "switcht5", SMALL, DENSE,
                   steps=paired_steps,
                   versus=["model.num_experts=8", "model.encoder_sparse_step=2",
                           "model.decoder_sparse_step=2", BALANCED]),
              case("paired", "128 / 8 experts (fp32, balanced routing)", "switcht5", SMALL,
                   [BALANCED], steps=paired_steps, versus=["model.num_experts=128"])]
    return c


def shown(cmd, out):
    """The command as recorded in the results: paths relative to the checkout, the per-case
    temporary JSON as OUT.json, so that results name no machine's directories."""
    rel = [os.path.relpath(a, ROOT) if os.path.isabs(a) and a.startswith(ROOT + os.sep) else a
           for a in cmd]
    return shlex.join(rel).replace(out, "OUT.json")


def machine():
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cores": cores(), "kernel": platform.release()}
    try:
        cpu = open("/proc/cpuinfo").read()
        info["cpu"] = re.search(r"model name\s*:\s*(.*)", cpu).group(1).strip()
        flags = set(re.search(r"flags\s*:\s*(.*)", cpu).group(1).split())
        info["cpu_flags"] = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw",
                                          "avx512_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    except (OSError, AttributeError):
        info["cpu"] = "unknown"
    try:
        load = open("/proc/loadavg").read().split()[:3]
        info["loadavg_before"] = " ".join(load)
    except OSError:
        pass
    # The GEMM library of switcht5's CPU backend: oneDNN, by the package that provides it.
    p = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version}\n", "libdnnl*"],
                       capture_output=True, text=True)
    info["switcht5_gemm"] = ("oneDNN " + " / ".join(l for l in p.stdout.split("\n") if l and "dev" not in l)
                             if p.returncode == 0 else "oneDNN (version unknown)")
    return info


def run_case(c, args, tmp):
    """One run of case c; returns its result dict, or {"error": ...}."""
    quick = args.quick
    steps = c["steps"] or (3 if quick else 6)
    warmup = c["warmup"] or (1 if quick else 2)
    out = os.path.join(tmp, "r.json")
    if os.path.exists(out):
        os.remove(out)
    env = dict(os.environ)
    threads = max(1, cores() // c["np"])
    env["OMP_NUM_THREADS"] = str(threads)
    if c["kind"] == "switcht5":
        cmd = [os.path.join(args.build, "bench_step"), c["config"], "--steps", str(steps),
               "--warmup", str(warmup), "--json", out]
        for s in c["sets"]:
            cmd += ["--set", s]
        if c["gemm_shapes"]:
            cmd.append("--gemm-shapes")
        for v in c["versus"]:
            cmd += ["--versus", v]
        if c["np"] > 1:
            cmd = ["bash", "scripts/mpirun.sh", "-np", str(c["np"])] + cmd
    else:
        if not args.hf_python:
            return {"error": "no HF Python environment (bench/python_env.sh makes build/benchenv)"}
        cmd = [args.hf_python, "bench/hf_step.py", c["config"], "--steps", str(steps), "--warmup",
               str(warmup), "--json", out]
        for s in c["sets"]:
            cmd += ["--set", s]
        if c["compile"]:
            cmd.append("--compile")
        if c["allocator"] == "jemalloc":
            env["LD_PRELOAD"] = JEMALLOC
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.case_timeout)
    if p.returncode != 0 or not os.path.exists(out):
        tail = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or [""]
        return {"error": f"exit {p.returncode}: {tail[0][:300]}", "command": shown(cmd, out)}
    with open(out) as f:
        r = json.load(f)
    r["command"] = shown(cmd, out)
    r["threads"] = threads
    return r


def summarize(c, runs):
    ok = [r for r in runs if "error" not in r]
    s = {k: c[k] for k in ("group", "name", "kind", "config", "sets", "np", "compile")}
    s["runs"] = runs
    if not ok:
        s["error"] = runs[-1]["error"] if runs else "not run"
        return s
    med = [r["ms_median"] for r in ok]
    s["ms"] = statistics.median(med)
    s["ms_spread"] = [min(med), max(med)]
    for k in ("forward_backward_ms_median", "optimizer_ms_median", "peak_rss_mb", "params",
              "tokens_per_s", "achieved_gflops", "useful_gflops", "gemm_ffn_gflops",
              "gemm_square_gflops", "paired_peak_fraction"):
        vals = [r[k] for r in ok if isinstance(r.get(k), (int, float))]
        if vals:
            s[k] = statistics.median(vals)
    for k in ("torch", "transformers", "blas", "allocator", "expert_capacity", "batch",
              "inputs_length", "targets_length", "gemm_shapes"):
        if k in ok[-1]:
            s[k] = ok[-1][k]
    # --versus: per round, the median over step pairs of versus / first; over rounds, the
    # median and the spread.
    vs = [r["versus"] for r in ok if isinstance(r.get("versus"), dict) and r["versus"].get("pairs")]
    if vs:
        s["versus"] = {"sets": vs[-1]["sets"]}
        for k in ("forward_backward_ratio_median", "optimizer_ratio_median", "step_ratio_median"):
            vals = [v[k] for v in vs]
            s["versus"][k] = statistics.median(vals)
            s["versus"][k + "_spread"] = [min(vals), max(vals)]
    return s


def fmt_ms(s):
    if "error" in s:
        return "not run"
    lo, hi = s["ms_spread"]
    return f"{s['ms']:.0f} ({lo:.0f}-{hi:.0f})"


def hf_best(rows):
    """Per config, switcht5 against the fastest HF row (allocator and torch.compile included)."""
    L = []
    for r in rows:
        if r["kind"] != "switcht5" or "ms" not in r:
            continue
        peers = [p for p in rows if p["kind"] == "hf" and p["config"] == r["config"]
                 and p["sets"] == r["sets"] and "ms" in p]
        if peers:
            best = min(peers, key=lambda p: p["ms"])
            L.append(f"{r['name']}: HF's fastest setting here is {best['name']} at {best['ms']:.0f} ms, "
                     f"{best['ms'] / r['ms']:.2f}x switcht5's {r['ms']:.0f} ms.")
    return L + [""] if L else []


def where_time_goes(rows):
    """The GEMM split of the rows that ran with --gemm-shapes (their last run): all GEMMs against
    the rest of the step, and the slowest shapes."""
    L = []
    for r in rows:
        g = r.get("gemm_shapes")
        if not g or "ms" not in r:
            continue
        gemm, step, peak = g["gemm_ms_per_step"], r["runs"][-1]["ms_median"], r["gemm_ffn_gflops"]
        L += [f"Where {r['name']}'s step goes (bench_step --gemm-shapes, last round): GEMMs "
              f"{gemm:.0f} ms of {step:.0f} ms ({100 * gemm / step:.0f}%) at {g['gemm_gflops']:.0f} "
              f"GFLOP/s ({100 * g['gemm_gflops'] / peak:.0f}% of the FFN-shape peak); everything "
              f"else {step - gemm:.0f} ms ({100 * (step - gemm) / step:.0f}%). Slowest shapes:", "",
              "| op | M | N | K | batch | calls | ms | GFLOP/s | of peak |", "|---|---|---|---|---|---|---|---|---|"]
        for x in g["shapes"][:8]:
            L.append(f"| {x['op']} | {x['M']} | {x['N']} | {x['K']} | {x['batch']} | "
                     f"{x['calls_per_step']:.0f} | {x['ms_per_step']:.1f} | {x['gflops']:.0f} | "
                     f"{100 * x['gflops'] / peak:.0f}% |")
        L.append("")
    return L


def markdown(results, info, args):
    L = [f"# bench/run.sh{' --quick' if args.quick else ''}: {info['date']}", "",
         f"Machine: {info['cpu']}, {info['cores']} cores, flags {' '.join(info.get('cpu_flags', []))}, "
         f"kernel {info['kernel']}, load average before {info.get('loadavg_before', '?')}. "
         f"switcht5's GEMM: {info['switcht5_gemm']} (its CPU backend). Rounds: {args.repeats}, "
         "contenders alternating; a cell is the median over rounds of each run's median step, "
         "(min-max over rounds). GFLOP/s: the executed matmul FLOPs (as switcht5's CPU backend "
         "counted them: its expert products skip the empty capacity slots) per second, the GEMM "
         "peak measured in the same run, the useful rate "
         "(each token through its top-1 expert once, the model's FLOPs), and paired: the median "
         "over steps of each step's rate against the GEMM peak sampled right after it (robust to a "
         "drifting machine).", ""]
    hf = [r for r in results if "torch" in r]
    if hf:
        h = hf[0]
        L += [f"HF: torch {h['torch']} (BLAS {h.get('blas', '?')}), transformers {h['transformers']}, "
              f"allocator {', '.join(sorted({r.get('allocator', '?') for r in hf}))} (as each row "
              f"says), fp32, Adafactor, router losses on, expert_capacity "
              f"{h.get('expert_capacity')} (training capacity of an input sequence).", ""]
    by = {}
    for r in results:
        by.setdefault(r["group"], []).append(r)
    titles = {"hf": "SwitchT5 vs HuggingFace (CPU, fp32)", "moe": "MoE overhead: switch-8 vs dense at equal FLOPs per token",
              "experts": "Experts at equal FLOPs per token (bench-small)", "np": "One process vs two ranks",
              "paired": "The ratio targets in one process (steps alternating, ratio per step pair)"}
    for g, rows in by.items():
        if g == "paired":
            L += paired_table(rows, titles[g])
            continue
        ref = rows[0]
        L += [f"## {titles.get(g, g)}", "",
              "| case | ms/step | vs first | fwd+bwd ms | update ms | tokens/s | GFLOP/s (GEMM peak) | peak RSS MB | params |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ratio = f"{r['ms'] / ref['ms']:.2f}x" if "ms" in r and "ms" in ref else ""
            gf = (f"{r['achieved_gflops']:.0f} ({r['gemm_ffn_gflops']:.0f})"
                  if "achieved_gflops" in r and "gemm_ffn_gflops" in r else "")
            if "useful_gflops" in r and gf:
                gf += f", useful {r['useful_gflops']:.0f}"
            if r.get("paired_peak_fraction", -1) > 0 and gf:
                gf += f", paired {100 * r['paired_peak_fraction']:.0f}%"
            fb = f"{r['forward_backward_ms_median']:.0f}" if "forward_backward_ms_median" in r else ""
            op = f"{r['optimizer_ms_median']:.0f}" if "optimizer_ms_median" in r else ""
            tps = f"{r['tokens_per_s']:.0f}" if "tokens_per_s" in r else ""
            rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else ""
            par = f"{r['params'] / 1e6:.1f}M" if "params" in r else ""
            err = f" ({r['error']})" if "error" in r else ""
            L.append(f"| {r['name']}{err} | {fmt_ms(r)} | {ratio} | {fb} | {op} | {tps} | {gf} | {rss} | {par} |")
        L.append("")
        L += hf_best(rows)
        L += where_time_goes(rows)
        if g == "experts":
            ok = [r for r in rows if "forward_backward_ms_median" in r and "params" in r]
            if len(ok) >= 2:
                a, b = ok[0], ok[-1]
                L += [f"{a['name']} -> {b['name']}: whole step {b['ms'] / a['ms']:.2f}x, forward + backward "
                      f"{b['forward_backward_ms_median'] / a['forward_backward_ms_median']:.2f}x, update "
                      f"{b['optimizer_ms_median'] / a['optimizer_ms_median']:.2f}x "
                      f"({a['optimizer_ms_median'] * 1e6 / a['params']:.2f} -> "
                      f"{b['optimizer_ms_median'] * 1e6 / b['params']:.2f} ns per parameter).", ""]
    if args.gpu_json:
        L += ["## GPU (scripts/bench_gpu.sh)", "", f"From {args.gpu_json}:", "", "```",
              json.dumps(json.load(open(args.gpu_json)), indent=1)[:4000], "```", ""]
    else:
        L += ["GPU rows: none (no --gpu-json; run scripts/bench_gpu.sh on a GPU machine).", ""]
    return "\n".join(L)


def paired_table(rows, title):
    """The --versus cases: each ratio as the median over rounds (min-max over rounds) of each
    round's median over step pairs."""
    L = [f"## {title}", "", "| ratio | forward + backward | update | whole step |", "|---|---|---|---|"]
    for r in rows:
        v = r.get("versus")
        if not v:
            L.append(f"| {r['name']} ({r.get('error', 'not run')}) | | | |")
            continue
        cells = []
        for k in ("forward_backward_ratio_median", "optimizer_ratio_median", "step_ratio_median"):
            lo, hi = v[k + "_spread"]
            cells.append(f"{v[k]:.3f}x ({lo:.3f}-{hi:.3f})")
        L.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return L + [""]


def update_readme(md_path, table):
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    begin, end = "<!-- bench-run:begin -->", "<!-- bench-run:end -->"
    if begin not in text or end not in text:
        sys.exit(f"bench/run.py: README.md has no {begin} ... {end} block")
    # The tables' "## " headings one level down: the block sits under README's "## Benchmarks".
    tables = "\n".join("#" + line if line.startswith("## ") else line
                       for line in table.split("\n", 2)[2].split("\n"))
    body = f"{begin}\nLatest `bench/run.sh` ({os.path.relpath(md_path, ROOT)}):\n\n" + \
        tables + f"\n{end}"
    a, b = text.index(begin), text.index(end) + len(end)
    with open(path, "w") as f:
        f.write(text[:a] + body + text[b:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--out", help="output stem (default bench/results/DATE-run[-quick])")
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--hf-python")
    ap.add_argument("--gpu-json")
    ap.add_argument("--only", help="comma-separated groups")
    ap.add_argument("--readme", action="store_true", help="write the tables into README.md")
    ap.add_argument("--case-timeout", type=int, default=900)
    args = ap.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    todo = cases(args.quick)
    if args.only:
        keep = set(args.only.split(","))
        todo = [c for c in todo if c["group"] in keep]
    info = machine()
    runs = {i: [] for i in range(len(todo))}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.repeats):
            for i, c in enumerate(todo):
                r = run_case(c, args, tmp)
                runs[i].append(r)
                what = f"{r['ms_median']:.1f} ms" if "ms_median" in r else r["error"]
                print(f"round {rnd + 1}/{args.repeats} | {c['group']:7} | {c['name']:32} | {what}", flush=True)
    results = [summarize(c, runs[i]) for i, c in enumerate(todo)]
    stem = args.out or os.path.join(ROOT, "bench", "results",
                                    datetime.date.today().isoformat() + ("-run-quick" if args.quick else "-run"))
    with open(stem + ".json", "w") as f:
        json.dump({"machine": info, "quick": args.quick, "repeats": args.repeats, "results": results}, f, indent=1)
    table = markdown(results, info, args)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    if args.readme:
        update_readme(stem + ".md", table)
    return 1 if any("error" in r for r in results if r["kind"] == "switcht5") else 0


if __name__ == "__main__":
    sys.exit(main())
