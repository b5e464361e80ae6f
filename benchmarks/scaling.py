#!/usr/bin/env python3
"""Strong and weak scaling of mptrain's training step on this machine: mpiexec + bench_step.

    python3 benchmarks/scaling.py --ranks 1,2,4 --json results/scaling.json

One thread per rank (--threads 1 and OMP_NUM_THREADS=1). Weak scaling keeps the micro-batch per rank fixed
(--micro-batch B on every rank); strong scaling keeps the global batch fixed (--global-batch G split as G/N per
rank). Efficiency = tokens/s at N ranks / (N x tokens/s at 1 rank), from each run's median step time (max over
ranks per iteration). Rank counts above the logical cores are run with --oversubscribe and labelled
"oversubscribed": they share cores, so their efficiency measures time-slicing, not the trainer.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile


def mpi_env(threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if os.geteuid() == 0:  # Open MPI refuses root unless told
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    return env


def mpirun(mpiexec, n, cmd, env):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        full = [mpiexec, "--oversubscribe", "--bind-to", "none", "-n", str(n)] + cmd + ["--json", path]
        r = subprocess.run(full, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            sys.exit(f"scaling: {' '.join(full)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-step", default=os.path.join("build", "benchmarks", "bench_step"))
    ap.add_argument("--mpiexec", default="mpiexec")
    ap.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts (must start with 1)")
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--micro-batch", type=int, default=16, help="weak scaling: sequences per rank")
    ap.add_argument("--global-batch", type=int, default=16, help="strong scaling: sequences over all ranks")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    ranks = [int(x) for x in a.ranks.split(",")]
    if not ranks or ranks[0] != 1 or any(n < 1 for n in ranks):
        ap.error("--ranks must start with 1 and hold positive counts")
    if any(a.global_batch % n for n in ranks):
        ap.error("--global-batch must be divisible by every rank count")
    cores = os.cpu_count() or 1
    env = mpi_env(1)
    base = [a.bench_step, "--precision", a.precision, "--layers", str(a.layers), "--channels", str(a.channels),
            "--heads", str(a.heads), "--seq-len", str(a.seq_len), "--threads", "1", "--warmup", str(a.warmup),
            "--iters", str(a.iters)]
    out = {"benchmark": "scaling", "precision": a.precision, "threads_per_rank": 1, "logical_cores": cores,
           "efficiency": "tokens/s(N) / (N x tokens/s(1)), median step time, max over ranks", "weak": [],
           "strong": []}
    print(f"scaling on {cores} logical cores, 1 thread per rank, {a.precision}, L={a.layers} C={a.channels} "
          f"T={a.seq_len}")
    for kind, per_rank in (("weak", lambda n: a.micro_batch), ("strong", lambda n: a.global_batch // n)):
        one = None
        for n in ranks:
            j = mpirun(a.mpiexec, n, base + ["--micro-batch", str(per_rank(n))], env)
            tps = j["tokens_per_second"]["median"]
            one = tps if n == 1 else one
            eff = tps / (n * one)
            label = "oversubscribed" if n > cores else ""
            ph = j["phases_seconds"]
            row = {"ranks": n, "micro_batch_per_rank": per_rank(n), "tokens_per_second": j["tokens_per_second"],
                   "step_seconds": j["step_seconds"], "grad_sync_seconds": ph["grad_sync"]["median"],
                   "efficiency": eff, "oversubscribed": n > cores, "machine": j["machine"]}
            out[kind].append(row)
            print(f"  {kind:6} N={n} B/rank={per_rank(n):3}: {tps:8.0f} tok/s, step "
                  f"{1e3 * j['step_seconds']['median']:.1f} ms (sync {1e3 * ph['grad_sync']['median']:.1f} ms), "
                  f"efficiency {eff:.1%} {label}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
