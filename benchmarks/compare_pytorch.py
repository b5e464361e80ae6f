#!/usr/bin/env python3
"""mptrain next to PyTorch on the same machine in one run: alternating bench_step and pytorch_step.py.

    bash benchmarks/setup_torch_venv.sh      # once: current PyTorch from PyPI in benchmarks/.venv-torch
    python3 benchmarks/compare_pytorch.py --threads 2 --repeats 5 --json benchmarks/results/compare_cpu.json

For every pair (mptrain precision, PyTorch variant) and every repeat, runs mptrain's bench_step, then
benchmarks/pytorch_step.py, with the same model shape, batch, AdamW hyper-parameters and thread count (passed
as --threads to both and as OMP_NUM_THREADS to both processes), one after the other so that both see the same
machine state. Prints each side's median tokens/s per repeat and the ratio mptrain/PyTorch (per repeat, then
min/median/max over repeats), checks the targets where a pair has one, and writes everything as JSON together
with the machine: `lscpu` (CPU model and flags: the ratios depend on the CPU), the load average before and
after every run, the torch version, and bench_step's share of the step spent in GEMM.

PyTorch runs from benchmarks/.venv-torch (bash benchmarks/setup_torch_venv.sh) when present: current PyTorch
from PyPI, with its fused AdamW. Debian's python3-torch (1.13) is only the fallback and is named in the JSON.

CPU pairs (default): fp32 vs fp32 eager, fp16 vs fp32 eager (PyTorch has no CPU FP16 GEMM), bf16 vs bf16
autocast eager, and, as extra rows without targets, fp32 and bf16 against torch.compile (suffix "+compile").
CUDA pairs (default with --device cuda): fp32 vs fp32, fp16 vs fp16amp (autocast + GradScaler), bf16 vs bf16.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VENV_PYTHON = os.path.join(HERE, ".venv-torch", "bin", "python")
# (mptrain precision, PyTorch variant, target ratio or None); variant = precision [+compile]
PAIRS = {"cpu": [("fp32", "fp32", 1.3), ("fp16", "fp32", 1.0), ("bf16", "bf16", 1.3),
                 ("fp32", "fp32+compile", None), ("bf16", "bf16+compile", None)],
         "cuda": [("fp32", "fp32", None), ("fp16", "fp16amp", None), ("bf16", "bf16", None)]}


def torch_args(variant):
    precision, _, extra = variant.partition("+")
    return ["--precision", precision] + (["--compile"] if extra == "compile" else [])


def load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def lscpu():
    try:
        return subprocess.run(["lscpu"], stdout=subprocess.PIPE, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        return f"lscpu failed: {e}"


def run_json(cmd, env):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        r = subprocess.run(cmd + ["--json", path], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
        if r.returncode != 0:
            sys.exit(f"compare_pytorch: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def default_python():
    """benchmarks/.venv-torch's python when it exists, else this interpreter when it has torch, else Debian's
    /usr/bin/python3 (python3-torch), else this one."""
    if os.access(VENV_PYTHON, os.X_OK):
        return VENV_PYTHON
    try:
        import torch  # noqa: F401
        return sys.executable
    except ImportError:
        return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def summary(v):
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-step", default=os.path.join("build", "benchmarks", "bench_step"),
                    help="the bench_step executable")
    ap.add_argument("--python", default=default_python(), help="Python with torch for pytorch_step.py")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--pairs", default="",
                    help="comma-separated MPTRAIN:TORCH precisions (default: the device's three pairs)")
    ap.add_argument("--threads", type=int, default=2, help="threads on both sides")
    ap.add_argument("--repeats", type=int, default=5, help="alternating runs per pair")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--json", help="write the comparison here")
    a = ap.parse_args()
    if a.threads < 1 or a.repeats < 1:
        ap.error("--threads and --repeats must be >= 1")
    if not os.access(a.bench_step, os.X_OK):
        ap.error(f"--bench-step {a.bench_step}: not an executable (build the bench_step target)")
    if a.pairs:
        pairs = []
        for p in a.pairs.split(","):
            m, _, t = p.partition(":")
            target = next((x[2] for x in PAIRS[a.device] if x[0] == m and x[1] == t), None)
            pairs.append((m, t, target))
    else:
        pairs = PAIRS[a.device]

    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    shape = ["--layers", str(a.layers), "--channels", str(a.channels), "--heads", str(a.heads), "--seq-len",
             str(a.seq_len), "--vocab", str(a.vocab), "--micro-batch", str(a.micro_batch), "--threads",
             str(a.threads), "--warmup", str(a.warmup), "--iters", str(a.iters), "--device", a.device]
    report = {"benchmark": "mptrain_vs_pytorch", "device": a.device, "threads": a.threads, "repeats": a.repeats,
              "lscpu": lscpu(), "python": a.python, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "shape": {"L": a.layers, "C": a.channels, "NH": a.heads, "T": a.seq_len, "V": a.vocab,
                        "B": a.micro_batch}, "pairs": []}
    print(f"mptrain vs PyTorch, {a.device}, {a.threads} thread(s) each, L={a.layers} C={a.channels} "
          f"NH={a.heads} T={a.seq_len} B={a.micro_batch}, {a.repeats} alternating repeat(s)", flush=True)
    for m, t, target in pairs:
        ours, theirs, ratios, loads, gemm_shares, mfus = [], [], [], [], [], []
        machine = None
        for r in range(a.repeats):
            load_before = load_average()
            mj = run_json([a.bench_step, "--precision", m] + shape, env)
            tj = run_json([a.python, os.path.join(HERE, "pytorch_step.py")] + torch_args(t) + shape, env)
            loads.append({"before": load_before, "after": load_average()})
            machine = mj["machine"]
            x, y = mj["tokens_per_second"]["median"], tj["tokens_per_second"]["median"]
            ours.append(x)
            theirs.append(y)
            ratios.append(x / y)
            mfus.append(mj.get("mfu"))
            gemm_shares.append(mj.get("gemm_share", {}).get("median"))
            share = f"  GEMM {100 * gemm_shares[-1]:4.1f}% of step" if gemm_shares[-1] is not None else ""
            print(f"  {m:>4} vs torch {t:<12} repeat {r + 1}: mptrain {x:8.0f} tok/s  PyTorch {y:8.0f} tok/s  "
                  f"ratio {x / y:5.2f}  load {load_before:.2f}{share}", flush=True)
        rs = summary(ratios)
        verdict = None
        if target is not None:
            verdict = "met" if rs["median"] >= target else "missed"
        print(f"  {m} vs {t} (torch {tj['machine']['torch']}): ratio mptrain/PyTorch min {rs['min']:.2f} median {rs['median']:.2f} "
              f"max {rs['max']:.2f}" + (f"  (target >= {target}: {verdict})" if target else ""))
        report["pairs"].append({"mptrain_precision": m, "pytorch_precision": t,
                                "mptrain_tokens_per_second": summary(ours), "pytorch_tokens_per_second":
                                summary(theirs), "ratio": rs, "ratios": ratios, "target_ratio": target,
                                "target": verdict, "torch": tj["machine"]["torch"],
                                "torch_adamw": tj["config"].get("adamw_kind"), "load_average_1min": loads,
                                "mptrain_gemm_share": gemm_shares, "mptrain_mfu": mfus})
        report["machine"] = machine
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
