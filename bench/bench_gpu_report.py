#!/usr/bin/env python3
"""Assembles scripts/bench_gpu.sh's measurements in OUTDIR into OUTDIR/bench_gpu.json and a
bench/results-style OUTDIR/bench_gpu.md, and prints the table.

  bench_gpu_report.py OUTDIR --chosen BATCH|none --quick 0|1 --config PATH

Exit status 1 when the memory check (memory_check: bench_step's measured backend peak against
OUTDIR/plan_bBATCH.json, `switcht5 plan --json` of the same run) fails or cannot be made.

MFU = model FLOPs per step / step time / peak. Model FLOPs per step are switcht5's own count
(src/model/flops.cpp, Trainer::step_flops, reported by bench_step as step_flops on a GPU backend,
which runs every capacity slot; on the CPU step_flops is what the backend counted and
capacity_flops this formula), used for HF too, so the
systems compare by time alone:
  step = 3 x forward   (backward = 2 x forward)
  forward = sum over blocks [attention + FFN] + LM head 2*B*Tt*D*V
  attention(Nq query, Nk key tokens, Tk keys per query) = 2*(2*Nq*D*HK + 2*Nk*D*HK) + 4*Nq*Tk*HK
            (self-attention, and cross-attention over the encoder in decoder blocks)
  dense FFN = 2*2*N*D*F;  Switch FFN = 2*N*D*E (router) + 2*2*(N/S)*C*E*D*F (experts over their
            whole capacity buffers: C = ceil(capacity_factor*S/E) per group of S tokens)
with N = B*T tokens of the stack, HK = heads*d_kv. Elementwise work is not counted."""
import argparse
import datetime
import json
import os

DATASHEET_TFLOPS = 989.0  # H100/H200 SXM dense bf16 (NVIDIA datasheet)
FORMULA = ("step FLOPs = 3 x forward matmul FLOPs (src/model/flops.cpp): attention "
           "2*(2*Nq*D*HK + 2*Nk*D*HK) + 4*Nq*Tk*HK per attention; dense FFN 4*N*D*F; Switch FFN "
           "2*N*D*E + 4*(N/S)*C*E*D*F (experts over full capacity buffers, C = ceil(capacity_factor*S/E)); "
           "LM head 2*B*Tt*D*V")


