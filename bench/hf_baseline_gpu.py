#!/usr/bin/env python3
"""GPU baselines for scripts/bench_gpu.sh (needs torch and transformers; no downloads).

  hf_baseline_gpu.py gemm --json FILE
      bf16 GEMM rate of this GPU through torch.matmul: C[n,n] = A[n,n] @ B[n,n], n = 8192, random
      operands (never zeros: they run faster), timed with CUDA events one product at a time
      after 5 warm-up products; median of 30. FLOPs 2 n^3. This is the measured peak that
      bench_gpu.sh divides by (besides the 989 TFLOP/s datasheet figure).

  hf_baseline_gpu.py hf --mode eager|compile --batch B [--inputs 512] [--targets 114]
                        [--warmup N] [--steps N] [--json FILE]
      HuggingFace SwitchTransformersForConditionalGeneration built from a config with
      configs/switch-base-8.yaml's dimensions (random init on the GPU, no download), in bf16
      (weights, activations and Adafactor state all bf16: HF has no fp32 master copy), one
      training step = forward (with labels) + backward + Adafactor step + zero_grad, timed with
      CUDA events around each step after warm-up; reports the median. The router losses are on
      (output_router_logits=True, HF's aux and z losses added to the loss); if that raises, the
      run repeats with them off and says so in the JSON ("router_losses": false, and the error).
      --mode compile wraps the model in torch.compile (default mode) and counts the compile in
      the warm-up. An out-of-memory error is reported as {"error": "out of memory"}.
"""
import argparse
import json
import statistics
import sys
import time
import traceback


def versions(torch):
    import transformers
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "gpu_memory_gb": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "cudnn": torch.backends.cudnn.version(),
    }


def gemm_peak(args):
    import torch
    n = 8192
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    for _ in range(5):
        torch.matmul(a, b)
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    t = statistics.median(times)
    out = {"what": "torch.matmul bf16 8192^3, random operands, CUDA events, median of 30",
           "tflops": 2 * n**3 / t * 1e-12, "ms_median": t * 1e3, "ms_min": min(times) * 1e3}
    out.update(versions(torch))
    return out


def hf_config(args):
    from transformers import SwitchTransformersConfig
    # configs/switch-base-8.yaml. HF takes one fixed expert_capacity for every Switch layer, per
    # sequence (its router's capacity mask is a cumulative sum over each sequence): the
    # encoder's 1.25 x 512 / 8 = 80, which is also what bench/hf_baseline.py uses.
    capacity = int(-(-1.25 * args.inputs // 8))
    return SwitchTransformersConfig(
        vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12,
        num_decoder_layers=12, num_experts=8, expert_capacity=capacity, encoder_sparse_step=2,
        decoder_sparse_step=2, relative_attention_num_buckets=32,
        relative_attention_max_distance=128, feed_forward_proj="relu", dropout_rate=0.1,
        layer_norm_epsilon=1e-6, router_jitter_noise=0.01, router_z_loss_coef=0.001,
        router_aux_loss_coef=0.01, tie_word_embeddings=True, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1), capacity


def hf_step_timing(args, router_losses):
    import torch
    from transformers import SwitchTransformersForConditionalGeneration
    from transformers.optimization import Adafactor
    torch.manual_seed(0)
    cfg, capacity = hf_config(args)
    cfg.output_router_logits = router_losses
    with torch.device("cuda"):
        model = SwitchTransformersForConditionalGeneration(cfg)
    model = model.to(torch.bfloat16).train()
    params = sum(p.numel() for p in model.parameters())
    # configs/switch-base-8.yaml's optimizer, t5x's Adafactor: decay 0.8 (HF's decay_rate=-0.8),
    # the parameter scale (scale_parameter, eps[1] = 1e-3), and the rsqrt schedule's lr before
    # step 10^4, 1/sqrt(10^4). HF's experts run on the kept tokens only, so the optimizer's
    # steps shape HF's cost through the routing, as they shape ours.
    opt = Adafactor(model.parameters(), lr=1e-2, decay_rate=-0.8, scale_parameter=True,
                    relative_step=False, warmup_init=False)
    run = torch.compile(model) if args.mode == "compile" else model
    B = args.batch
    inp = torch.randint(3, 32000, (B, args.inputs), device="cuda")
    lab = torch.randint(3, 32000, (B, args.targets), device="cuda")

    def step():
        out = run(input_ids=inp, labels=lab, output_router_logits=router_losses)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    t = statistics.median(times)
    return {"mode": args.mode, "batch": B, "inputs_length": args.inputs,
            "targets_length": args.targets, "expert_capacity": capacity, "params": params,
            "router_losses": router_losses, "warmup_steps": args.warmup, "steps": args.steps,
            "warmup_s": warmup_s, "ms_median": t * 1e3, "ms_min": min(times) * 1e3,
            "ms_max": max(times) * 1e3, "tokens_per_s": B * (args.inputs + args.targets) / t,
            "last_loss": float(loss), "peak_memory_mb": torch.cuda.max_memory_allocated() / 1e6}


def hf(args):
    import torch
    out = {}
    try:
        out = hf_step_timing(args, router_losses=True)
    except torch.cuda.OutOfMemoryError:
        out = {"error": "out of memory"}
    except Exception as e:  # HF's router-loss path has crashed before (transformers 5.17)
        err = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        traceback.print_exc()
        print(f"output_router_logits=True failed ({err}); again without the router losses",
              file=sys.stderr)
        torch.cuda.empty_cache()
        try:
            out = hf_step_timing(args, router_losses=False)
        except torch.cuda.OutOfMemoryError:
            out = {"error": "out of memory"}
        out["router_losses_error"] = err
    out.setdefault("mode", args.mode)
    out.setdefault("batch", args.batch)
    out.update(versions(torch))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["gemm", "hf"])
    p.add_argument("--mode", choices=["eager", "compile"], default="eager")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=512)
    p.add_argument("--targets", type=int, default=114)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json")
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("hf_baseline_gpu: no GPU visible to torch", file=sys.stderr)
        return 3
    out = gemm_peak(args) if args.what == "gemm" else hf(args)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())
