"""The bad-input matrix of mptrain: one case per bad flag, config file, data file, checkpoint, rank
disagreement or run held by another job, each run under `mpiexec -n 2` in a fresh directory.

Every case asserts: the exit code (2 for a usage error, 1 for a file that cannot be used), exactly one line
"mptrain: error: ..." that names the input and what is wrong (the case's needles), the job gone within 10
seconds with no process left behind, and no file created, removed or changed in the case's directory
(paths, sizes, mtimes and SHA-256 compared before and after).

  python3 bad_input.py --mptrain build/mptrain --case NAME     # one case (what CTest runs)
  python3 bad_input.py --mptrain build/mptrain --list          # the case names
  python3 bad_input.py --mptrain build/mptrain --all           # every case, printing what mptrain said

A case that cannot run here (no setpriv, no user nobody) prints SKIP with the reason and exits 77.
"""
import os
import pwd
import grp
import shutil
import stat
import subprocess
import sys
import tempfile
import time

from common import (TINY, diff_snapshots, parse_driver_args, processes_in, run, shard_tokens, snapshot,
                    write_corpus, write_shard)

USAGE, BAD_FILE = 2, 1
SKIPPED = 77  # exit status of a run whose every case was skipped (CTest's SKIP_RETURN_CODE)
DEADLINE_S = 10.0


class Skip(Exception):
    pass


class Case:
    """A case's directory and the commands it builds. Subclass hooks: prepare() makes the inputs."""

    def __init__(self, args, directory):
        self.args, self.dir = args, directory
        self.cleanup = []  # callables run after the case
        self.corpus = os.path.join(directory, "corpus.txt")
        write_corpus(self.corpus, 20_000)

    def mpiexec(self, *app, ranks=2):
        return [self.args.mpiexec, "--oversubscribe", "--bind-to", "none", "-n", str(ranks), self.args.mptrain,
                *app]

    def train(self, *extra, data=None, run_name="bad"):
        return self.mpiexec("train", "--data", data or self.corpus, "--run-name", run_name, "--steps", "2", *TINY,
                            *extra)

    def checkpoint(self, name, *extra, data=None):
        """Trains 2 steps in a scratch directory and copies the final checkpoint to `name` in the case dir."""
        scratch = os.path.join(self.dir, "scratch")
        r = run(self.mpiexec("train", "--data", data or self.corpus, "--run-name", "src", "--steps", "2", *TINY,
                             *extra), cwd=os.makedirs(scratch, exist_ok=True) or scratch, timeout=60)
        if r.returncode != 0:
            raise AssertionError("making the checkpoint failed:\n" + r.describe())
        path = os.path.join(self.dir, name)
        shutil.copy(os.path.join(scratch, "runs", "src", "checkpoints", "ckpt_00000002.safetensors"), path)
        shutil.rmtree(scratch)
        return path

    def hold_lock(self, name, text):
        """Another job holding the lock file `name` (flock, as mptrain takes it) that contains `text`: a
        process outside the case directory, so that it is not one the job under test left behind."""
        script = ("import fcntl, os, sys, time\n"
                  "os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)\n"
                  "f = open(sys.argv[1], 'w'); f.write(sys.argv[2]); f.flush()\n"
                  "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
                  "print('locked', flush=True)\n"
                  "time.sleep(600)\n")
        holder = subprocess.Popen([sys.executable, "-c", script, os.path.join(self.dir, name), text], cwd="/",
                                  stdout=subprocess.PIPE, text=True)
        self.cleanup.append(lambda: (holder.kill(), holder.wait()))
        if holder.stdout.readline().strip() != "locked":
            raise AssertionError(f"the lock holder for {name} did not start")

    def write(self, name, content, mode="w"):
        path = os.path.join(self.dir, name)
        with open(path, mode) as f:
            f.write(content)
        return path


# name -> (expected exit code, needles of the error line, function(case) -> (command, run options))
CASES = {}


def case(name, code, *needles):
    def register(fn):
        CASES[name] = (code, needles, fn)
        return fn
    return register


# ---- flags ---------------------------------------------------------------------------------------------
@case("flag_layers_zero", USAGE, "--layers", "got 0")
def _(c):
    return c.train("--layers", "0")


@case("flag_channels_negative", USAGE, "--channels", "got -32")
def _(c):
    return c.train("--channels", "-32")


@case("flag_micro_batch_zero", USAGE, "--micro-batch", "got 0")
def _(c):
    return c.train("--micro-batch", "0")


@case("micro_batch_does_not_fit", USAGE, "--micro-batch 1000000000 needs", "TiB per rank", "available",
      "the largest micro-batch that fits is")