def read(out, name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def human(b):
    """Bytes as GB or MB (10^9, 10^6), two decimals."""
    if not isinstance(b, (int, float)):
        return "-"
    return f"{b / 1e9:.2f} GB" if abs(b) >= 1e9 else f"{b / 1e6:.2f} MB"


def memory_check(ours, plan):
    """bench_step's measured backend memory (ours["backend_memory"]) against `switcht5 plan
    --json` of the same config and overrides (plan), and cudaMemGetInfo's view of the device.

    Both sides count the same thing in the same units: the plan builds the run's step state on a
    sizing backend and rounds every request to the target backend's block (256 bytes in the CUDA
    arena, 64 on the CPU), and the backend counts its live blocks rounded the same way
    (Backend::MemoryCounts). So:
      held_peak (the most held outside transient op scratch) == plan total_bytes, and
      plan <= peak <= plan + transient_peak,
    where transient_peak is the CUDA backend's scratch for mixed-precision GEMMs and overlapping
    copies, allocated and freed inside one op: the plan leaves it out by design
    (train/memory_plan.h) and the backend measures it, so it is the one allowance above the plan
    (0 on the CPU, whose GEMM copies are host vectors). Tolerance on top of that: one block per
    live block (live_blocks x block_bytes, about 1 MB for switch-base-8 on cuda), because the plan
    is exact up to allocation alignment and no further: a rounding rule that drifted between the
    backend and the plan moves each block by less than one block, while a tensor the plan misses
    or invents is a real difference and fails the check."""
    if not ours:
        return None
    m = ours.get("backend_memory")
    if not isinstance(m, dict):
        return {"pass": False, "error": f"bench_step reports no backend memory count for "
                                        f"backend {ours.get('backend')}"}
    if not plan or "total_bytes" not in plan:
        return {"pass": False, "error": "no plan (switcht5 plan --json failed: see plan_b*.log)"}
    total, peak, held = plan["total_bytes"], m["peak_bytes"], m["held_peak_bytes"]
    transient = m["transient_peak_bytes"]
    tol = m["live_blocks"] * m["block_bytes"]
    held_ok = abs(held - total) <= tol
    peak_ok = total - tol <= peak <= total + transient + tol
    r = {"plan_total_bytes": total, "plan_counted_bytes": plan.get("counted_bytes"),
         "plan_kept_activations_bytes": plan.get("kept_activations_bytes"),
         "plan_activation_workspace_bytes": plan.get("activation_workspace_bytes"),
         "peak_bytes": peak, "held_peak_bytes": held, "transient_peak_bytes": transient,
         "peak_minus_plan_bytes": peak - total, "peak_minus_plan": (peak - total) / total,
         "held_minus_plan_bytes": held - total, "tolerance_bytes": tol,
         "live_blocks": m["live_blocks"], "block_bytes": m["block_bytes"],
         "measured_by": ("the CUDA arena's high-water mark" if ours.get("backend") == "cuda"
                         else f"the {ours.get('backend')} backend's count of its live blocks"),
         "pass": held_ok and peak_ok}
    r["summary"] = (f"plan {human(total)} vs peak {human(peak)} ({r['peak_minus_plan']:+.2%}; "
                    f"transient scratch {human(transient)}, held - plan {held - total:+d} B, "
                    f"tolerance {tol} B)")
    d = ours.get("device_memory")
    if isinstance(d, dict):
        r["device"] = dict(d, outside_arena_bytes=d["used_bytes"] - d["arena_bytes"],
                           arena_unused_at_peak_bytes=d["arena_bytes"] - peak,
                           plan_arena_limit_bytes=plan.get("arena_limit_bytes"))
        r["summary"] += (f"; device used {human(d['used_bytes'])} of {human(d['total_bytes'])} "
                         f"(arena {human(d['arena_bytes'])})")
    return r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--chosen", default="none")
    p.add_argument("--quick", default="0")
    p.add_argument("--config", default="configs/switch-base-8.yaml")
    a = p.parse_args()
    out = a.out
    ours = read(out, f"bench_step_b{a.chosen}.json") if a.chosen != "none" else {}
    plan = read(out, f"plan_b{a.chosen}.json") if a.chosen != "none" else {}
    memory = memory_check(ours, plan)
    gemm = read(out, "gemm_peak.json")
    hf = {m: read(out, f"hf_{m}.json") for m in ("eager", "compile")}
    ver = read(out, "cuda_versions.json")
    try:
        gpu_line = open(os.path.join(out, "gpu.txt")).read().strip()
    except OSError:
        gpu_line = ""
    tried = sorted((int(f[len("bench_step_b"):-4]) for f in os.listdir(out)
                    if f.startswith("bench_step_b") and f.endswith(".log")), reverse=True)
    flops = ours.get("step_flops")
    peak_measured = gemm.get("tflops")

    def mfu(ms, peak_tflops):
        if not (isinstance(ms, (int, float)) and ms > 0 and flops and peak_tflops):
            return None
        return flops / (ms * 1e-3) / (peak_tflops * 1e12)

    rows = []
    if ours:
        rows.append({"system": f"switcht5 {ours.get('backend')} {ours.get('precision')}",
                     "batch": ours.get("batch"), "ms": ours.get("ms_median"),
                     "tokens_per_s": ours.get("tokens_per_s"),
                     "memory_mb": ours.get("device_peak_mb") if ours.get("device_peak_mb", -1) > 0
                     else ours.get("peak_rss_mb"), "note": ""})
    graphs = read(out, "bench_step_graphs.json")
    if graphs:
        rows.append({"system": f"switcht5 {graphs.get('backend')} {graphs.get('precision')} "
                               "+ CUDA graphs",
                     "batch": graphs.get("batch"), "ms": graphs.get("ms_median"),
                     "tokens_per_s": graphs.get("tokens_per_s"),
                     "memory_mb": graphs.get("device_peak_mb"), "note": "train.cuda_graphs"})
    for m, h in hf.items():
        note = h.get("error") or h.get("skipped") or ""
        if h.get("router_losses") is False:
            note = ("router losses OFF (output_router_logits=True failed: "
                    f"{h.get('router_losses_error', '?')})")
        rows.append({"system": f"HF {m} bf16", "batch": h.get("batch"), "ms": h.get("ms_median"),
                     "tokens_per_s": h.get("tokens_per_s"), "memory_mb": h.get("peak_memory_mb"),
                     "note": note})
    for r in rows:
        r["mfu_measured"] = mfu(r["ms"], peak_measured)
        r["mfu_datasheet"] = mfu(r["ms"], DATASHEET_TFLOPS)

    # `switcht5 plan`'s predicted step time for this run (train/comm_plan.h: compute at 40% of
    # 989 TFLOP/s on one GPU, nothing to communicate) against the measured one.
    predicted = (plan.get("predicted") or {}).get("step_seconds")
    prediction = {}
    if isinstance(predicted, (int, float)) and isinstance(ours.get("ms_median"), (int, float)):
        prediction = {"predicted_ms": predicted * 1e3, "measured_ms": ours["ms_median"],
                      "measured_over_predicted": ours["ms_median"] / (predicted * 1e3)}

    torch_v = next((h for h in [gemm, *hf.values()] if h.get("torch")), {})
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": a.config, "quick": a.quick == "1", "batches_tried": tried,
        "chosen_batch": None if a.chosen == "none" else int(a.chosen),
        "gpu": gpu_line, "cuda": ver, "torch": torch_v.get("torch"),
        "torch_cuda": torch_v.get("torch_cuda"), "transformers": torch_v.get("transformers"),
        "step_flops": flops, "flops_formula": FORMULA,
        "peak_measured_tflops": peak_measured, "peak_measured_how": gemm.get("what"),
        "peak_datasheet_tflops": DATASHEET_TFLOPS,
        "switcht5": ours, "hf": hf, "gemm": gemm, "rows": rows, "memory": memory, "plan": plan,
        "step_prediction": prediction,
    }
    with open(os.path.join(out, "bench_gpu.json"), "w") as f:
        json.dump(report, f, indent=1)

    head = ("| system | batch | ms/step (median) | tokens/s | MFU (measured peak) | "
            "MFU (989 TFLOP/s) | peak memory MB | note |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['batch'] if r['batch'] is not None else '-'} | "
                     f"{fmt(r['ms'], '.1f')} | {fmt(r['tokens_per_s'], '.0f')} | "
                     f"{fmt(r['mfu_measured'], '.1%')} | {fmt(r['mfu_datasheet'], '.1%')} | "
                     f"{fmt(r['memory_mb'], '.0f')} | {r['note']} |")
    table = "\n".join(lines)
    name = os.path.splitext(os.path.basename(a.config))[0]
    md = f"""# {name} training step: switcht5 {ours.get('backend', 'cuda')} vs HuggingFace Switch-Base-8 ({report['date'][:10]})

Machine: {gpu_line or 'no GPU'}; CUDA runtime {ver.get('runtime')}, driver supports CUDA
{ver.get('driver_cuda')}, cuBLAS {ver.get('cublas')} (cuBLASLt {ver.get('cublasLt')}); torch
{report['torch']} (CUDA {report['torch_cuda']}), transformers {report['transformers']}.
Command: `scripts/bench_gpu.sh OUTDIR{' --quick' if report['quick'] else ''}` ({a.config},
train.backend={ours.get('backend', 'cuda')}, train.precision={ours.get('precision', 'bf16')}, synthetic
T5 span corruption, {ours.get('inputs_length', 512)} input + {ours.get('targets_length', 114)} target tokens).
Batch: the largest of {tried} that fit: {a.chosen}. switcht5: median of {ours.get('steps', '-')}
steps after {ours.get('warmup', '-')} warm-up (bench_step). HF: SwitchTransformersForConditionalGeneration
from a config with the same dimensions (random init, bf16 weights and Adafactor state), forward +
backward + Adafactor step timed with CUDA events, median of {hf['eager'].get('steps', '-')} after warm-up.

{table}

- Model FLOPs per step: {fmt(flops, '.4g')} ({FORMULA}). The same count is used for HF.
- Measured bf16 peak: {fmt(peak_measured, '.0f')} TFLOP/s ({gemm.get('what', gemm.get('skipped', 'not measured'))});
  switcht5's own bf16 GEMM (bench_step, cuBLASLt through the backend): {fmt((ours.get('gemm_square_gflops') or 0) * 1e-3, '.3g')} TFLOP/s
  at {ours.get('gemm_square', '-')}^3, {fmt((ours.get('gemm_ffn_gflops') or 0) * 1e-3, '.3g')} TFLOP/s on the FFN shape {ours.get('gemm_ffn_shape', '-')}.
- switcht5 keeps fp32 master weights, gradients and Adafactor state with bf16 compute copies; HF
  runs everything in bf16. HF's expert capacity is fixed ({hf['eager'].get('expert_capacity', 80)} per sequence, every
  Switch layer); switcht5 derives it per stack from capacity factor 1.25.
- Host synchronisations per switcht5 step: {ours.get('host_syncs_per_step', '-')}.
"""
    if prediction:
        md += (f"\n## Step time: planned vs measured\n\n`switcht5 plan` predicted "
               f"{prediction['predicted_ms']:.1f} ms (the step's FLOPs at 40% of 989 TFLOP/s; one "
               f"GPU, nothing to communicate); measured {prediction['measured_ms']:.1f} ms "
               f"({prediction['measured_over_predicted']:.2f}x the prediction).\n")
    md += memory_markdown(memory, ours)
    with open(os.path.join(out, "bench_gpu.md"), "w") as f:
        f.write(md)
    print(table)
    print(f"step FLOPs {fmt(flops, '.4g')}; measured bf16 peak {fmt(peak_measured, '.0f')} TFLOP/s; "
          f"report: {os.path.join(out, 'bench_gpu.md')}")
    if memory is not None:
        verdict = "PASS" if memory["pass"] else "FAIL"
        print(f"memory vs plan: {verdict}: {memory.get('summary', memory.get('error'))}")
        if not memory["pass"]:
            return 1
    return 0


