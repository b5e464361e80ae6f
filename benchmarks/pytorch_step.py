#!/usr/bin/env python3
"""PyTorch's training step for mptrain's GPT shape, timed like bench_step, for a side-by-side comparison.

    python3 benchmarks/pytorch_step.py --device cpu --precision fp32 --threads 2 --json torch.json

The model is mptrain's (DESIGN.md): token + position embeddings, L pre-LN blocks (LayerNorm, causal
multi-head attention with a fused QKV projection and an output projection, residual; LayerNorm, MLP 4C with
tanh-GELU, residual), final LayerNorm, LM head tied to the token embedding over the vocabulary padded to a
multiple of 128, mean cross-entropy over the V real columns; the same initialisation rules. The optimizer is
torch.optim.AdamW with mptrain's defaults (lr 6e-3, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on 2-D tensors
only) after clipping the global grad norm to 1.0, as `mptrain train` does.

AdamW is the fused kernel (fused=True) where the torch version has it (CPU: 2.4 and later), else the default;
--compile runs the model through torch.compile (inductor), the warm-up steps absorbing the compilation.

Precisions: fp32; bf16 = torch.autocast(bfloat16) on CPU or CUDA; fp16amp (CUDA only: PyTorch has no CPU
FP16 GEMM) = torch.autocast(float16) + GradScaler (torch.amp, or torch.cuda.amp on older versions).
Attention uses F.scaled_dot_product_attention(is_causal=True) where the torch version has it (2.x), else the
explicit masked softmax (torch 1.13). Per iteration: forward (with the loss), backward, optimizer (unscale,
clip, AdamW, scaler update, zero_grad) and the whole step, timed with the host clock after
torch.cuda.synchronize() on CUDA; median/min/max over iterations. MFU uses 6N + 12*L*C*T FLOPs per token (PaLM
appendix B), N = all parameters, and a peak from --peak-tflops or, on the CPU, a measured FP32 1024^3 matmul at
the same thread count. One process: there is no gradient sync (grad_sync is reported as 0).
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


class Block(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.ln_1 = nn.LayerNorm(C, eps=1e-5)
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C, eps=1e-5)
        self.c_fc = nn.Linear(C, 4 * C)
        self.mlp_proj = nn.Linear(4 * C, C)

    def forward(self, x, mask):
        B, T, C = x.shape
        hs = C // self.NH
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, self.NH, hs).transpose(1, 2) for z in (q, k, v))
        if HAS_SDPA:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
            att = att.masked_fill(mask[:T, :T], float("-inf")).softmax(dim=-1)
            y = att @ v
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, V, T, L, C, NH):
        super().__init__()
        self.V = V
        Vp = (V + 127) // 128 * 128
        self.wte = nn.Embedding(Vp, C)
        self.wpe = nn.Embedding(T, C)
        self.h = nn.ModuleList(Block(C, NH) for _ in range(L))
        self.ln_f = nn.LayerNorm(C, eps=1e-5)
        self.register_buffer("mask", ~torch.ones(T, T, dtype=torch.bool).tril(), persistent=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "ln_" in name:
                    p.fill_(1.0)
                elif name.endswith("c_proj.weight") or name.endswith("mlp_proj.weight"):
                    p.normal_(0.0, 0.02 / math.sqrt(2 * L))
                else:
                    p.normal_(0.0, 0.02)
            self.wte.weight[V:].zero_()

    def forward(self, tokens, targets):
        T = tokens.shape[1]
        x = self.wte(tokens) + self.wpe.weight[:T]
        for block in self.h:
            x = block(x, self.mask)
        logits = F.linear(self.ln_f(x), self.wte.weight)[:, :, : self.V]
        return F.cross_entropy(logits.float().reshape(-1, self.V), targets.reshape(-1))


def make_grad_scaler():
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        try:
            return torch.amp.GradScaler("cuda")
        except TypeError:
            pass
    return torch.cuda.amp.GradScaler()


def summary(v):
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measured_cpu_peak(repeats=5):
    """FP32 matmul rate (FLOP/s) of 1024^3 at the current thread count: best of `repeats`."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * 1024**3 / best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16amp"], default="fp32")
    ap.add_argument("--layers", type=int, default=4, help="transformer blocks L")
    ap.add_argument("--channels", type=int, default=128, help="channels C")
    ap.add_argument("--heads", type=int, default=4, help="attention heads NH")
    ap.add_argument("--seq-len", type=int, default=128, help="sequence length T")
    ap.add_argument("--vocab", type=int, default=256, help="vocabulary size V")
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per forward B")
    ap.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step K")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (set explicitly)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps")
    ap.add_argument("--iters", type=int, default=10, help="timed steps")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="peak FLOP/s for MFU in TFLOP/s; 0 = measured FP32 matmul (CPU) or 989 (CUDA bf16 dense)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    ap.add_argument("--no-fused-adamw", dest="fused_adamw", action="store_false",
                    help="plain AdamW instead of the fused kernel (the default where torch has it)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--json", help="also write the JSON report to this file")
    a = ap.parse_args()
    for name in ("layers", "channels", "heads", "seq_len", "vocab", "micro_batch", "accumulation", "threads",
                 "iters"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        ap.error("--warmup must be >= 0")
    if a.channels % a.heads:
        ap.error("--heads must divide --channels")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if a.device == "cpu" and a.precision == "fp16amp":
        ap.error("--precision fp16amp needs --device cuda (PyTorch has no CPU FP16 GEMM)")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    model = GPT(a.vocab, a.seq_len, a.layers, a.channels, a.heads).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    adamw_kind = "plain"
    opt = None
    if a.fused_adamw:
        try:  # fused=True on the CPU since torch 2.4; older versions raise
            opt = torch.optim.AdamW(groups, lr=6e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
            adamw_kind = "fused"
        except (TypeError, RuntimeError, ValueError):
            opt = None
    if opt is None:
        opt = torch.optim.AdamW(groups, lr=6e-3, betas=(0.9, 0.95), eps=1e-8)
    step_model = torch.compile(model) if a.compile else model
    scaler = make_grad_scaler() if a.precision == "fp16amp" else None
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16amp": torch.float16}[a.precision]
    g = torch.Generator().manual_seed(a.seed)
    batches = [(torch.randint(0, a.vocab, (a.micro_batch, a.seq_len), generator=g).to(dev),
                torch.randint(0, a.vocab, (a.micro_batch, a.seq_len), generator=g).to(dev))
               for _ in range(a.accumulation)]

    def sync():
        if a.device == "cuda":
            torch.cuda.synchronize()

    samples = {k: [] for k in ("forward", "backward", "optimizer", "step", "loss_scaling")}
    loss_value = float("nan")
    for it in range(a.warmup + a.iters):
        sync()
        t0 = time.perf_counter()
        fwd = bwd = 0.0
        for tokens, targets in batches:
            sync()
            f0 = time.perf_counter()
            if amp_dtype is None:
                loss = step_model(tokens, targets)
            else:
                with torch.autocast(device_type=a.device, dtype=amp_dtype):
                    loss = step_model(tokens, targets)
            loss = loss / a.accumulation
            sync()
            f1 = time.perf_counter()
            (scaler.scale(loss) if scaler else loss).backward()
            sync()
            f2 = time.perf_counter()
            fwd += f1 - f0
            bwd += f2 - f1
        loss_value = loss.item() * a.accumulation
        o0 = time.perf_counter()
        scaling = 0.0
        if scaler:
            scaler.unscale_(opt)  # the inf/NaN check and the unscaling
            sync()
            scaling += time.perf_counter() - o0
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler:
            scaler.step(opt)
            sync()
            u0 = time.perf_counter()
            scaler.update()
            sync()
            scaling += time.perf_counter() - u0
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t1 = time.perf_counter()
        if it < a.warmup:
            continue
        samples["forward"].append(fwd)
        samples["backward"].append(bwd)
        samples["optimizer"].append(t1 - o0)
        samples["step"].append(t1 - t0)
        samples["loss_scaling"].append(scaling / (t1 - t0))

    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6.0 * n_params + 12.0 * a.layers * a.channels * a.seq_len
    if a.peak_tflops > 0:
        peak, peak_source = a.peak_tflops * 1e12, "--peak-tflops"
    elif a.device == "cpu":
        peak, peak_source = measured_cpu_peak(), "measured torch FP32 matmul 1024^3 at --threads"
    else:
        peak, peak_source = 989e12, "assumed H100/H200 dense bf16 989 TFLOP/s"
    tokens_per_step = a.micro_batch * a.accumulation * a.seq_len
    step = summary(samples["step"])
    report = {
        "benchmark": "pytorch_training_step",
        "config": {"device": a.device, "precision": a.precision, "layers": a.layers, "channels": a.channels,
                   "heads": a.heads, "seq_len": a.seq_len, "vocab": a.vocab, "micro_batch": a.micro_batch,
                   "accumulation": a.accumulation, "threads": a.threads, "warmup": a.warmup, "iters": a.iters,
                   "attention": "scaled_dot_product_attention" if HAS_SDPA else "masked softmax",
                   "adamw_kind": adamw_kind, "compile": a.compile, "torch_threads": torch.get_num_threads(),
                   "adamw": {"lr": 6e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
                             "grad_clip": 1.0}},
        "machine": {"host": platform.node(), "cpu_model": cpu_model(), "logical_cores": os.cpu_count(),
                    "threads": a.threads, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None},
        "parameters": n_params,
        "tokens_per_step": tokens_per_step,
        "step_seconds": step,
        "tokens_per_second": {"median": tokens_per_step / step["median"], "min": tokens_per_step / step["max"],
                              "max": tokens_per_step / step["min"]},
        "phases_seconds": {"forward": summary(samples["forward"]), "backward": summary(samples["backward"]),
                           "grad_sync": {"median": 0.0, "min": 0.0, "max": 0.0},
                           "optimizer": summary(samples["optimizer"])},
        "flops_per_token": flops_per_token,
        "flops_formula": "6N + 12*L*C*T per token (PaLM appendix B), N = all parameters",
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "mfu": tokens_per_step / step["median"] * flops_per_token / peak,
        "loss_scaling_overhead": statistics.median(samples["loss_scaling"]) if scaler else None,
        "loss_last_step": loss_value,
    }
    text = json.dumps(report, indent=2)
    print(text)
    print(f"pytorch_step {a.device} {a.precision}{' compiled' if a.compile else ''} threads={a.threads}: step {1e3 * step['median']:.1f} ms "
          f"(min {1e3 * step['min']:.1f} max {1e3 * step['max']:.1f}), "
          f"{report['tokens_per_second']['median']:.0f} tokens/s", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