def _(c):
    # Checked against the memory a rank can use before anything is allocated (tens of TiB here).
    return c.train("--micro-batch", "1000000000", "--global-batch", "2000000000")


@case("micro_batch_auto_nothing_fits", USAGE, "--micro-batch auto: nothing fits", "--memory-budget",
      "micro-batch 1 needs")
def _(c):
    return c.train("--micro-batch", "auto", "--memory-budget", "0.0001")


@case("flag_micro_batch_word", USAGE, "--micro-batch", "'lots'")
def _(c):
    return c.train("--micro-batch", "lots")


@case("flag_memory_budget_without_auto", USAGE, "--memory-budget 2", "--micro-batch auto")
def _(c):
    return c.train("--memory-budget", "2")


@case("flag_memory_budget_too_large", USAGE, "--memory-budget must be a finite number of GiB", "got 1e+30")
def _(c):
    # Above the ceiling, the budget in bytes would not fit size_t (it used to wrap to a budget of 0).
    return c.train("--micro-batch", "auto", "--memory-budget", "1e30")


@case("flag_unknown_recompute", USAGE, "--recompute", "full")
def _(c):
    return c.train("--recompute", "full")


@case("flag_steps_negative", USAGE, "--steps", "got -5")
def _(c):
    return c.train("--steps", "-5")


@case("flag_heads_not_dividing_channels", USAGE, "--heads 3 does not divide --channels 32")
def _(c):
    return c.train("--heads", "3")


@case("flag_seq_len_over_model_maximum", USAGE, "--seq-len 2000000", "maximum")
def _(c):
    return c.train("--seq-len", "2000000")


@case("flag_unknown_precision", USAGE, "--precision", "fp8")
def _(c):
    return c.train("--precision", "fp8")


@case("flag_global_batch_not_divisible", USAGE, "--global-batch 12", "--micro-batch 4 x 2 ranks")
def _(c):
    return c.train("--global-batch", "12")


@case("flag_batch_rampup_not_divisible", USAGE, "--batch-rampup: the batch 4 ", "--micro-batch 4 x 2 ranks")
def _(c):
    return c.train("--batch-rampup", "4,4,64")


@case("flag_batch_rampup_malformed", USAGE, "--batch-rampup '4,4'", "START,INCREMENT,SAMPLES")
def _(c):
    return c.train("--batch-rampup", "4,4")


@case("flag_unknown_optimizer", USAGE, "--optimizer", "sgd")
def _(c):
    return c.train("--optimizer", "sgd")


@case("flag_not_a_number", USAGE, "--lr", "fast")
def _(c):
    return c.train("--lr", "fast")


@case("flag_lr_zero", USAGE, "--lr", "got 0")
def _(c):
    return c.train("--lr", "0")


@case("flag_loss_scale_backoff", USAGE, "--loss-scale-backoff", "1.5")
def _(c):
    return c.train("--loss-scale-backoff", "1.5")


@case("flag_unknown", USAGE, "--layer")
def _(c):
    return c.train("--layer", "2")


@case("flag_inject_overflow_syntax", USAGE, "--inject-overflow '0:1'", "STEP")
def _(c):
    return c.train("--inject-overflow", "0:1")


@case("flag_inject_overflow_rank", USAGE, "--inject-overflow '1:5'", "rank 5")
def _(c):
    return c.train("--inject-overflow", "1:5")


@case("flag_collective_timeout_negative", USAGE, "--collective-timeout", "got -1")
def _(c):
    return c.train("--collective-timeout", "-1")


@case("flag_collective_timeout_infinite", USAGE, "--collective-timeout must be a finite number", "got inf")
def _(c):
    return c.train("--collective-timeout", "inf")


# ---- JSON config -----------------------------------------------------------------------------------------
@case("json_syntax_error", USAGE, "bad.json", "line 3, column 3")
def _(c):
    c.write("bad.json", '{\n  "layers": 1,\n  heads: 2\n}\n')
    return c.train("--config", "bad.json")


@case("json_unknown_key", USAGE, "cfg.json", "unknown key 'colour'", "line 3, column 3")
def _(c):
    c.write("cfg.json", '{\n  "layers": 1,\n  "colour": "blue"\n}\n')
    return c.train("--config", "cfg.json")


@case("json_wrong_type", USAGE, "cfg.json", "key 'heads' must be an integer", "string \"two\"", "line 2, column 14")
def _(c):
    c.write("cfg.json", '{"layers": 1,\n             "heads": "two"}\n')
    return c.train("--config", "cfg.json")


@case("json_missing_file", USAGE, "config nope.json", "cannot open")
def _(c):
    return c.train("--config", "nope.json")