def memory_markdown(memory, ours):
    if memory is None:
        return ""
    if "error" in memory:
        return f"\n## Memory: planned vs measured\n\nFAIL: {memory['error']}\n"
    rows = [
        ("plan total (`switcht5 plan --json`, same config and overrides)", memory["plan_total_bytes"]),
        ("  of which activations kept for backward", memory["plan_kept_activations_bytes"]),
        ("  of which activation workspace", memory["plan_activation_workspace_bytes"]),
        (f"measured peak ({memory['measured_by']})", memory["peak_bytes"]),
        ("  held outside transient op scratch", memory["held_peak_bytes"]),
        ("  transient op scratch at most (not in the plan by design)", memory["transient_peak_bytes"]),
    ]
    d = memory.get("device")
    if d:
        rows += [
            ("device: used after the steps (cudaMemGetInfo)", d["used_bytes"]),
            ("  the arena's reservation", d["arena_bytes"]),
            ("  outside the arena (context, modules, cuBLASLt handle, other processes)",
             d["outside_arena_bytes"]),
            ("  arena left unused at the peak", d["arena_unused_at_peak_bytes"]),
            ("device: total", d["total_bytes"]),
        ]
    table = "\n".join(f"| {k} | {v} | {human(v)} |" for k, v in rows)
    verdict = "PASS" if memory["pass"] else "FAIL"
    return f"""
## Memory: planned vs measured ({ours.get('backend')}, {ours.get('precision')}, batch {ours.get('batch')})

{verdict}: peak - plan = {memory['peak_minus_plan_bytes']:+d} bytes ({memory['peak_minus_plan']:+.3%}); held - plan =
{memory['held_minus_plan_bytes']:+d} bytes. The check: held == plan and plan <= peak <= plan + transient scratch,
each within {memory['tolerance_bytes']} bytes ({memory['live_blocks']} live blocks x {memory['block_bytes']} bytes: the plan is exact up to
allocation alignment; bench/bench_gpu_report.py memory_check says why).

| what | bytes | |
| --- | --- | --- |
{table}
"""


if __name__ == "__main__":
    raise SystemExit(main())
