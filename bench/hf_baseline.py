#!/usr/bin/env python3
# Usage: python3 bench/hf_baseline.py cpu|cuda fp32|bf16   (needs torch and transformers)
# Measured on the lent H100 machine, transformers 5.17 / torch 2.11: see the closing note of
# issues 2-4. output_router_logits=True crashes in transformers 5.17's Switch loss, so the
# HF step runs without the router aux losses.
# PyTorch / HF SwitchTransformers baseline for configs/bench-small.yaml: one training step
# (forward + backward + Adafactor) on batch 8 x (512 inputs + 114 targets).
import sys, time, torch
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration
from transformers.optimization import Adafactor
dev = sys.argv[1]; dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2]]
torch.manual_seed(0)
cfg = SwitchTransformersConfig(vocab_size=32128, d_model=256, d_ff=1024, d_kv=64, num_heads=4,
    num_layers=4, num_decoder_layers=4, num_experts=8, expert_capacity=80, encoder_sparse_step=2,
    decoder_sparse_step=2, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, router_jitter_noise=0.01, feed_forward_proj="relu")
model = SwitchTransformersForConditionalGeneration(cfg).to(dev, dtype).train()
# configs/bench-small.yaml's optimizer: T5X's Adafactor (parameter scale), lr 1/sqrt(10^4).
opt = Adafactor(model.parameters(), lr=1e-2, scale_parameter=True, relative_step=False, warmup_init=False)
B = 8
inp = torch.randint(3, 32000, (B, 512), device=dev)
lab = torch.randint(3, 32000, (B, 114), device=dev)
def step():
    out = model(input_ids=inp, labels=lab)
    out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(3): step()
if dev == "cuda": torch.cuda.synchronize()
n = 10 if dev == "cuda" else 5
t = time.perf_counter()
for _ in range(n): step()
if dev == "cuda": torch.cuda.synchronize()
dt = (time.perf_counter() - t) / n
print(f"torch {torch.__version__} {dev} {sys.argv[2]} threads {torch.get_num_threads()}: {dt*1e3:.1f} ms/step, {B*(512+114)/dt:.0f} tokens/s, params {sum(p.numel() for p in model.parameters())}")
