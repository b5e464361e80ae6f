#!/usr/bin/env python3
"""Measured memory per rank for N = 1..8 ranks (mpiexec --oversubscribe + bench_memory) against 4P + 12P/N.

    python3 benchmarks/memory_sweep.py --max-ranks 8 --budget-mib 512 --json results/memory.json

Prints, per N: the engine's state bytes per rank (weights + gradients + FP32 master, m and v shards, read from
the allocated buffers), the ZeRO-1 formula 2eP + 12P/N (4P + 12P/N in fp16) and the padding between them, the
activation bytes at the micro-batch, and the largest micro-batch that fits --budget-mib per rank with sharding
and without (every rank holding the full FP32 state). Memory does not depend on timing, so oversubscribing the
cores is harmless here.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scaling import mpi_env  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-memory", default=os.path.join("build", "benchmarks", "bench_memory"))
    ap.add_argument("--mpiexec", default="mpiexec")
    ap.add_argument("--max-ranks", type=int, default=8)
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--budget-mib", type=float, default=512.0)
    ap.add_argument("--extra", default="", help="more bench_memory flags, e.g. '--layers 12 --channels 768'")
    ap.add_argument("--json", help="write the table here")
    a = ap.parse_args()
    env = mpi_env(1)
    rows = []
    print(f"{'N':>2} {'state B/rank':>13} {'2eP+12P/N':>13} {'padding':>9} {'activ. B':>11} "
          f"{'max B sharded':>13} {'max B unsharded':>15}")
    for n in range(1, a.max_ranks + 1):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [a.mpiexec, "--oversubscribe", "--bind-to", "none", "-n", str(n), a.bench_memory, "--precision",
               a.precision, "--budget-mib", str(a.budget_mib), "--json", path] + a.extra.split()
        r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            sys.exit(f"memory_sweep: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        with open(path) as f:
            j = json.load(f)
        os.unlink(path)
        rows.append(j)
        bpr, bud = j["bytes_per_rank"], j["budget"]
        print(f"{n:>2} {bpr['state']:>13,} {j['formula_bytes']:>13,.0f} {j['padding_bytes']:>9,.0f} "
              f"{bpr['activations_at_micro_batch']:>11,} {bud['largest_micro_batch_sharded']:>13} "
              f"{bud['largest_micro_batch_unsharded']:>15}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"benchmark": "memory_sweep", "budget_mib": a.budget_mib, "runs": rows}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
