#!/usr/bin/env python3
"""Bytes per rank and the largest micro-batch for N = 1..8 ranks, per --recompute mode, from bench_memory.

    python3 benchmarks/memory_sweep.py --max-ranks 8 --json benchmarks/results/memory_sweep.json \\
        --png benchmarks/results/memory_sweep.png

Shapes (--shapes): `default` (the trainer's default model, L=4 C=128 T=128 V=256, measured: mpiexec -n N
bench_memory builds the engine and runs each mode's forward + backward, so the rows hold the allocated bytes
next to the memory model), `gpt2` (GPT-2 small, L=12 C=768 NH=12 T=1024 V=50304) and `1.3b` (L=24 C=2048
NH=16 T=1024 V=50304, the GPU suite's shapes; too large for this machine, so the memory model alone:
bench_memory --predict-only --ranks N). Per row: the engine's state bytes per rank (weights + gradients + FP32
master/m/v shard), the activations per sequence, the bytes per rank at the shape's micro-batch (state +
activations + backend scratch of the CPU backend) and the largest micro-batch within the shape's budget
(--budget-gib-default, --budget-gib-large). The `stage` column is the ZeRO stage of the engine's buffers.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scaling import mpi_env  # noqa: E402

SHAPES = {
    "default": (["--layers", "4", "--channels", "128", "--heads", "4", "--seq-len", "128", "--vocab", "256",
                 "--micro-batch", "16"], True),
    "gpt2": (["--layers", "12", "--channels", "768", "--heads", "12", "--seq-len", "1024", "--vocab", "50304",
              "--micro-batch", "8"], False),
    "1.3b": (["--layers", "24", "--channels", "2048", "--heads", "16", "--seq-len", "1024", "--vocab", "50304",
              "--micro-batch", "8"], False),
}


def run_bench(a, shape, n):
    flags, measured = SHAPES[shape]
    budget_mib = 1024 * (a.budget_gib_default if shape == "default" else a.budget_gib_large)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    common = [a.bench_memory, "--precision", a.precision, "--budget-mib", str(budget_mib), "--json", path, *flags]
    if measured:
        cmd = [a.mpiexec, "--oversubscribe", "--bind-to", "none", "-n", str(n), *common]
    else:
        cmd = [*common, "--predict-only", "--ranks", str(n)]
    r = subprocess.run(cmd, env=mpi_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"memory_sweep: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    with open(path) as f:
        j = json.load(f)
    os.unlink(path)
    return j


def plot(rows, png, title):
    gnuplot = shutil.which("gnuplot")
    if not gnuplot:
        sys.exit("memory_sweep: --png needs gnuplot (launch/setup.sh installs it)")
    series = sorted({(r["shape"], r["recompute"]) for r in rows}, key=lambda s: (list(SHAPES).index(s[0]), s[1]))
    with tempfile.TemporaryDirectory() as d:
        plots = []
        for k, (shape, mode) in enumerate(series):
            data = os.path.join(d, f"s{k}.dat")
            with open(data, "w") as f:
                for r in rows:
                    if (r["shape"], r["recompute"]) == (shape, mode) and r["largest_micro_batch"] > 0:
                        f.write(f"{r['ranks']} {r['largest_micro_batch']}\n")
            plots.append(f"'{data}' using 1:2 with linespoints title '{shape} {mode}'")
        script = (f"set terminal pngcairo size 1000,600\nset output '{png}'\nset logscale y\nset title '{title}'\n"
                  "set xlabel 'ranks N (ZeRO stage 1)'\nset ylabel 'largest micro-batch (sequences per rank)'\n"
                  "set key outside right\nset grid\nplot " + ", ".join(plots) + "\n")
        subprocess.run([gnuplot], input=script, text=True, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-memory", default=os.path.join("build", "benchmarks", "bench_memory"))
    ap.add_argument("--mpiexec", default="mpiexec")
    ap.add_argument("--max-ranks", type=int, default=8)
    ap.add_argument("--shapes", default="default,gpt2,1.3b")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--budget-gib-default", type=float, default=0.5, help="budget per rank, default shape")
    ap.add_argument("--budget-gib-large", type=float, default=80.0, help="budget per rank, gpt2 and 1.3b")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--png", help="plot the largest micro-batch against N here (gnuplot)")
    a = ap.parse_args()
    rows = []
    print(f"{'shape':>7} {'N':>2} {'stage':>5} {'recompute':>9} {'state B/rank':>14} {'act. B/seq':>12} "
          f"{'B':>3} {'B/rank at B':>14} {'budget GiB':>10} {'max B':>6}  measured (allocated = model)")
    for shape in a.shapes.split(","):
        for n in range(1, a.max_ranks + 1):
            j = run_bench(a, shape, n)
            for m in j["modes"]:
                row = {"shape": shape, "ranks": n, "stage": m["stage"], "recompute": m["recompute"],
                       "state_bytes": j["bytes_per_rank"]["state"],
                       "activations_per_sequence_bytes": m["activations_per_sequence_bytes"],
                       "micro_batch": j["config"]["micro_batch"],
                       "bytes_per_rank_at_micro_batch": m["bytes_per_rank_at_micro_batch"],
                       "budget_bytes": j["budget_bytes_per_rank"], "largest_micro_batch": m["largest_micro_batch"]}
                check = ""
                if "backend_bytes_at_micro_batch" in m:
                    row["allocated_bytes"] = m["backend_bytes_at_micro_batch"]
                    row["model_allocated_bytes"] = m["model_allocated_at_micro_batch"]
                    check = f"{row['allocated_bytes']:,} = {row['model_allocated_bytes']:,}"
                rows.append(row)
                print(f"{shape:>7} {n:>2} {row['stage']:>5} {row['recompute']:>9} {row['state_bytes']:>14,} "
                      f"{row['activations_per_sequence_bytes']:>12,.0f} {row['micro_batch']:>3} "
                      f"{row['bytes_per_rank_at_micro_batch']:>14,} {row['budget_bytes'] / 2**30:>10.1f} "
                      f"{row['largest_micro_batch']:>6}  {check}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "memory_sweep", "precision": a.precision, "rows": rows}, f, indent=2)
            f.write("\n")
    if a.png:
        plot(rows, a.png, f"{a.precision}, CPU backend; budget per rank: default shape {a.budget_gib_default:g} GiB, "
             f"gpt2 and 1.3b {a.budget_gib_large:g} GiB")


if __name__ == "__main__":
    main()
