#!/usr/bin/env python3
"""The large-batch measurement: validation loss after a fixed token budget at global batch 32, 128 and 512
sequences with AdamW and LAMB (learning rate tuned at batch 32, scaled by the square-root rule), the gradient
noise scale over the batch-32 runs, and the critical batch it predicts.

    python3 benchmarks/large_batch/run.py --mptrain build/mptrain --data data/kjv.txt --out benchmarks/large_batch

Every run: 2 ranks x 1 OpenMP thread (mpiexec), fp16, micro-batch 16 per rank (so batch 512 is 16
accumulation steps), the same model, seed, token budget and sample-counted schedule (warm-up over the first
10% of the samples, cosine to 10% of the peak at the last sample), --sampling epoch; afterwards `mptrain eval`
of the final checkpoint on the same 1024 held-out windows. Step 1 runs batch 32 at each learning rate of the sweep and keeps the best per optimizer;
step 2 runs batches 128 and 512 at lr x sqrt(B / 32); last, the best batch-32 AdamW run again with
--sampling random, to compare the two orders.

Writes to --out: results.json (every run: flags, final validation loss, noise-scale series, seconds),
results.md (the tables), noise_scale.png and val_loss.png (gnuplot). Runs go under --work (default: a
temporary directory). Needs the Python standard library, mpiexec and gnuplot.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

MODEL = ["--layers", "2", "--heads", "4", "--channels", "64", "--seq-len", "64"]
BATCHES = [32, 128, 512]
SWEEP = {"adamw": [1.5e-3, 3e-3, 6e-3, 1.2e-2], "lamb": [5e-3, 1e-2, 2e-2, 4e-2, 8e-2]}


def run(args, name, optimizer, batch, lr, sampling="epoch"):
    """Trains one configuration; returns its record (final val loss, noise series, seconds). With --reuse, a
    run of the same name, optimizer, batch and lr in the previous results.json is taken as it is."""
    old = args.previous.get(name)
    if old and (old["optimizer"], old["batch"], old["lr"]) == (optimizer, batch, lr):
        old.setdefault("sampling", "epoch")
        old.setdefault("diverged", False)
        print(f"{name:>18}: reused from the previous results.json: val loss {loss_text(old)}", flush=True)
        return old
    T = 64
    samples = args.tokens // T
    steps = samples // batch
    cwd = os.path.join(args.work, name)
    os.makedirs(cwd, exist_ok=True)
    flags = [*MODEL, "--precision", "fp16", "--global-batch", str(batch), "--micro-batch", "16",
             "--steps", str(steps), "--optimizer", optimizer, "--lr", f"{lr:g}",
             "--warmup-samples", str(samples // 10), "--min-lr-ratio", "0.1", "--sampling", sampling,
             "--eval-interval", "0", "--eval-batches", "0", "--log-interval", str(max(1, steps // 32)),
             "--checkpoint-interval", "0", "--sample-tokens", "0", "--seed", "1337", "--data", args.data,
             "--run-name", name, "--resume", "none"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none", OMPI_MCA_rmaps_base_oversubscribe="1")
    cmd = [args.mpiexec, "-n", "2", "--oversubscribe", args.mptrain, "train", *flags]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    base = {"name": name, "optimizer": optimizer, "batch": batch, "lr": lr, "steps": steps, "sampling": sampling,
            "tokens": steps * batch * T, "seconds": seconds, "command": " ".join(cmd[1:])}
    if p.returncode != 0 and "loss scale stuck at its minimum" in p.stderr:
        # Diverged: the loss-scale guard stopped the run (inf/NaN gradients at the minimum scale).
        print(f"{name:>18}: {optimizer} batch {batch} lr {lr:g}: diverged ({seconds:.0f} s)", flush=True)
        return {**base, "val_loss": None, "diverged": True, "noise": [], "final_train_loss": None}
    if p.returncode != 0:
        sys.exit(f"run {name} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    with open(os.path.join(cwd, "runs", name, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    # Every run is evaluated on the same held-out windows: 16 batches of 64 (1024 windows of 65 tokens).
    ckpt = os.path.join(cwd, "runs", name, "checkpoints", f"ckpt_{steps:08d}.safetensors")
    p = subprocess.run([args.mpiexec, "-n", "2", "--oversubscribe", args.mptrain, "eval", "--checkpoint", ckpt,
                        "--data", args.data, "--global-batch", "64", "--micro-batch", "16", "--eval-batches", "16"],
                       cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"eval of {name} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    val = float(next(line.split()[1] for line in p.stdout.splitlines() if line.startswith("val_loss ")))
    train = [(line["step"], line["train_loss"]) for line in lines if "train_loss" in line]
    noise = [(line["samples"], line["noise_scale"], line["grad_sq_estimate"], line["trace_estimate"])
             for line in lines if "noise_scale" in line]
    record = {**base, "val_loss": val, "final_train_loss": train[-1][1], "noise": noise, "diverged": False}
    print(f"{name:>18}: {optimizer} batch {batch} lr {lr:g} steps {steps}: val loss {val:.4f} "
          f"({seconds:.0f} s)", flush=True)
    return record


def gnuplot(script):
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


def plots(args, records, best):
    noise_path = os.path.join(args.work, "noise.dat")
    with open(noise_path, "w") as f:
        for opt in ("adamw", "lamb"):
            r = best[opt]
            f.write(f"# {opt} batch 32 lr {r['lr']:g}\n")
            for samples, b, _, _ in r["noise"]:
                if b is not None and b > 0:
                    f.write(f"{samples * 64} {b}\n")
            f.write("\n\n")
    gnuplot(f"""set terminal pngcairo size 900,500 noenhanced
