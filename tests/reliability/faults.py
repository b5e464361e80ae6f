"""Numerical and process faults of mptrain, each a CTest case under `mpiexec -n 2`:

  inject_overflow / inject_nan / inject_overflow_many_buckets
                                  one poisoned gradient: the step is skipped on every rank, the scale halves,
                                   training goes on
  overflow_every_step              a gradient non-finite at every step: the run stops with an error once the
                                   scaler's minimum-scale rule fires, exit 1, the last checkpoint intact
  watchdog_sigstop                 a rank frozen with SIGSTOP: the collective watchdog ends the job within
                                   timeout + 10 s; --resume auto continues from the last good checkpoint
  sigkill_rank                     a rank killed: mpirun ends the job; --resume auto continues
  startup_watchdog                 a rank that never reaches the first collective (a debug delay): the
                                   watchdog ends the job within timeout + 10 s, one start-up line naming the
                                   interface flag, nothing of the run written
  sigusr1_graceful_stop            SIGUSR1 to mpirun: the ranks agree in the step, write a checkpoint, exit 0
  sigterm_under_srun               SIGTERM to the ranks with SLURM_JOB_ID/SLURM_STEP_ID set: the same
  sigterm_one_rank_under_srun      the same with SIGTERM to rank 1 alone: rank 0 names SIGTERM too
  sigusr1_storm                    SIGUSR1 sent to both ranks without a pause until they exit: one graceful stop,
                                   exit 0, a checkpoint that resumes; every thread but the sigwait one blocks it
  sigterm_without_srun             SIGTERM to a rank under plain mpirun: the default action (the job dies)
  kill_during_checkpoint           rank 0 killed between writing a checkpoint and renaming it: the previous
                                   checkpoint is intact, and --resume auto skips a damaged newer one
  determinism                      two identical runs: bitwise identical non-timing metrics and checkpoints
  two_jobs_one_run                 a second job on a run another job holds: exit 1 on every rank within 10 s,
                                   one line naming the holder, no file of the run touched, the first job
                                   goes on and ends cleanly
  two_jobs_one_checkpoint_dir      the same for two runs given one --checkpoint-dir
  stale_lock_resume                the lock holder (rank 0) killed with SIGKILL: the next job takes the lock
                                   over and --resume auto continues
  eval_sample_while_locked         eval and sample of a checkpoint of a run that a job holds: they take no lock

  python3 faults.py --mptrain build/mptrain --case NAME [--case NAME...] | --all | --list
"""
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from common import (TINY, children, diff_snapshots, env, kill_all, parse_driver_args, processes_in, run, snapshot,
                    write_corpus)

TIMING = {"tokens_per_second", "mfu", "elapsed_seconds"}


class Failure(AssertionError):
    pass


