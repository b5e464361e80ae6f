"""Shared helpers of the interop tests: a small corpus, running mptrain under mpiexec, tiny model flags."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
sys.path.insert(0, os.path.join(HERE, "..", "trainer"))

from test_trainer import write_corpus  # noqa: E402,F401  (re-exported)

TINY = ["--layers", "2", "--heads", "2", "--channels", "32", "--seq-len", "32", "--warmup-steps", "2",
        "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "0", "--eval-batches", "2",
        "--global-batch", "8", "--micro-batch", "4", "--sample-tokens", "0", "--val-fraction", "0.1"]


def run(cmd, cwd, expect=0, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, errors="replace",
                       timeout=timeout)
    if p.returncode != expect:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}, expected {expect}\n"
                             f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def mptrain(args, ranks, *cmd, cwd, expect=0):
    os.makedirs(cwd, exist_ok=True)
    return run([args.mpiexec, "-n", str(ranks), "--oversubscribe", args.mptrain, *cmd], cwd, expect)


def metrics(cwd, run_name):
    with open(os.path.join(cwd, "runs", run_name, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("mptrain: error:")]
