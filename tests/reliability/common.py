"""Shared helpers of the reliability tests (tests/reliability): tiny inputs, running mptrain under mpiexec
with a deadline, snapshots of a directory tree, and the processes a job left behind."""
import argparse
import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "trainer"))
from test_trainer import write_corpus  # noqa: E402  (the same synthetic corpus as the end-to-end tests)

# A tiny model and batch: every run of the matrix takes about a second.
TINY = ["--layers", "1", "--heads", "2", "--channels", "32", "--seq-len", "32", "--warmup-steps", "2",
        "--log-interval", "1", "--eval-interval", "0", "--eval-batches", "1", "--sample-tokens", "0",
        "--val-fraction", "0.1", "--global-batch", "8", "--micro-batch", "4"]

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256


def env(extra=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             OMPI_MCA_btl_vader_single_copy_mechanism="none", OMPI_MCA_rmaps_base_oversubscribe="1")
    e.update(extra or {})
    return e


def write_shard(path, tokens, magic=SHARD_MAGIC, version=SHARD_VERSION, count=None, vocab=0):
    """An llm.c token shard: 256 int32 header {magic, version, token count, vocabulary (0: GPT-2's)}, then
    uint16 tokens."""
    header = [0] * SHARD_HEADER_INTS
    header[0], header[1], header[2], header[3] = magic, version, len(tokens) if count is None else count, vocab
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        f.write(struct.pack(f"<{len(tokens)}H", *tokens))


def shard_tokens(n=4000, seed=3):
    rng = random.Random(seed)
    return [rng.randrange(50257) for _ in range(n)]


def snapshot(root):
    """{relative path: (kind, size, mtime_ns, sha256)} of every file and directory under `root`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            out[os.path.relpath(p, root)] = ("dir", 0, 0, "")
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = ""
            if os.access(p, os.R_OK):
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(p, root)] = ("file", st.st_size, st.st_mtime_ns, digest)
    return out


def diff_snapshots(before, after):
    """Lines describing what was created, removed or changed between two snapshots ([] when nothing)."""
    lines = [f"created {p}" for p in sorted(set(after) - set(before))]
    lines += [f"removed {p}" for p in sorted(set(before) - set(after))]
    lines += [f"changed {p}: {before[p]} -> {after[p]}" for p in sorted(set(before) & set(after))
              if before[p] != after[p]]
    return lines


def processes_in(directory):
    """PIDs of live processes whose working directory is `directory` or below it."""
    directory = os.path.realpath(directory)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (cwd == directory or cwd.startswith(directory + os.sep)):
            pids.append(int(entry))
    return pids


def children(pid):
    """Direct children of `pid` (the ranks of a local mpiexec job)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def kill_all(pids, sig=signal.SIGKILL):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Run:
    """A finished (or killed) command: exit code, output, wall seconds."""

    def __init__(self, cmd, returncode, stdout, stderr, seconds):
        self.cmd, self.returncode, self.stdout, self.stderr, self.seconds = cmd, returncode, stdout, stderr, seconds

    def describe(self):
        return (f"$ {' '.join(self.cmd)}\nexit {self.returncode} after {self.seconds:.1f} s\n"
                f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}")

    def error_lines(self):
        return [line for line in (self.stdout + self.stderr).splitlines() if line.startswith("mptrain: error:")]


def run(cmd, cwd, timeout=60, extra_env=None, prefix=()):
    """Runs `cmd` (a list) in `cwd`; on timeout kills its whole process group and every process left in
    `cwd`, and reports exit code None."""
    t0 = time.monotonic()
    p = subprocess.Popen([*prefix, *cmd], cwd=cwd, env=env(extra_env), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, errors="backslashreplace", start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        code = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        kill_all(processes_in(cwd))
        out, err = p.communicate()
        code = None
    return Run([*prefix, *cmd], code, out, err, time.monotonic() - t0)


def parse_driver_args(doc, cases):
    """The command line both drivers share: --mptrain, --mpiexec, --case NAME (repeatable), --all, --list.
    Prints the case names and returns None for --list; otherwise returns (args, names to run), with
    args.mptrain made absolute. Exits with a usage error for a missing --mptrain or an unknown case."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mptrain", help="the mptrain executable (required unless --list)")
    parser.add_argument("--mpiexec", default="mpiexec")
    parser.add_argument("--case", action="append", default=[])
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(cases))
        return None
    if not args.mptrain:
        parser.error("--mptrain is required")
    args.mptrain = os.path.abspath(args.mptrain)
    names = list(cases) if args.all else args.case
    unknown = [n for n in names if n not in cases]
    if unknown or not names:
        parser.error(f"unknown case(s) {unknown}; --list shows them" if unknown else "give --case NAME or --all")
    return args, names