def check(cond, message):
    if not cond:
        raise Failure(message)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Job:
    """A background `mpiexec -n 2 mptrain ...` with its output in files."""

    def __init__(self, ctx, cmd, extra_env=None):
        self.out_path = os.path.join(ctx.dir, f"job{ctx.jobs}.out")
        self.err_path = os.path.join(ctx.dir, f"job{ctx.jobs}.err")
        ctx.jobs += 1
        self.ctx, self.cmd = ctx, cmd
        self.out, self.err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ctx.dir, env=env(extra_env), stdout=self.out, stderr=self.err,
                                     start_new_session=True)
        self.started = time.monotonic()

    def stdout(self):
        return open(self.out_path).read()

    def stderr(self):
        return open(self.err_path).read()

    def wait_for(self, what, predicate, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            check(self.proc.poll() is None, f"the job ended (exit {self.proc.returncode}) before {what}\n"
                  + self.describe())
            time.sleep(0.05)
        raise Failure(f"timed out waiting for {what}\n" + self.describe())

    def rank_pid(self, rank):
        for pid in children(self.proc.pid):
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
                return pid
        raise Failure(f"no rank {rank} among the children of mpiexec {self.proc.pid}")

    def finish(self, timeout):
        """Waits up to `timeout` s; returns (exit code, seconds since `since`)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            kill_all(processes_in(self.ctx.dir))
            self.proc.wait()
            raise Failure(f"the job did not end within {timeout} s\n" + self.describe())
        finally:
            self.out.close()
            self.err.close()
        return self.proc.returncode

    def describe(self):
        return f"$ {' '.join(self.cmd)}\nstdout:\n{self.stdout()}\nstderr:\n{self.stderr()}"


class Context:
    def __init__(self, args, directory):
        self.args, self.dir, self.jobs = args, directory, 0
        self.corpus = os.path.join(directory, "corpus.txt")
        write_corpus(self.corpus, 40_000)

    def cmd(self, *extra, mpi=(), run_name="r"):
        return [self.args.mpiexec, "--oversubscribe", "--bind-to", "none", *mpi, "-n", "2", self.args.mptrain,
                "train", "--data", self.corpus, "--run-name", run_name, *TINY, *extra]

    def train(self, *extra, run_name="r", expect=0, timeout=120):
        r = run(self.cmd(*extra, run_name=run_name), cwd=self.dir, timeout=timeout)
        check(r.returncode == expect, f"exit {r.returncode}, expected {expect}\n" + r.describe())
        return r

    def ckpt_dir(self, run_name="r"):
        return os.path.join(self.dir, "runs", run_name, "checkpoints")

    def checkpoints(self, run_name="r"):
        d = self.ckpt_dir(run_name)
        return sorted(f for f in os.listdir(d) if re.fullmatch(r"ckpt_\d{8}\.safetensors", f)) if os.path.isdir(d) else []

    def newest_step(self, run_name="r"):
        """The step of the newest checkpoint (0 if none). A poll for one given checkpoint can miss it: the tiny
        model runs hundreds of steps a second and --keep-checkpoints deletes old ones."""
        names = self.checkpoints(run_name)
        return int(names[-1][5:13]) if names else 0

    def metrics(self, run_name="r"):
        with open(os.path.join(self.dir, "runs", run_name, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    def eval_ok(self, checkpoint):
        """`mptrain eval` of `checkpoint` succeeds (it reads and verifies the checksum)."""
        r = run([self.args.mpiexec, "--oversubscribe", "--bind-to", "none", "-n", "1", self.args.mptrain, "eval",
                 "--checkpoint", checkpoint, "--data", self.corpus, "--val-fraction", "0.1", "--eval-batches", "1",
                 "--global-batch", "4", "--micro-batch", "4"], cwd=self.dir, timeout=60)
        check(r.returncode == 0, f"the checkpoint {checkpoint} does not evaluate\n" + r.describe())


CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def injected(ctx, spec, kind_word, *extra):
    r = ctx.train("--steps", "6", "--inject-overflow", spec, *extra, timeout=60)
    for rank in (0, 1):
        line = f"step      3/6 | rank {rank}: non-finite gradients on some rank: step skipped on every rank, " \
               "loss scale 65536 -> 32768"
        check(line in r.stdout, f"missing line {line!r}\n" + r.describe())
    check(f"rank {spec.split(':')[1]}: --inject-overflow: gradient element set to {kind_word}" in r.stdout,
          r.describe())
    m = {line["step"]: line for line in ctx.metrics() if "train_loss" in line}
    check(sorted(m) == [1, 2, 3, 4, 5, 6], f"metrics steps {sorted(m)}")
    check(m[3]["step_skipped"] and m[3]["skipped"] == 1 and m[3]["grad_norm"] is None, f"step 3: {m[3]}")
    check(not m[2]["step_skipped"] and not m[4]["step_skipped"], f"steps 2, 4: {m[2]} {m[4]}")
    check(m[4]["loss_scale"] == 32768 and m[6]["loss_scale"] == 32768, f"scale after the skip: {m[4]} {m[6]}")
    check(m[6]["skipped"] == 1, f"step 6: {m[6]}")
    return [l for l in r.stdout.splitlines() if l.startswith("step") and "| rank" in l]


@case
def inject_overflow(ctx):
    return injected(ctx, "3:1", "inf")


@case
def inject_nan(ctx):
    return injected(ctx, "3:0:nan", "NaN")


@case
def inject_overflow_many_buckets(ctx):
    # Buckets smaller than one MLP weight (C=64): backward reports them out of index order (a weight before
    # its bias), so on the poisoned step every rank, not only the poisoned one, must give up the overlap, or
    # the ranks issue the bucket collectives in different orders (Open MPI then aborts or hangs).
    return injected(ctx, "3:1", "inf", "--channels", "64", "--bucket-mib", "0.01")


@case
def overflow_every_step(ctx):
    # Scale 8 -> 4 -> 2 -> 1 (min) at steps 3-5, then 3 overflows at the minimum (steps 6-8) stop the run.
    r = ctx.train("--steps", "50", "--inject-overflow", "3+:1", "--loss-scale-init", "8",
                  "--loss-scale-max-min-overflows", "3", "--checkpoint-interval", "2", "--keep-checkpoints", "10",
                  expect=1)
    lines = r.error_lines()
    check(len(lines) == 1 and "minimum" in lines[0], f"error lines {lines}\n" + r.describe())
    steps = [line["step"] for line in ctx.metrics() if "train_loss" in line]
    check(steps == list(range(1, 8)), f"logged steps {steps}: expected the stop at step 8")
    ckpts = ctx.checkpoints()
    check(ckpts == [f"ckpt_{s:08d}.safetensors" for s in (2, 4, 6)], f"checkpoints {ckpts}")
    for name in ckpts:
        ctx.eval_ok(os.path.join(ctx.ckpt_dir(), name))
    check(not [f for f in os.listdir(ctx.ckpt_dir()) if f.endswith(".tmp")], "a temporary checkpoint was left")
    return lines


def resume_after_crash(ctx, last):
    r = ctx.train("--steps", str(last + 3), "--resume", "auto", "--collective-timeout", "30")
    want = f"resumed from runs/r/checkpoints/ckpt_{last:08d}.safetensors at step {last}"
    check(want in r.stdout, f"expected {want!r}\n" + r.describe())
    return want


def crash(ctx, sig, timeout_s):
    job = Job(ctx, ctx.cmd("--steps", "100000", "--checkpoint-interval", "10", "--keep-checkpoints", "3",
                           "--log-interval", "10", "--collective-timeout", str(timeout_s)))
    job.wait_for("a checkpoint of step 20 or later", lambda: ctx.newest_step() >= 20)
    victim = job.rank_pid(1)
    t0 = time.monotonic()
    os.kill(victim, sig)
    code = job.finish(timeout=timeout_s + 30)
    seconds = time.monotonic() - t0
    check(code != 0, "the job exited 0 after a rank was stopped or killed\n" + job.describe())
    check(seconds <= timeout_s + 10, f"the job took {seconds:.1f} s to end (> {timeout_s} + 10)\n" + job.describe())
    left = processes_in(ctx.dir)
    check(not left, f"processes left behind: {left}")
    last = int(ctx.checkpoints()[-1][5:13])
    watchdog = [l for l in job.stderr().splitlines() if "did not complete within" in l]
    return job, seconds, last, watchdog


@case
def watchdog_sigstop(ctx):
    job, seconds, last, watchdog = crash(ctx, signal.SIGSTOP, 3)
    check(watchdog, "no watchdog line on stderr\n" + job.describe())
    check(re.search(r"rank \d on \S+: collective \w+ of \d+ \w+ elements did not complete within 3 s", watchdog[0]),
          watchdog[0])
    return [f"job ended {seconds:.1f} s after SIGSTOP", *watchdog, resume_after_crash(ctx, last)]


@case
def sigkill_rank(ctx):
    job, seconds, last, _ = crash(ctx, signal.SIGKILL, 30)
    return [f"job ended {seconds:.1f} s after SIGKILL, exit {job.proc.returncode}", resume_after_crash(ctx, last)]


@case
def startup_watchdog(ctx):
    # Rank 1 sleeps before the first collective, as a rank the others cannot reach looks to them (the docker0
    # case of tests/multihost): rank 0's watchdog already guards that collective.
    timeout_s = 2
    delay = {"MPTRAIN_DEBUG_DELAY_FIRST_COLLECTIVE": "1:60"}
    job = Job(ctx, ctx.cmd("--steps", "5", "--collective-timeout", str(timeout_s),
                           mpi=("-x", "MPTRAIN_DEBUG_DELAY_FIRST_COLLECTIVE")), extra_env=delay)
    code = job.finish(timeout=timeout_s + 30)
    seconds = time.monotonic() - job.started
    check(code != 0, "the job exited 0 with a rank held before the first collective\n" + job.describe())
    check(seconds <= timeout_s + 10, f"the job took {seconds:.1f} s to end (> {timeout_s} + 10)\n" + job.describe())
    left = processes_in(ctx.dir)
    check(not left, f"processes left behind: {left}")
    lines = [l for l in job.stderr().splitlines() if l.startswith("mptrain: ")]
    check(len(lines) == 1 and re.match(r"mptrain: rank 0 on \S+: start-up: the first collective \(MPI_Comm_idup, .*\) "
                                       rf"did not complete within {timeout_s} s .*btl_tcp_if_include", lines[0]),
          f"expected one start-up watchdog line from rank 0, got {lines}\n" + job.describe())
    check(not os.path.exists(os.path.join(ctx.dir, "runs")), "the run was started before the ranks agreed")
    return [f"job ended {seconds:.1f} s after its start, exit {code}", lines[0]]


def graceful(ctx, send, label, mpi=()):
    job = Job(ctx, ctx.cmd("--steps", "100000", "--checkpoint-interval", "1000", "--log-interval", "10",
                           mpi=mpi))
    job.wait_for("step 20", lambda: "step     20/100000" in job.stdout())
    t0 = time.monotonic()
    send(job)
    code = job.finish(timeout=30)
    seconds = time.monotonic() - t0
    check(code == 0, f"exit {code} after {label}\n" + job.describe())
    check(seconds <= 10, f"{seconds:.1f} s to stop")
    lines = [l for l in job.stdout().splitlines() if "graceful stop" in l]
    check(len(lines) == 1 and f"graceful stop ({label})" in lines[0], job.describe())
    step = int(re.search(r"step +(\d+)/", lines[0]).group(1))
    check(ctx.checkpoints() == [f"ckpt_{step:08d}.safetensors"], f"checkpoints {ctx.checkpoints()}")
    return [lines[0], resume_after_crash(ctx, step)]


@case
def sigusr1_graceful_stop(ctx):
    return graceful(ctx, lambda job: os.kill(job.proc.pid, signal.SIGUSR1), "SIGUSR1")


@case
def sigterm_under_srun(ctx):
    # srun signals every task itself; SLURM_JOB_ID and SLURM_STEP_ID tell mptrain it runs under srun.
    def send(job):
        kill_all([job.rank_pid(0), job.rank_pid(1)], signal.SIGTERM)
    return graceful(ctx, send, "SIGTERM", mpi=("-x", "SLURM_JOB_ID=4242", "-x", "SLURM_STEP_ID=0"))


def signal_mask_problems(pid, signal_number):
    """The threads of process `pid` that do not block `signal_number`, other than the one waiting for it."""
    problems = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            name = open(f"/proc/{pid}/task/{task}/comm").read().strip()
            status = open(f"/proc/{pid}/task/{task}/status").read()
        except OSError:
            continue  # the thread ended meanwhile
        blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
        if name != "mpt-stop-signal" and not blocked >> (signal_number - 1) & 1:
            problems.append(f"thread {task} ({name}) of pid {pid}")
    return problems


@case
def sigterm_one_rank_under_srun(ctx):
    # Only rank 1 gets the signal: the stop is agreed in the step, and rank 0's line still names SIGTERM.
    return graceful(ctx, lambda job: os.kill(job.rank_pid(1), signal.SIGTERM), "SIGTERM",
                    mpi=("-x", "SLURM_JOB_ID=4242", "-x", "SLURM_STEP_ID=0"))


@case
def sigusr1_storm(ctx):
    # SIGUSR1 sent to both ranks as fast as Python can, from step 20 until they exit, while they compute on 2
    # threads with a model big enough for steps of several ms: oneDNN's f32 GEMM kernels point the stack
    # pointer into the heap, so a signal handled on a compute thread corrupted the heap (seen in about 1 of
    # 10 runs of a single SIGUSR1 before the signals were blocked on every thread but a sigwait one).
    job = Job(ctx, ctx.cmd("--steps", "100000", "--checkpoint-interval", "1000", "--log-interval", "10",
                           "--channels", "128", "--heads", "4", "--seq-len", "128", "--threads", "2"))
    job.wait_for("step 20", lambda: "step     20/100000" in job.stdout())
    pids = [job.rank_pid(0), job.rank_pid(1)]
    unblocked = [p for pid in pids for p in signal_mask_problems(pid, signal.SIGUSR1)]
    check(not unblocked, "threads that would run a SIGUSR1 handler: " + ", ".join(unblocked))
    sent, t0 = 0, time.monotonic()
    while job.proc.poll() is None and time.monotonic() - t0 < 20:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGUSR1)
                sent += 1
            except ProcessLookupError:
                pass
    code = job.finish(timeout=30)
    check(code == 0, f"exit {code} after {sent} SIGUSR1s\n" + job.describe())
    lines = [l for l in job.stdout().splitlines() if "graceful stop" in l]
    check(len(lines) == 1 and "graceful stop (SIGUSR1)" in lines[0], job.describe())
    step = int(re.search(r"step +(\d+)/", lines[0]).group(1))
    check(ctx.checkpoints() == [f"ckpt_{step:08d}.safetensors"], f"checkpoints {ctx.checkpoints()}")
    r = ctx.train("--steps", str(step + 3), "--resume", "auto", "--collective-timeout", "30",
                  "--channels", "128", "--heads", "4", "--seq-len", "128")
    want = f"resumed from runs/r/checkpoints/ckpt_{step:08d}.safetensors at step {step}"
    check(want in r.stdout, f"expected {want!r}\n" + r.describe())
    return [f"{sent} SIGUSR1s in {time.monotonic() - t0:.1f} s: " + lines[0], want]


@case
def sigterm_without_srun(ctx):
    job = Job(ctx, ctx.cmd("--steps", "100000", "--checkpoint-interval", "1000", "--log-interval", "10"))
    job.wait_for("step 20", lambda: "step     20/100000" in job.stdout())
    os.kill(job.rank_pid(1), signal.SIGTERM)
    code = job.finish(timeout=30)
    check(code != 0 and "graceful stop" not in job.stdout(), f"exit {code}\n" + job.describe())
    check(not processes_in(ctx.dir), "processes left behind")
    return [f"exit {code}: default action of SIGTERM (no handler outside srun)"]


@case
def kill_during_checkpoint(ctx):
    pause = {"MPTRAIN_DEBUG_PAUSE_BEFORE_RENAME": "ckpt_00000004.safetensors"}
    job = Job(ctx, ctx.cmd("--steps", "6", "--checkpoint-interval", "2", "--keep-checkpoints", "5",
                           mpi=("-x", "MPTRAIN_DEBUG_PAUSE_BEFORE_RENAME")), extra_env=pause)
    job.wait_for("the pause before the rename", lambda: "paused before renaming" in job.stderr())
    d = ctx.ckpt_dir()
    before = sha256(os.path.join(d, "ckpt_00000002.safetensors"))
    pid = int(re.search(r"pid (\d+) paused", job.stderr()).group(1))
    os.kill(pid, signal.SIGKILL)
    code = job.finish(timeout=30)
    check(code != 0, "exit 0 after rank 0 was killed\n" + job.describe())
    check(not processes_in(ctx.dir), "processes left behind")
    check(ctx.checkpoints() == ["ckpt_00000002.safetensors"], f"checkpoints {ctx.checkpoints()}")
    check(sha256(os.path.join(d, "ckpt_00000002.safetensors")) == before, "the previous checkpoint changed")
    tmp = os.path.join(d, "ckpt_00000004.safetensors.tmp")
    check(os.path.exists(tmp), "no temporary file of the interrupted checkpoint")
    ctx.eval_ok(os.path.join(d, "ckpt_00000002.safetensors"))
    # A newer checkpoint that is damaged (what a non-atomic writer would leave): --resume auto skips it.
    data = open(tmp, "rb").read()
    with open(os.path.join(d, "ckpt_00000004.safetensors"), "wb") as f:
        f.write(data[: len(data) // 2])
    r = ctx.train("--steps", "6", "--checkpoint-interval", "2", "--keep-checkpoints", "5", "--resume", "auto")
    skip = [l for l in r.stderr.splitlines() if "skipping damaged checkpoint" in l]
    check(len(skip) == 1 and "ckpt_00000004.safetensors" in skip[0], "no skip warning\n" + r.describe())
    want = "resumed from runs/r/checkpoints/ckpt_00000002.safetensors at step 2"
    check(want in r.stdout, r.describe())
    check(ctx.checkpoints()[-1] == "ckpt_00000006.safetensors", f"checkpoints {ctx.checkpoints()}")
    ctx.eval_ok(os.path.join(d, "ckpt_00000004.safetensors"))  # rewritten whole by the resumed run
    return [job.stderr().splitlines()[0], skip[0], want]


@case
def determinism(ctx):
    extra = ("--steps", "10", "--eval-interval", "5", "--checkpoint-interval", "5", "--precision", "fp16",
             "--loss-scale-window", "3", "--threads", "2")
    ctx.train(*extra, run_name="one")
    ctx.train(*extra, run_name="two")
    strip = lambda lines: [{k: v for k, v in line.items() if k not in TIMING} for line in lines]
    a, b = strip(ctx.metrics("one")), strip(ctx.metrics("two"))
    check(len(a) == 12, f"{len(a)} metric lines, expected 10 train + 2 validation lines: {a}")
    check(json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True), f"metrics differ:\n{a}\n{b}")
    check(any(line.get("step_skipped") for line in a), f"no skipped step exercised: {a}")
    # The checkpoints' metadata holds the run name; the tensor bytes must be identical.
    for name in ctx.checkpoints("one"):
        data = []
        for run_name in ("one", "two"):
            raw = open(os.path.join(ctx.ckpt_dir(run_name), name), "rb").read()
            data.append(raw[8 + int.from_bytes(raw[:8], "little"):])
        check(data[0] == data[1] and len(data[0]) > 0, f"{name}: tensor bytes differ")
    return [f"{len(a)} metric lines bitwise identical in {sorted(set().union(*a))}",
            f"tensor bytes identical in {ctx.checkpoints('one')}"]


def holding_job(ctx, *extra, run_name="r"):
    """A job that holds its run's lock, frozen (SIGSTOP on both ranks) after its checkpoint of step 10, so
    that nothing in the directory changes while another command runs beside it."""
    ckpt_dir = ctx.ckpt_dir(run_name)
    if "--checkpoint-dir" in extra:
        ckpt_dir = os.path.join(ctx.dir, extra[list(extra).index("--checkpoint-dir") + 1])
    job = Job(ctx, ctx.cmd("--steps", "100000", "--checkpoint-interval", "10", "--keep-checkpoints", "100",
                           "--log-interval", "10", "--collective-timeout", "120", *extra, run_name=run_name))
    job.wait_for("the checkpoint of step 10",
                 lambda: os.path.exists(os.path.join(ckpt_dir, "ckpt_00000010.safetensors")))
    job.ranks = [job.rank_pid(0), job.rank_pid(1)]
    kill_all(job.ranks, signal.SIGSTOP)
    return job


def last_training_step_logged(ctx, run_name):
    """The last step with a training line in the run's metrics.jsonl (written by rank 0 itself, unlike stdout,
    which mpiexec forwards with a delay); 0 when none, or while the last line is still being written."""
    path = os.path.join(ctx.dir, "runs", run_name, "metrics.jsonl")
    steps = [0]
    try:
        with open(path) as f:
            for line in f:
                entry = json.loads(line)
                if "train_loss" in entry:
                    steps.append(entry["step"])
    except (OSError, ValueError):
        return 0
    return max(steps)


def release_holding_job(ctx, job, run_name="r"):
    """Lets the frozen job go on, stops it gracefully and checks it ended as if alone: exit 0, metrics.jsonl
    whole (one JSON object a line, steps increasing), its lock file gone."""
    kill_all(job.ranks, signal.SIGCONT)
    # Step 20's training line: stdout's lines are forwarded by mpiexec with a delay, so a "step" line that
    # appeared after the freeze could still be step 10's, and stopping then left metrics.jsonl with step 10
    # only (seen once in CI).
    job.wait_for("step 20 logged after the freeze", lambda: last_training_step_logged(ctx, run_name) >= 20)
    os.kill(job.proc.pid, signal.SIGUSR1)
    code = job.finish(timeout=60)
    check(code == 0, f"the first job exited {code}\n" + job.describe())
    steps = [line["step"] for line in ctx.metrics(run_name) if "train_loss" in line]
    check(steps == sorted(set(steps)) and steps[:2] == [10, 20], f"the first job's logged steps: {steps}")
    check(not os.path.exists(os.path.join(ctx.dir, "runs", run_name, "lock")), "the lock file outlived the job")


def second_job_refused(ctx, first_extra, second_extra, second_run_name, needles):
    job = holding_job(ctx, *first_extra)
    try:
        # The frozen job's own stdout/stderr are left out: its mpiexec is not frozen and may still forward
        # lines its ranks wrote just before the freeze.
        own_logs = {os.path.relpath(job.out_path, ctx.dir), os.path.relpath(job.err_path, ctx.dir)}

        def files():
            return {p: v for p, v in snapshot(ctx.dir).items() if p not in own_logs}

        before = files()
        r = run(ctx.cmd("--steps", "100", "--resume", "auto", *second_extra, run_name=second_run_name),
                cwd=ctx.dir, timeout=60)
        changed = diff_snapshots(before, files())
        lines = r.error_lines()
        check(r.returncode == 1, f"the second job exited {r.returncode}, expected 1\n" + r.describe())
        check(r.seconds <= 10, f"the second job took {r.seconds:.1f} s (> 10 s)")
        check(len(lines) == 1, f"{len(lines)} 'mptrain: error:' lines, expected 1\n" + r.describe())
        holder = f"(host {socket.gethostname()}, pid {job.ranks[0]}, since "
        for needle in (holder, *needles):
            check(needle in lines[0], f"the error line lacks {needle!r}: {lines[0]}")
        check(not changed, "the second job changed files:\n  " + "\n  ".join(changed))
        check(set(processes_in(ctx.dir)) == set(job.ranks) | {job.proc.pid} | set(children(job.proc.pid)),
              f"processes left by the second job: {processes_in(ctx.dir)}")
    except BaseException:
        kill_all(job.ranks, signal.SIGCONT)
        raise
    release_holding_job(ctx, job)
    return [f"second job: exit {r.returncode} in {r.seconds:.1f} s: {lines[0]}"]


@case
def two_jobs_one_run(ctx):
    return second_job_refused(ctx, (), (), "r", ("mptrain: error: run 'r' is in use by another job",
                                                 "); use another --run-name or stop that job"))


@case
def two_jobs_one_checkpoint_dir(ctx):
    return second_job_refused(ctx, ("--checkpoint-dir", "shared"), ("--checkpoint-dir", "shared"), "other",
                              ("mptrain: error: --checkpoint-dir shared is in use by another job",
                               "); use another --checkpoint-dir or stop that job"))


@case
def stale_lock_resume(ctx):
    job = Job(ctx, ctx.cmd("--steps", "100000", "--checkpoint-interval", "10", "--keep-checkpoints", "3",
                           "--log-interval", "10", "--collective-timeout", "30"))
    job.wait_for("a checkpoint of step 20 or later", lambda: ctx.newest_step() >= 20)
    holder = job.rank_pid(0)
    os.kill(holder, signal.SIGKILL)
    code = job.finish(timeout=30)
    check(code != 0, "exit 0 after rank 0 was killed\n" + job.describe())
    check(not processes_in(ctx.dir), "processes left behind")
    lock = os.path.join(ctx.dir, "runs", "r", "lock")
    check(os.path.exists(lock), "no lock file left by the killed job")
    stale = json.load(open(lock))
    check(stale["pid"] == holder and stale["host"] == socket.gethostname(), f"the lock file names {stale}")
    last = int(ctx.checkpoints()[-1][5:13])
    r = ctx.train("--steps", str(last + 3), "--resume", "auto")
    took = [l for l in r.stdout.splitlines() if "taking over the lock" in l]
    check(len(took) == 1 and took[0].startswith("run 'r': taking over the lock of a job that did not end cleanly "
                                                f"(host {socket.gethostname()}, pid {holder}, since "),
          "no take-over line\n" + r.describe())
    want = f"resumed from runs/r/checkpoints/ckpt_{last:08d}.safetensors at step {last}"
    check(want in r.stdout, f"expected {want!r}\n" + r.describe())
    check(not os.path.exists(lock), "the lock file outlived the resumed job")
    return [took[0], want]


@case
def eval_sample_while_locked(ctx):
    job = holding_job(ctx)
    said = []
    try:
        ckpt = os.path.join("runs", "r", "checkpoints", "ckpt_00000010.safetensors")
        commands = {
            "eval": ["eval", "--checkpoint", ckpt, "--data", ctx.corpus, "--val-fraction", "0.1", "--eval-batches",
                     "1", "--global-batch", "4", "--micro-batch", "4"],
            "sample": ["sample", "--checkpoint", ckpt, "--prompt", "The ", "--sample-tokens", "8"],
        }
        # The frozen job's own stdout/stderr are left out, as in second_job_refused: its mpiexec is not frozen
        # and may still forward lines its ranks wrote just before the freeze.
        own_logs = {os.path.relpath(job.out_path, ctx.dir), os.path.relpath(job.err_path, ctx.dir)}

        def files():
            return {p: v for p, v in snapshot(ctx.dir).items() if p not in own_logs}

        for name, app in commands.items():
            before = files()
            r = run([ctx.args.mpiexec, "--oversubscribe", "--bind-to", "none", "-n", "1", ctx.args.mptrain, *app],
                    cwd=ctx.dir, timeout=60)
            check(r.returncode == 0, f"{name} beside a job holding the run exited {r.returncode}\n" + r.describe())
            changed = diff_snapshots(before, files())
            check(not changed, f"{name} changed files: {changed}")
            said.append(f"{name}: exit 0: {r.stdout.strip().splitlines()[-1]}")
    except BaseException:
        kill_all(job.ranks, signal.SIGCONT)
        raise
    release_holding_job(ctx, job)
    return said


def main():
    parsed = parse_driver_args(__doc__, CASES)
    if parsed is None:
        return 0
    args, names = parsed
    failed = 0
    for name in names:
        directory = tempfile.mkdtemp(prefix=f"mptrain_fault_{name}_")
        t0 = time.monotonic()
        try:
            said = CASES[name](Context(args, directory))
            print(f"ok   {name} ({time.monotonic() - t0:.1f} s)")
            for line in said:
                print(f"     {line}")
        except Failure as e:
            failed += 1
            print(f"FAIL {name}: {e}")
        finally:
            kill_all(processes_in(directory))
            shutil.rmtree(directory, ignore_errors=True)
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