# ---- data ------------------------------------------------------------------------------------------------
@case("data_missing", BAD_FILE, "data file 'missing.txt'", "no such file")
def _(c):
    return c.train(data="missing.txt")


@case("data_empty", BAD_FILE, "data file 'empty.txt'", "empty")
def _(c):
    c.write("empty.txt", "")
    return c.train(data="empty.txt")


@case("data_directory", BAD_FILE, "adir", "directory")
def _(c):
    os.mkdir(os.path.join(c.dir, "adir"))
    return c.train(data="adir")


@case("data_shorter_than_one_sequence", BAD_FILE, "short.txt", "shorter than one sequence")
def _(c):
    c.write("short.txt", "In the beginning.\n")
    return c.train(data="short.txt")


@case("shard_wrong_magic", BAD_FILE, "magic.bin", "wrong magic 12345")
def _(c):
    write_shard(os.path.join(c.dir, "magic.bin"), shard_tokens(), magic=12345)
    return c.train(data="magic.bin")


@case("shard_wrong_version", BAD_FILE, "version.bin", "wrong version 7")
def _(c):
    write_shard(os.path.join(c.dir, "version.bin"), shard_tokens(), version=7)
    return c.train(data="version.bin")


@case("shard_size_disagrees_with_header", BAD_FILE, "size.bin", "disagrees with the header's token count 5000")
def _(c):
    write_shard(os.path.join(c.dir, "size.bin"), shard_tokens(4000), count=5000)
    return c.train(data="size.bin")


@case("shard_token_outside_vocabulary", BAD_FILE, "vocab.bin", "token 60000 at index 17")
def _(c):
    tokens = shard_tokens(4000)
    tokens[17] = 60000
    write_shard(os.path.join(c.dir, "vocab.bin"), tokens)
    return c.train(data="vocab.bin")


@case("data_no_read_permission", BAD_FILE, "secret.txt", "ermission denied")
def _(c):
    if shutil.which("setpriv") is None:
        raise Skip("setpriv (util-linux) is not installed")
    try:
        pwd.getpwnam("nobody")
        grp.getgrnam("nogroup")
    except KeyError:
        raise Skip("no user 'nobody' or group 'nogroup' to drop privileges to")
    # Root reads every file, so the job runs as nobody; the case directory and the binary must be reachable.
    os.chmod(c.dir, 0o777)
    for path in (c.args.mptrain, c.dir):
        probe = path
        while probe != "/":
            mode = os.stat(probe).st_mode
            if not mode & stat.S_IXOTH:
                raise Skip(f"{probe} is not searchable by 'nobody' (mode {oct(mode & 0o777)})")
            probe = os.path.dirname(probe)
    secret = c.write("secret.txt", open(c.corpus).read())
    os.chmod(secret, 0o600)
    cmd = c.train(data="secret.txt")
    return cmd, {"prefix": ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"],
                 "extra_env": {"HOME": c.dir, "TMPDIR": "/tmp"}}


@case("data_missing_on_one_rank", BAD_FILE, "data file 'corpus.txt'", "no such file")
def _(c):
    # Two working directories; rank 1's lacks the data file: only rank 1 sees the problem and says so.
    a, b = os.path.join(c.dir, "a"), os.path.join(c.dir, "b")
    os.makedirs(a)
    os.makedirs(b)
    shutil.copy(c.corpus, a)
    app = ["train", "--data", "corpus.txt", "--run-name", "bad", "--steps", "2", *TINY]
    return [c.args.mpiexec, "--oversubscribe", "--bind-to", "none", "-n", "1", "-wdir", a, c.args.mptrain, *app,
            ":", "-n", "1", "-wdir", b, c.args.mptrain, *app]


# ---- checkpoints ------------------------------------------------------------------------------------------
@case("checkpoint_missing", BAD_FILE, "checkpoint gone.safetensors", "cannot open")
def _(c):
    return c.train("--resume", "gone.safetensors", "--steps", "4")


