#!/usr/bin/env python3
"""End-to-end tests of `mptrain train/eval` under mpiexec (CTest runs this file; unittest, stdlib + torch).

- resume is bitwise exact: 2 ranks, fp16 with dynamic loss scaling (growth interval 2, so the window after the
  resume point holds skipped steps and scale growths): 12 steps, checkpoint, resume, 12 more == 24 straight;
- resume with another rank count: fp32, global batch 12, trained on 2 ranks, resumed on 3: the loss sequence
  matches the uninterrupted 2-rank run within 1e-4 relative;
- large batch: LAMB with a batch ramp and epoch sampling, trained on 2 ranks and resumed on 1 mid-ramp,
  continues at the same batch sizes and data position, and its LR reaches the minimum at the last step; the
  noise scale is logged (and "n/a" = null with one rank and no accumulation);
- PyTorch reads the checkpoint (a ten-line reader) and reproduces `mptrain eval --precision fp32` on a fixed
  batch within 1e-4 relative.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
ARGS = None

TINY = ["--layers", "1", "--heads", "2", "--channels", "32", "--seq-len", "32", "--warmup-steps", "4",
        "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "6", "--eval-batches", "1",
        "--sample-tokens", "0", "--val-fraction", "0.1"]
NON_TIMING = ("step", "train_loss", "loss_scale", "skipped", "step_skipped", "lr", "grad_norm", "val_loss")


def write_corpus(path, n_bytes=120_000):
    rng = random.Random(7)
    words = ("in the beginning god created heaven and earth light darkness day night waters firmament "
             "said let there be was good evening morning first second third land seas grass herb seed fruit").split()
    out = []
    size = 0
    while size < n_bytes:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + ".\n"
        out.append(line)
        size += len(line)
    with open(path, "w") as f:
        f.write("".join(out))


class Trainer(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="mptrain_trainer_")
        cls.corpus = os.path.join(cls.dir, "corpus.txt")
        write_corpus(cls.corpus)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def mptrain(self, ranks, *args, cwd, expect=0):
        os.makedirs(cwd, exist_ok=True)
        cmd = [ARGS.mpiexec, "-n", str(ranks), "--oversubscribe", ARGS.mptrain, *args]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, expect, f"{' '.join(cmd)}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
        return p.stdout if expect == 0 else p.stderr

    def expect_error(self, ranks, *args, cwd, needle, code=2):
        err = self.mptrain(ranks, *args, cwd=cwd, expect=code)
        lines = [line for line in err.splitlines() if line.startswith("mptrain: error:")]
        self.assertEqual(len(lines), 1, err)
        self.assertIn(needle, lines[0])

    def train(self, name, ranks, extra, resume="none"):
        cwd = os.path.join(self.dir, name)
        self.mptrain(ranks, "train", "--data", self.corpus, "--run-name", name, "--resume", resume, *TINY, *extra,
                     cwd=cwd)
        with open(os.path.join(cwd, "runs", name, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        return cwd, lines

    @staticmethod
    def after(lines, step, key):
        return [(line["step"], line[key]) for line in lines if line["step"] > step and key in line]

    def test_resume_is_bitwise_exact_fp16_dynamic_scaling(self):
        extra = ["--precision", "fp16", "--global-batch", "8", "--micro-batch", "4", "--steps", "24",
                 "--checkpoint-interval", "12", "--keep-checkpoints", "5", "--loss-scale-window", "2",
                 "--loss-scale-init", "1048576"]
        cwd, straight = self.train("exact_straight", 2, extra)
        ckpt = os.path.join(cwd, "runs", "exact_straight", "checkpoints", "ckpt_00000012.safetensors")
        _, resumed = self.train("exact_resumed", 2, extra, resume=ckpt)
        window = self.after(straight, 12, "loss_scale")
        scales = [s for _, s in window]
        self.assertTrue(any(skip for _, skip in self.after(straight, 12, "step_skipped")), "no skipped step")
        self.assertTrue(any(b > a for a, b in zip(scales, scales[1:])), f"no scale growth in {scales}")
        for key in NON_TIMING:
            self.assertEqual(self.after(straight, 12, key), self.after(resumed, 12, key), key)
        self.assertGreater(len(self.after(resumed, 12, "train_loss")), 0)

    def test_resume_with_another_rank_count(self):
        extra = ["--precision", "fp32", "--global-batch", "12", "--micro-batch", "2", "--steps", "24",
                 "--checkpoint-interval", "12", "--keep-checkpoints", "5"]
        cwd, two = self.train("ranks_two", 2, extra)
        ckpt = os.path.join(cwd, "runs", "ranks_two", "checkpoints", "ckpt_00000012.safetensors")
        _, three = self.train("ranks_three", 3, extra, resume=ckpt)
        a, b = self.after(two, 12, "train_loss"), self.after(three, 12, "train_loss")
        self.assertEqual([s for s, _ in a], [s for s, _ in b])
        for (step, x), (_, y) in zip(a, b):
            self.assertLessEqual(abs(x - y), 1e-4 * abs(x), f"step {step}: {x} vs {y}")

    def test_large_batch_lamb_rampup_epoch_resume_on_another_rank_count(self):
        # Batch 8 for the first 96 samples (12 steps), then 16; a checkpoint at step 6, mid-ramp; one rank runs
        # the 8-sequence steps as two micro-batches of 4.
        extra = ["--precision", "fp32", "--global-batch", "16", "--micro-batch", "4", "--batch-rampup", "8,8,96",
                 "--steps", "16", "--checkpoint-interval", "6", "--keep-checkpoints", "5", "--optimizer", "lamb",
                 "--lr", "1e-2", "--sampling", "epoch", "--warmup-samples", "32", "--min-lr-ratio", "0.1"]
        cwd, two = self.train("large_two", 2, extra)
        ckpt = os.path.join(cwd, "runs", "large_two", "checkpoints", "ckpt_00000006.safetensors")
        _, one = self.train("large_one", 1, extra, resume=ckpt)
        for key in ("global_batch", "samples", "epoch"):
            self.assertEqual(self.after(two, 6, key), self.after(one, 6, key), key)
        self.assertEqual([b for _, b in self.after(two, 0, "global_batch")], [8] * 12 + [16] * 4)
        self.assertEqual(self.after(two, 15, "samples"), [(16, 12 * 8 + 4 * 16)])
        a, b = self.after(two, 6, "train_loss"), self.after(one, 6, "train_loss")
        for (step, x), (_, y) in zip(a, b):
            self.assertLessEqual(abs(x - y), 1e-4 * abs(x), f"step {step}: {x} vs {y}")
        lrs = [lr for _, lr in self.after(two, 0, "lr")]
        self.assertAlmostEqual(lrs[-1], 1e-3, delta=1e-9)  # the minimum, exactly at the final step
        self.assertGreater(lrs[-2], lrs[-1] * 1.01)
        self.assertAlmostEqual(lrs[3], 1e-2, delta=1e-9)  # warm-up ends with the step ending at sample 32
        noise = [x for _, x in self.after(two, 0, "noise_scale")]
        self.assertEqual(len(noise), 16)
        self.assertTrue(any(x is not None and x > 0 for x in noise), noise)
        _, alone = self.train("large_alone", 1, ["--global-batch", "4", "--micro-batch", "4", "--steps", "2"])
        self.assertEqual([x for _, x in self.after(alone, 0, "noise_scale")], [None, None])

    def test_bad_runs_stop_every_rank_with_one_line(self):
        base = ["train", "--data", self.corpus, *TINY, "--global-batch", "8", "--micro-batch", "4", "--steps", "4"]
        cwd = os.path.join(self.dir, "errors")
        self.expect_error(2, *base, "--run-name", "..", cwd=cwd, needle="--run-name")
        # A fresh run must not prune (or later be confused with) an earlier run's checkpoints.
        self.mptrain(2, *base, "--run-name", "old", "--resume", "none", cwd=cwd)
        self.expect_error(2, *base, "--run-name", "old", "--resume", "none", cwd=cwd, needle="already holds")
        ckpt_dir = os.path.join(cwd, "runs", "old", "checkpoints")
        ckpt = os.path.join(ckpt_dir, "ckpt_00000004.safetensors")
        good = open(ckpt, "rb").read()
        self.expect_error(2, *base, "--run-name", "old", "--steps", "6", "--resume", ckpt, "--seed", "9", cwd=cwd,
                          needle="--seed", code=1)
        # A digit of the step in the metadata flipped: the checksum covers the metadata too.
        bad = good.replace(b'"step":"4"', b'"step":"3"')
        self.assertNotEqual(bad, good)
        with open(ckpt, "wb") as f:
            f.write(bad)
        self.expect_error(2, *base, "--run-name", "old", "--steps", "6", "--resume", ckpt, cwd=cwd, needle="checksum", code=1)
        # Every checkpoint damaged: --resume auto refuses rather than starting over on top of them.
        self.expect_error(2, *base, "--run-name", "old", "--steps", "6", cwd=cwd, needle="verifies", code=1)
        self.assertEqual(open(ckpt, "rb").read(), bad)
        # A flag given to one rank only: every rank stops with exit 2 (usage), none hangs.
        cmd = [ARGS.mpiexec, "--oversubscribe", "-n", "1", ARGS.mptrain, *base, "--run-name", "mpmd", "--layers", "0",
               ":", "-n", "1", ARGS.mptrain, *base, "--run-name", "mpmd"]
        p = subprocess.run(cmd, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                           timeout=60)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertIn("--layers", p.stderr)

    def test_fp32_gradient_accumulation_trains(self):
        extra = ["--precision", "fp16", "--global-batch", "8", "--micro-batch", "2", "--steps", "8",
                 "--fp32-grad-accumulation"]
        _, lines = self.train("main_grad", 2, extra)
        losses = [x for _, x in self.after(lines, 0, "train_loss")]
        self.assertEqual(len(losses), 8)
        self.assertLess(losses[-1], losses[0])

    def run_with(self, name, extra):
        cwd = os.path.join(self.dir, name)
        out = self.mptrain(2, "train", "--data", self.corpus, "--run-name", name, "--resume", "none", *TINY, *extra,
                           cwd=cwd)
        with open(os.path.join(cwd, "runs", name, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        return out, lines

    @staticmethod
    def number_after(text, prefix, suffix):
        """The integer between `prefix` and `suffix` on the first line that has them so."""
        import re
        m = re.search(re.escape(prefix) + r" *(\d+) *" + re.escape(suffix), text)
        if not m:
            raise AssertionError(f"no '{prefix} N {suffix}' in:\n{text}")
        return int(m.group(1))

    def test_recompute_modes_train_bitwise_alike_and_the_memory_model_agrees(self):
        extra = ["--precision", "fp16", "--layers", "2", "--global-batch", "8", "--micro-batch", "2", "--steps",
                 "4"]
        reference, activations = None, {}
        for mode in ("none", "selective", "block"):
            out, lines = self.run_with("recompute_" + mode, extra + ["--recompute", mode])
            allocated = self.number_after(out, "memory after the first step:", "bytes allocated")
            model = self.number_after(out, "memory model", "(")  # the line after the first step
            self.assertLessEqual(abs(model / allocated - 1.0), 0.05, out)
            activations[mode] = self.number_after(out, "activations per rank:", "bytes")
            steps = [{k: v for k, v in line.items() if k in NON_TIMING} for line in lines]
            if reference is None:
                reference = steps
            self.assertEqual(steps, reference, mode)
        self.assertLess(activations["selective"], activations["none"])
        self.assertLess(activations["block"], activations["selective"])

    def test_zero_stage_2_trains_as_stage_1_and_resumes_across_stages(self):
        # One micro-batch per rank: stage 2 takes stage 1's steps bitwise, the injected overflow on rank 1
        # included (skipped on every rank); each stage resumes the other's checkpoint bitwise.
        extra = ["--precision", "fp16", "--global-batch", "8", "--micro-batch", "4", "--steps", "8",
                 "--checkpoint-interval", "4", "--keep-checkpoints", "5", "--inject-overflow", "3:1"]
        runs = {}
        for stage in (1, 2):
            cwd = os.path.join(self.dir, f"zero{stage}")
            out = self.mptrain(2, "train", "--data", self.corpus, "--run-name", "z", "--resume", "none", *TINY,
                               *extra, "--zero-stage", str(stage), cwd=cwd)
            self.assertIn(f"memory per rank (ZeRO-{stage})", out)
            with open(os.path.join(cwd, "runs", "z", "metrics.jsonl")) as f:
                runs[stage] = (cwd, [json.loads(line) for line in f], out)
        grads = {stage: self.number_after(runs[stage][2], "+ grads", "+") for stage in (1, 2)}
        self.assertLess(grads[2], grads[1] / 2 + 1024)  # the shard: half of the gradients on 2 ranks
        self.assertTrue(any(skip for _, skip in self.after(runs[2][1], 0, "step_skipped")), "no skipped step")
        for key in NON_TIMING:
            self.assertEqual(self.after(runs[1][1], 0, key), self.after(runs[2][1], 0, key), key)
        for stage, other in ((1, 2), (2, 1)):
            ckpt = os.path.join(runs[other][0], "runs", "z", "checkpoints", "ckpt_00000004.safetensors")
            _, resumed = self.train(f"zero_resume_{stage}", 2, extra + ["--zero-stage", str(stage)], resume=ckpt)
            for key in NON_TIMING:
                self.assertEqual(self.after(runs[stage][1], 4, key), self.after(resumed, 4, key), key)
        # With accumulation (3 micro-batches per rank) every micro-batch is reduce-scattered: the same losses
        # within rounding; resumed by stage 1 on 3 ranks, as any checkpoint resumes on another rank count.
        acc = ["--precision", "fp32", "--global-batch", "12", "--micro-batch", "2", "--steps", "8",
               "--checkpoint-interval", "4", "--keep-checkpoints", "5"]
        _, one = self.train("zero_acc_1", 2, acc)
        cwd, two = self.train("zero_acc_2", 2, acc + ["--zero-stage", "2"])
        _, three = self.train("zero_acc_3", 3, acc, resume=os.path.join(
            cwd, "runs", "zero_acc_2", "checkpoints", "ckpt_00000004.safetensors"))
        for other in (one, three):
            a, b = self.after(two, 4, "train_loss"), self.after(other, 4, "train_loss")
            self.assertEqual([s for s, _ in a], [s for s, _ in b])
            for (step, x), (_, y) in zip(a, b):
                self.assertLessEqual(abs(x - y), 1e-4 * abs(x), f"step {step}: {x} vs {y}")
        cwd = os.path.join(self.dir, "zero_bad")
        self.expect_error(2, "train", "--data", self.corpus, "--run-name", "bad", "--resume", "none", *TINY,
                          "--zero-stage", "2", "--grad-sync", "all-reduce", cwd=cwd, needle="--zero-stage 2")

    def test_micro_batch_auto_picks_the_largest_that_fits(self):
        extra = ["--global-batch", "16", "--steps", "1", "--micro-batch", "auto"]
        out, _ = self.run_with("auto_roomy", extra + ["--memory-budget", "1"])
        self.assertEqual(self.number_after(out, "micro-batch auto:", ","), 8)  # all 8 sequences of the rank
        # A budget between the needs of micro-batch 2 and 4 gives 2 and 2 x 2 accumulation steps per rank.
        out, _ = self.run_with("auto_tight", extra + ["--memory-budget", "0.0006"])
        self.assertEqual(self.number_after(out, "micro-batch auto:", ","), 2, out)
        self.assertIn("micro-batch 2 per rank, 4 accumulation step(s)", out)

    def test_pytorch_reproduces_eval_from_the_checkpoint(self):
        import torch
        from gpt_reference import gpt_loss, read_safetensors

        extra = ["--precision", "fp32", "--global-batch", "4", "--micro-batch", "2", "--steps", "6"]
        cwd, _ = self.train("for_pytorch", 2, extra)
        ckpt = os.path.join(cwd, "runs", "for_pytorch", "checkpoints", "ckpt_00000006.safetensors")
        out = self.mptrain(1, "eval", "--checkpoint", ckpt, "--data", self.corpus, "--precision", "fp32",
                           "--val-fraction", "0.1", "--eval-batches", "1", "--global-batch", "4",
                           "--micro-batch", "4", cwd=cwd)
        ours = float(next(line.split()[1] for line in out.splitlines() if line.startswith("val_loss ")))

        tensors, meta = read_safetensors(ckpt)
        params = {k[len("master."):]: v for k, v in tensors.items() if k.startswith("master.")}
        cfg = {"vocab_size": int(meta["vocab_size"]), "num_layers": int(meta["layers"]),
               "num_heads": int(meta["heads"]), "channels": int(meta["channels"])}
        T = int(meta["seq_len"])
        data = open(self.corpus, "rb").read()
        split = int((1.0 - 0.1) * len(data))
        windows = [data[split + w * (T + 1): split + (w + 1) * (T + 1)] for w in range(4)]
        x = torch.tensor([list(w[:T]) for w in windows], dtype=torch.int32)
        y = torch.tensor([list(w[1:]) for w in windows], dtype=torch.int32)
        with torch.no_grad():
            _, loss = gpt_loss(params, x, y, cfg)
        self.assertLessEqual(abs(loss.item() - ours), 1e-4 * abs(ours), f"PyTorch {loss.item()} vs mptrain {ours}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mptrain", required=True)
    parser.add_argument("--mpiexec", default="mpiexec")
    ARGS, rest = parser.parse_known_args()
    ARGS.mptrain = os.path.abspath(ARGS.mptrain)
    unittest.main(argv=[sys.argv[0], "-v", *rest])
