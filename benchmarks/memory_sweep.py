#!/usr/bin/env python3
"""Bytes per rank and the largest micro-batch for N = 1..8 ranks, per ZeRO stage and --recompute mode.

    python3 benchmarks/memory_sweep.py --max-ranks 8 --json benchmarks/results/memory_sweep.json \\
        --png benchmarks/results/memory_sweep.png

Shapes (--shapes): `default` (the trainer's default model, L=4 C=128 T=128 V=256, measured: mpiexec -n N
bench_memory builds the engine and runs each mode's forward + backward, so the rows hold the allocated bytes
next to the memory model), `default-b0.25` (the same with --bucket-mib 0.25), `gpt2` (GPT-2 small, L=12 C=768 NH=12 T=1024 V=50304) and `1.3b` (L=24 C=2048
NH=16 T=1024 V=50304, the GPU suite's shapes; too large for this machine, so the memory model alone:
bench_memory --predict-only --ranks N). Per row: the engine's state bytes per rank (weights + gradients + FP32
master/m/v shard), the activations per sequence, the bytes per rank at the shape's micro-batch (state +
activations + backend scratch of the CPU backend) and the largest micro-batch within the shape's budget
(--budget-gib-default, --budget-gib-large). The `stage` column is the ZeRO stage of the engine's buffers
(--zero-stage): stage 2 keeps a gradient shard and a staging pool instead of the full gradients. Its rows give
the bytes saved against stage 1 at the same N next to the target e*P*(1 - 1/N) (2P(1 - 1/N) in 16 bits; e
the storage bytes per element) and the staging pool, which the saving pays for.
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
    # The default shape with 0.25 MiB buckets (7 of them, instead of one 25 MiB bucket holding the whole model,
    # which leaves stage 2 nothing to free).
    "default-b0.25": (["--layers", "4", "--channels", "128", "--heads", "4", "--seq-len", "128", "--vocab", "256",
                       "--micro-batch", "16", "--bucket-mib", "0.25"], True),
    "gpt2": (["--layers", "12", "--channels", "768", "--heads", "12", "--seq-len", "1024", "--vocab", "50304",
              "--micro-batch", "8"], False),
    "1.3b": (["--layers", "24", "--channels", "2048", "--heads", "16", "--seq-len", "1024", "--vocab", "50304",
              "--micro-batch", "8"], False),
}


def run_bench(a, shape, n):
    flags, measured = SHAPES[shape]
    budget_mib = 1024 * (a.budget_gib_default if shape.startswith("default") else a.budget_gib_large)
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
    order = lambda s: (list(SHAPES).index(s[0]),) + tuple(s[1:])
    with tempfile.TemporaryDirectory() as d:
        state_plots, batch_plots = [], []
        for k, (shape, stage) in enumerate(sorted({(r["shape"], r["stage"]) for r in rows}, key=order)):
            data = os.path.join(d, f"m{k}.dat")
            with open(data, "w") as f:
                for r in rows:
                    if (r["shape"], r["stage"], r["recompute"]) == (shape, stage, rows[0]["recompute"]):
                        f.write(f"{r['ranks']} {r['state_bytes'] / 2**30}\n")
            state_plots.append(f"'{data}' using 1:2 with linespoints title '{shape} stage {stage}'")
        for k, (shape, stage, mode) in enumerate(
                sorted({(r["shape"], r["stage"], r["recompute"]) for r in rows}, key=order)):
            data = os.path.join(d, f"s{k}.dat")
            with open(data, "w") as f:
                for r in rows:
                    if (r["shape"], r["stage"], r["recompute"]) == (shape, stage, mode) and r["largest_micro_batch"] > 0:
                        f.write(f"{r['ranks']} {r['largest_micro_batch']}\n")
            dash = "dt 1" if stage == 1 else "dt 2"
            batch_plots.append(f"'{data}' using 1:2 with linespoints {dash} title '{shape} {mode} ZeRO-{stage}'")
        script = (f"set terminal pngcairo size 1400,650\nset output '{png}'\nset multiplot layout 1,2 title '{title}'\n"
                  "set logscale y\nset grid\nset key right center\nset xlabel 'ranks N'\n"
                  "set ylabel 'engine state per rank (GiB): weights, gradients, shard, staging'\n"
                  "plot " + ", ".join(state_plots) + "\n"
                  "set key outside right font ',8'\nset ylabel 'largest micro-batch (sequences per rank)'\n"
                  "plot " + ", ".join(batch_plots) + "\nunset multiplot\n")
        subprocess.run([gnuplot], input=script, text=True, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-memory", default=os.path.join("build", "benchmarks", "bench_memory"))
    ap.add_argument("--mpiexec", default="mpiexec")
    ap.add_argument("--max-ranks", type=int, default=8)
    ap.add_argument("--shapes", default="default,default-b0.25,gpt2,1.3b")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--budget-gib-default", type=float, default=0.5, help="budget per rank, default shape")
    ap.add_argument("--budget-gib-large", type=float, default=80.0, help="budget per rank, gpt2 and 1.3b")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--png", help="plot the largest micro-batch against N here (gnuplot)")
    ap.add_argument("--replot", metavar="JSON", help="only redraw --png from the rows of an earlier --json")
    a = ap.parse_args()
    if a.replot:
        with open(a.replot) as f:
            saved = json.load(f)
        plot(saved["rows"], a.png, saved["title"])
        return
    title = (f"{a.precision}, CPU backend; budget per rank: default shape {a.budget_gib_default:g} GiB, "
             f"gpt2 and 1.3b {a.budget_gib_large:g} GiB")
    rows = []
    print(f"{'shape':>7} {'N':>2} {'stage':>5} {'recompute':>9} {'state B/rank':>14} {'act. B/seq':>12} "
          f"{'B':>3} {'B/rank at B':>14} {'budget GiB':>10} {'max B':>6} {'saved vs 1':>14} {'e*P(1-1/N)':>14} "
          f"{'staging':>12}  measured (allocated = model)")
    for shape in a.shapes.split(","):
        for n in range(1, a.max_ranks + 1):
            j = run_bench(a, shape, n)
            e = {"fp32": 4, "fp16": 2, "bf16": 2}[a.precision]
            state = {x["stage"]: x["state"] for x in j["engine_bytes_per_rank"]}
            for m in j["modes"]:
                row = {"shape": shape, "ranks": n, "stage": m["stage"], "recompute": m["recompute"],
                       "state_bytes": m["state_bytes"], "staging_bytes": m["staging_bytes"],
                       "parameters": j["parameters"],
                       "activations_per_sequence_bytes": m["activations_per_sequence_bytes"],
                       "micro_batch": j["config"]["micro_batch"],
                       "bytes_per_rank_at_micro_batch": m["bytes_per_rank_at_micro_batch"],
                       "budget_bytes": j["budget_bytes_per_rank"], "largest_micro_batch": m["largest_micro_batch"]}
                saved = target = ""
                if m["stage"] == 2 and 1 in state:
                    row["saved_vs_stage1_bytes"] = state[1] - m["state_bytes"]
                    row["target_saving_bytes"] = e * j["parameters"] * (1 - 1 / n)
                    saved = f"{row['saved_vs_stage1_bytes']:,}"
                    target = f"{row['target_saving_bytes']:,.0f}"
                check = ""
                if "backend_bytes_at_micro_batch" in m:
                    row["allocated_bytes"] = m["backend_bytes_at_micro_batch"]
                    row["model_allocated_bytes"] = m["model_allocated_at_micro_batch"]
                    check = f"{row['allocated_bytes']:,} = {row['model_allocated_bytes']:,}"
                rows.append(row)
                print(f"{shape:>7} {n:>2} {row['stage']:>5} {row['recompute']:>9} {row['state_bytes']:>14,} "
                      f"{row['activations_per_sequence_bytes']:>12,.0f} {row['micro_batch']:>3} "
                      f"{row['bytes_per_rank_at_micro_batch']:>14,} {row['budget_bytes'] / 2**30:>10.1f} "
                      f"{row['largest_micro_batch']:>6} {saved:>14} {target:>14} {row['staging_bytes']:>12,}  {check}",
                      flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "memory_sweep", "precision": a.precision, "title": title, "rows": rows}, f,
                      indent=2)
            f.write("\n")
    if a.png:
        plot(rows, a.png, title)


if __name__ == "__main__":
    main()