@case("checkpoint_truncated", BAD_FILE, "checkpoint cut.safetensors", "truncated")
def _(c):
    path = c.checkpoint("cut.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return c.train("--resume", "cut.safetensors", "--steps", "4")


@case("checkpoint_flipped_byte", BAD_FILE, "flip.safetensors", "checksum mismatch")
def _(c):
    path = c.checkpoint("flip.safetensors")
    data = bytearray(open(path, "rb").read())
    data[len(data) - 1000] ^= 0x10  # a byte of the tensor data (the header is at the start)
    with open(path, "wb") as f:
        f.write(data)
    return c.train("--resume", "flip.safetensors", "--steps", "4")


@case("checkpoint_other_model_shape", BAD_FILE, "ckpt.safetensors", "channels is 32, this run has 64")
def _(c):
    c.checkpoint("ckpt.safetensors")
    return c.train("--resume", "ckpt.safetensors", "--steps", "4", "--channels", "64")


@case("checkpoint_other_dtype", BAD_FILE, "ckpt.safetensors", "written by a fp32 run, this run is fp16",
      "--precision")
def _(c):
    c.checkpoint("ckpt.safetensors", "--precision", "fp32")
    return c.train("--resume", "ckpt.safetensors", "--steps", "4", "--precision", "fp16")


@case("checkpoint_other_vocabulary", BAD_FILE, "ckpt.safetensors", "vocab_size is 256, this run has 50257")
def _(c):
    c.checkpoint("ckpt.safetensors")
    write_shard(os.path.join(c.dir, "tokens.bin"), shard_tokens())
    return c.train("--resume", "ckpt.safetensors", "--steps", "4", data="tokens.bin")


@case("shard_token_outside_header_vocabulary", BAD_FILE, "small.bin",
      "token 1000 at index 9 is outside the shard's vocabulary of 1000")
def _(c):
    tokens = [t % 1000 for t in shard_tokens(4000)]
    tokens[9] = 1000
    write_shard(os.path.join(c.dir, "small.bin"), tokens, vocab=1000)
    return c.train(data="small.bin")


@case("shard_header_vocabulary_out_of_range", BAD_FILE, "big.bin", "vocabulary size 70000 in header slot 3")
def _(c):
    write_shard(os.path.join(c.dir, "big.bin"), shard_tokens(4000), vocab=70000)
    return c.train(data="big.bin")


@case("shards_with_different_vocabularies", BAD_FILE, "b.bin", "differs from", "a.bin")
def _(c):
    write_shard(os.path.join(c.dir, "a.bin"), [t % 1000 for t in shard_tokens(4000)], vocab=1000)
    write_shard(os.path.join(c.dir, "b.bin"), [t % 1000 for t in shard_tokens(4000)], vocab=2000)
    return c.train(data=os.path.join(c.dir, "*.bin"))


@case("init_from_other_model_shape", BAD_FILE, "ckpt.safetensors", "metadata channels is 32, --channels is 64")
def _(c):
    c.checkpoint("ckpt.safetensors")
    return c.train("--init-from", "ckpt.safetensors", "--channels", "64")


@case("init_from_missing", BAD_FILE, "--init-from", "nowhere", "no such")
def _(c):
    return c.train("--init-from", "nowhere")


@case("init_from_not_safetensors", BAD_FILE, "--init-from", "corpus.txt")
def _(c):
    return c.train("--init-from", "corpus.txt")


@case("eval_checkpoint_truncated", BAD_FILE, "checkpoint cut.safetensors", "truncated")
def _(c):
    path = c.checkpoint("cut.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:100])
    return c.mpiexec("eval", "--checkpoint", "cut.safetensors", "--data", c.corpus, "--eval-batches", "1",
                     "--global-batch", "8", "--micro-batch", "4", "--val-fraction", "0.1")


# ---- environment -------------------------------------------------------------------------------------------
@case("env_onednn_f32_word", USAGE, "MPTRAIN_ONEDNN_F32=yes", "0, 1, auto")
def _(c):
    return c.train(), {"extra_env": {"MPTRAIN_ONEDNN_F32": "yes"}}


@case("env_onednn_bf16_on_one_rank", USAGE, "MPTRAIN_ONEDNN_BF16=on", "0, 1, auto")
def _(c):
    # Only rank 1 has the bad value (a host whose environment differs): it says so, and both ranks exit.
    app = ["train", "--data", c.corpus, "--run-name", "bad", "--steps", "2", *TINY]
    return [c.args.mpiexec, "--oversubscribe", "--bind-to", "none", "-n", "1", c.args.mptrain, *app, ":", "-n", "1",
            "env", "MPTRAIN_ONEDNN_BF16=on", c.args.mptrain, *app]


@case("env_onednn_bf16_forced_without_native", USAGE, "MPTRAIN_ONEDNN_BF16=1", "no native BF16")
def _(c):
    # oneDNN held to AVX2 stands for a CPU without AVX512_BF16 or AMX.
    return c.train(), {"extra_env": {"MPTRAIN_ONEDNN_BF16": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


# ---- ranks started differently -------------------------------------------------------------------------------
@case("ranks_different_flags", USAGE, "ranks disagree", "rank 1", "command line or config file")
def _(c):
    app = ["train", "--data", c.corpus, "--run-name", "bad", "--steps", "2", *TINY]
    return [c.args.mpiexec, "--oversubscribe", "--bind-to", "none", "-n", "1", c.args.mptrain, *app, ":", "-n", "1",
            c.args.mptrain, *app, "--lr", "1e-3"]


@case("ranks_different_data", USAGE, "ranks disagree", "rank 1", "data")
def _(c):
    # The same flags, a file of the same name with other contents on each rank (e.g. per-node copies).
    a, b = os.path.join(c.dir, "a"), os.path.join(c.dir, "b")
    os.makedirs(a)
    os.makedirs(b)
    shutil.copy(c.corpus, a)
    c.write("b/corpus.txt", open(c.corpus).read().replace("light", "night"))
    app = ["train", "--data", "corpus.txt", "--run-name", "bad", "--steps", "2", *TINY]
    return [c.args.mpiexec, "--oversubscribe", "--bind-to", "none", "-n", "1", "-wdir", a, c.args.mptrain, *app,
            ":", "-n", "1", "-wdir", b, c.args.mptrain, *app]


# ---- a run another job holds ------------------------------------------------------------------------------
def holder_text(host="vm", pid=1234, hms=(12, 0, 3)):
    """A lock file naming a job on `host` with `pid` that started today at `hms` (local time)."""
    today = time.localtime()
    since = int(time.mktime((today.tm_year, today.tm_mon, today.tm_mday, *hms, 0, 0, -1)))
    return f'{{"host": "{host}", "pid": {pid}, "since_unix_seconds": {since}}}\n'


@case("run_in_use", BAD_FILE, "run 'bad' is in use by another job (host vm, pid 1234, since 12:00:03); use another "
      "--run-name or stop that job")
def _(c):
    c.hold_lock("runs/bad/lock", holder_text())
    return c.train("--resume", "auto")


@case("run_in_use_lock_file_empty", BAD_FILE, "run 'bad' is in use by another job (its lock file runs/bad/lock names "
      "no job); use another --run-name or stop that job")
def _(c):
    c.hold_lock("runs/bad/lock", "")
    return c.train("--resume", "auto")


@case("checkpoint_dir_in_use", BAD_FILE, "--checkpoint-dir ck is in use by another job (host vm, pid 1234, since "
      "12:00:03); use another --checkpoint-dir or stop that job")
def _(c):
    # The run's own lock (runs/bad/lock) is taken first; the job must remove it and runs/ again.
    c.hold_lock("ck/lock", holder_text())
    return c.train("--checkpoint-dir", "ck", "--resume", "auto")


def run_case(args, name):
    """Runs case `name`; returns (passed, report text)."""
    code, needles, make = CASES[name]
    directory = tempfile.mkdtemp(prefix=f"mptrain_bad_{name}_")
    c = None
    try:
        c = Case(args, directory)
        try:
            made = make(c)
        except Skip as e:
            return None, f"SKIP {name}: {e}"
        cmd, options = made if isinstance(made, tuple) else (made, {})
        before = snapshot(directory)
        r = run(cmd, cwd=directory, timeout=60, **options)
        left = processes_in(directory)
        after = snapshot(directory)
        problems = []
        if r.returncode != code:
            problems.append(f"exit code {r.returncode}, expected {code}")
        if r.seconds > DEADLINE_S:
            problems.append(f"the job took {r.seconds:.1f} s (> {DEADLINE_S} s)")
        if left:
            problems.append(f"processes left behind: {left}")
        lines = r.error_lines()
        if len(lines) != 1:
            problems.append(f"{len(lines)} 'mptrain: error:' lines, expected exactly 1")
        else:
            problems += [f"the error line lacks {n!r}" for n in needles if n not in lines[0]]
        problems += diff_snapshots(before, after)
        said = lines[0] if len(lines) == 1 else " | ".join(lines)
        report = f"{name}: exit {r.returncode} in {r.seconds:.1f} s: {said}"
        if problems:
            return False, "FAIL " + report + "\n  " + "\n  ".join(problems) + "\n" + r.describe()
        return True, "ok   " + report
    finally:
        for undo in c.cleanup if c else []:
            undo()
        for root, dirs, _ in os.walk(directory):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        shutil.rmtree(directory, ignore_errors=True)


def main():
    parsed = parse_driver_args(__doc__, CASES)
    if parsed is None:
        return 0
    args, names = parsed
    failed = skipped = 0
    for name in names:
        ok, report = run_case(args, name)
        print(report, flush=True)
        failed += ok is False
        skipped += ok is None
    if failed:
        return 1
    return SKIPPED if skipped == len(names) else 0


if __name__ == "__main__":
    sys.exit(main())