set output '{os.path.join(args.out, "noise_scale.png")}'
set title 'Gradient noise scale B_noise = EMA(S) / EMA(|G|^2), batch 32, 2 ranks'
set xlabel 'tokens'
set ylabel 'B_noise (sequences of 64 tokens)'
set logscale y
set grid
plot '{noise_path}' index 0 with lines lw 2 title 'AdamW', '' index 1 with lines lw 2 title 'LAMB'
""")
    val_path = os.path.join(args.work, "val.dat")
    with open(val_path, "w") as f:
        for opt in ("adamw", "lamb"):
            f.write(f"# {opt}\n")
            for b in BATCHES:
                r = next(x for x in records if x["optimizer"] == opt and x["batch"] == b
                         and x["sampling"] == "epoch" and (b != 32 or x is best[opt]))
                if r["val_loss"] is not None:
                    f.write(f"{b} {r['val_loss']}\n")
            f.write("\n\n")
    gnuplot(f"""set terminal pngcairo size 900,500 noenhanced
set output '{os.path.join(args.out, "val_loss.png")}'
set title 'Validation loss after {args.tokens} tokens (lr tuned at batch 32, sqrt scaling)'
set xlabel 'global batch (sequences)'
set ylabel 'validation loss (nats/byte)'
set logscale x 2
set grid
plot '{val_path}' index 0 with linespoints lw 2 pt 7 title 'AdamW', '' index 1 with linespoints lw 2 pt 5 title 'LAMB'
""")


def loss_text(record):
    return "diverged" if record["val_loss"] is None else f"{record['val_loss']:.4f}"


def tables(args, records, best):
    out = [f"Token budget {args.tokens} tokens per run; 2 ranks x 1 thread; model L=2 C=64 NH=4 T=64; fp16.",
           "", "Learning-rate sweep at batch 32 (validation loss):", "",
           "| optimizer | lr | val loss | seconds |", "| --- | --- | --- | --- |"]
    for r in records:
        if r["batch"] == 32 and r["sampling"] == "epoch":
            out.append(f"| {r['optimizer']} | {r['lr']:g} | {loss_text(r)} | {r['seconds']:.0f} |")
    out += ["", "Validation loss after the budget (lr = best batch-32 lr x sqrt(B / 32)):", "",
            "| global batch | steps | AdamW lr | AdamW val loss | LAMB lr | LAMB val loss |",
            "| --- | --- | --- | --- | --- | --- |"]
    for b in BATCHES:
        row = {}
        for opt in ("adamw", "lamb"):
            row[opt] = best[opt] if b == 32 else next(
                x for x in records if x["optimizer"] == opt and x["batch"] == b and x["sampling"] == "epoch")
        out.append(f"| {b} | {row['adamw']['steps']} | {row['adamw']['lr']:g} | {loss_text(row['adamw'])} | "
                   f"{row['lamb']['lr']:g} | {loss_text(row['lamb'])} |")
    rnd = next(r for r in records if r["sampling"] == "random")
    out += ["", f"Sampling: the best batch-32 AdamW run (lr {best['adamw']['lr']:g}) reaches val loss "
            f"{best['adamw']['val_loss']:.4f} with --sampling epoch and {rnd['val_loss']:.4f} with --sampling random."]
    out += ["", "Noise scale B_noise (sequences) of the batch-32 runs, at quarters of the budget:", "",
            "| optimizer | 25% | 50% | 75% | 100% |", "| --- | --- | --- | --- | --- |"]
    for opt in ("adamw", "lamb"):
        series = [b for _, b, _, _ in best[opt]["noise"]]
        picks = [series[min(len(series) - 1, max(0, int(len(series) * q) - 1))] for q in (0.25, 0.5, 0.75, 1.0)]
        out.append(f"| {opt} | " + " | ".join("n/a" if x is None else f"{x:.3g}" for x in picks) + " |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mptrain", required=True)
    ap.add_argument("--mpiexec", default="mpiexec")
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokens", type=int, default=1 << 19, help="token budget of every run")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--work", default=None, help="directory for the runs (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="take runs already in --out/results.json")
    args = ap.parse_args()
    args.previous = {}
    previous_path = os.path.join(args.out, "results.json")
    if args.reuse and os.path.exists(previous_path):
        with open(previous_path) as f:
            args.previous = {r["name"]: r for r in json.load(f)["runs"]}
    args.mptrain = os.path.abspath(args.mptrain)
    args.data = os.path.abspath(args.data)
    temporary = args.work is None
    args.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="mptrain_large_batch_"))
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)

    records, best = [], {}
    for opt, rates in SWEEP.items():
        sweep = [run(args, f"{opt}_b32_lr{lr:g}", opt, 32, lr) for lr in rates]
        records += sweep
        best[opt] = min(sweep, key=lambda r: math.inf if r["val_loss"] is None else r["val_loss"])
    for opt in SWEEP:
        for b in BATCHES[1:]:
            records.append(run(args, f"{opt}_b{b}", opt, b, best[opt]["lr"] * math.sqrt(b / 32)))
    # Epoch against random sampling: the best batch-32 AdamW run again with --sampling random.
    records.append(run(args, "adamw_b32_random", "adamw", 32, best["adamw"]["lr"], sampling="random"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"tokens": args.tokens, "model": MODEL, "runs": records,
                   "best_lr": {k: v["lr"] for k, v in best.items()}}, f, indent=1)
    text = tables(args, records, best)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    plots(args, records, best)
    if temporary:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
