#!/usr/bin/env python3
"""Side-by-side step time of two bench_step builds (A = before, B = after), alternated.

For each precision, runs A then B (then A, B, ...) `--repeats` times with the same flags and thread count,
so a machine whose load changes slows both alike, and reports per precision the B/A ratio of tokens/s (median
step of each run) as min/median/max over the pairs, each side's median tokens/s and spread, and B's GEMM share
of the step. Writes a text summary and the raw per-run JSON; the CPU model, lscpu and the load average at the
start and end are stored with them.

  python3 benchmarks/ab_step.py --a /tmp/bench_step_main --b build/benchmarks/bench_step \\
      --precisions fp32,fp16,bf16 --threads 1 --repeats 5 --out benchmarks/results/fusion_step
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def run_step(binary, precision, threads, iters, warmup):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [binary, "--precision", precision, "--threads", str(threads), "--iters", str(iters), "--warmup",
           str(warmup), "--json", path]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(path) as f:
        report = json.load(f)
    os.unlink(path)
    # CPU seconds of the whole process (start-up, warm-up and timed steps): what the work costs, much less
    # disturbed than wall time when other jobs share the cores.
    report["process_cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return report


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def spread(values):
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", help="bench_step before (the baseline)")
    p.add_argument("--b", help="bench_step after")
    p.add_argument("--precisions", default="fp32,fp16,bf16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.txt and PREFIX.json")
    p.add_argument("--summarize", metavar="JSON", help="only rewrite the summary of an earlier run's JSON")
    args = p.parse_args()
    if args.summarize:
        with open(args.summarize) as f:
            write(json.load(f), args.out)
        return
    for binary in (args.a, args.b):
        if not binary or not os.access(binary, os.X_OK):
            sys.exit(f"ab_step.py: {binary} is not an executable bench_step")

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    result = {"a": args.a, "b": args.b, "threads": args.threads, "repeats": args.repeats, "iters": args.iters,
              "warmup": args.warmup, "cpu_model": model, "lscpu": lscpu,
              "start": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_start": load_average(),
              "precisions": {}}
    for precision in args.precisions.split(","):
        runs = []
        for r in range(args.repeats):
            a = run_step(args.a, precision, args.threads, args.iters, args.warmup)
            b = run_step(args.b, precision, args.threads, args.iters, args.warmup)
            runs.append({"a": a, "b": b, "load": load_average()})
            print(f"{precision} pair {r + 1}: A {a['tokens_per_second']['median']:.0f} tok/s, "
                  f"B {b['tokens_per_second']['median']:.0f} tok/s, load {runs[-1]['load']}", flush=True)
        result["precisions"][precision] = {"runs": runs}
    result["end"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    result["load_end"] = load_average()
    write(result, args.out)


def summarize(result):
    """Adds the per-precision statistics over the pairs to `result` (from its runs)."""
    for s in result["precisions"].values():
        runs = s["runs"]
        tok_a = [x["a"]["tokens_per_second"]["median"] for x in runs]
        tok_b = [x["b"]["tokens_per_second"]["median"] for x in runs]
        s["tokens_per_second_a"] = spread(tok_a)
        s["tokens_per_second_b"] = spread(tok_b)
        s["ratio_b_over_a"] = spread([tb / ta for ta, tb in zip(tok_a, tok_b)])
        # The fastest step of each run: on a loaded machine the least disturbed step of each side.
        s["ratio_fastest_step"] = spread(
            [x["a"]["step_seconds"]["min"] / x["b"]["step_seconds"]["min"] for x in runs])
        if all("process_cpu_seconds" in x["a"] for x in runs):
            s["ratio_process_cpu_seconds"] = spread(
                [x["a"]["process_cpu_seconds"] / x["b"]["process_cpu_seconds"] for x in runs])
        s["gemm_share_a"] = spread([x["a"]["gemm_share"]["median"] for x in runs])
        s["gemm_share_b"] = spread([x["b"]["gemm_share"]["median"] for x in runs])
        s["mfu_a"] = spread([x["a"]["mfu"] for x in runs])
        s["mfu_b"] = spread([x["b"]["mfu"] for x in runs])


def write(result, out):
    summarize(result)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    r = result
    lines = [f"# bench_step A (before) vs B (after), alternated A B A B ..., {r['repeats']} pairs per precision",
             f"# A = {r['a']}", f"# B = {r['b']}",
             f"# OMP_NUM_THREADS={r['threads']} bench_step --threads {r['threads']} --iters {r['iters']} "
             f"--warmup {r['warmup']} --precision P (default shape)",
             f"# {r['cpu_model']}; {r['start']} load {r['load_start']} -> {r['end']} load {r['load_end']}",
             "# tok/s = each run's median step; ratio B/A per pair by tok/s and A/B by each run's fastest step",
             "# and by the CPU seconds of the whole process (start-up, warm-up and timed steps);",
             "# GEMM share and MFU = bench_step's (median step); all as min/median/max over the pairs"]
    for precision, s in r["precisions"].items():
        f3 = lambda d, fmt: "/".join(format(d[k], fmt) for k in ("min", "median", "max"))
        lines.append(f"{precision}: A tok/s {f3(s['tokens_per_second_a'], '.0f')}  B tok/s "
                     f"{f3(s['tokens_per_second_b'], '.0f')}  ratio B/A {f3(s['ratio_b_over_a'], '.3f')}  "
                     f"fastest-step ratio {f3(s['ratio_fastest_step'], '.3f')}" +
                     (f"  CPU-time ratio A/B {f3(s['ratio_process_cpu_seconds'], '.3f')}"
                      if "ratio_process_cpu_seconds" in s else ""))
        lines.append(f"{' ' * len(precision)}  GEMM share A {f3(s['gemm_share_a'], '.3f')} B "
                     f"{f3(s['gemm_share_b'], '.3f')}  MFU A {f3(s['mfu_a'], '.3f')} B {f3(s['mfu_b'], '.3f')}")
        lines.append(f"{' ' * len(precision)}  load per pair: " + ", ".join(x["load"].split()[0] for x in s["runs"]))
    lines.append("")
    lines.append("# lscpu")
    lines.append(r["lscpu"].rstrip())
    with open(out + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:7 + 3 * len(r["precisions"])]))


if __name__ == "__main__":
    main()
