#!/usr/bin/env python3
"""Step time of each --recompute mode on the CPU, from bench_step runs that alternate the modes.

    python3 benchmarks/recompute_cost.py --bench-step build/benchmarks/bench_step --repeats 5 \\
        --json benchmarks/results/recompute_cost.json

Each repeat runs bench_step once per mode, one after the other (a shared or loaded machine slows them alike),
and the report takes, per mode, the minimum and the median over all timed steps of every repeat; the extra
step time of a mode is its figure over none's minus 1. Extra flags go to every bench_step run (--extra).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

MODES = ("none", "selective", "block")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-step", default=os.path.join("build", "benchmarks", "bench_step"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--extra", default="", help="more bench_step flags, e.g. '--layers 12 --channels 256'")
    ap.add_argument("--json", help="write the report here")
    a = ap.parse_args()
    steps = {m: [] for m in MODES}
    for _ in range(a.repeats):
        for mode in MODES:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                path = f.name
            cmd = [a.bench_step, "--precision", a.precision, "--threads", str(a.threads), "--warmup", "1", "--iters",
                   str(a.iters), "--recompute", mode, "--json", path] + a.extra.split()
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
            r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode != 0:
                sys.exit(f"recompute_cost: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
            with open(path) as f:
                j = json.load(f)
            os.unlink(path)
            steps[mode].append(j["step_seconds"])
            config, machine = j["config"], j["machine"]
    report = {"benchmark": "recompute_cost", "config": config, "machine": machine, "modes": {}}
    base = min(s["min"] for s in steps["none"])
    base_median = statistics.median(s["median"] for s in steps["none"])
    print(f"{'recompute':>9} {'min s/step':>10} {'extra':>7} {'median s/step':>13} {'extra':>7}")
    for mode in MODES:
        best = min(s["min"] for s in steps[mode])
        median = statistics.median(s["median"] for s in steps[mode])
        report["modes"][mode] = {"min_step_seconds": best, "median_step_seconds": median,
                                 "extra_vs_none_min": best / base - 1, "extra_vs_none_median": median / base_median - 1}
        print(f"{mode:>9} {best:>10.3f} {100 * (best / base - 1):>6.1f}% {median:>13.3f} "
              f"{100 * (median / base_median - 1):>6.1f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
