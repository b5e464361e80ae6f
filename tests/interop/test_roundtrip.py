#!/usr/bin/env python3
"""export -> --init-from round trips (CTest runs this file; stdlib + Debian's torch for the reader).

- an mptrain checkpoint exported to a Hugging Face directory and read back with `train --init-from DIR
  --steps 0` gives a step-0 checkpoint whose FP32 master weights are bitwise those of the original, with zero
  Adam state, and the same validation loss as `mptrain eval` of the original (exactly: same weights, same
  windows); the same from the checkpoint itself (--init-from FILE) and from an FP16 export (weights = the
  FP16 rounding of the originals);
- weights that do not fit the flags stop every rank with one line naming the tensor (exit 1).
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import TINY, error_lines, metrics, mptrain, write_corpus  # noqa: E402
from gpt_reference import read_safetensors  # noqa: E402

ARGS = None


class RoundTrip(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="mptrain_roundtrip_")
        cls.corpus = os.path.join(cls.dir, "corpus.txt")
        write_corpus(cls.corpus)
        cls.src = os.path.join(cls.dir, "src")
        mptrain(ARGS, 2, "train", "--data", cls.corpus, "--run-name", "src", "--steps", "6", *TINY, cwd=cls.src)
        cls.ckpt = os.path.join(cls.src, "runs", "src", "checkpoints", "ckpt_00000006.safetensors")
        cls.hf = os.path.join(cls.dir, "hf")
        mptrain(ARGS, 1, "export", "--checkpoint", cls.ckpt, "--out", cls.hf, cwd=cls.dir)
        out = mptrain(ARGS, 2, "eval", "--checkpoint", cls.ckpt, "--data", cls.corpus, "--eval-batches", "2",
                      "--global-batch", "8", "--micro-batch", "4", "--val-fraction", "0.1", cwd=cls.dir).stdout
        cls.eval_loss = json.loads(out.splitlines()[-1])["val_loss"]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def init_from(self, name, source, *extra, expect=0):
        cwd = os.path.join(self.dir, name)
        p = mptrain(ARGS, 2, "train", "--data", self.corpus, "--run-name", name, "--steps", "0",
                    "--init-from", source, *TINY, *extra, cwd=cwd, expect=expect)
        return cwd, p

    def check_round_trip(self, name, source, expected_weights):
        cwd, _ = self.init_from(name, source)
        tensors, meta = read_safetensors(os.path.join(cwd, "runs", name, "checkpoints",
                                                      "ckpt_00000000.safetensors"))
        self.assertEqual(meta["step"], "0")
        for key, want in expected_weights.items():
            got = tensors[key]
            self.assertEqual(got.shape, want.shape, key)
            self.assertTrue(torch.equal(got.view(torch.int32), want.view(torch.int32)), f"{key} differs")
            self.assertEqual(int(torch.count_nonzero(tensors["adam_m." + key[len("master."):]])), 0)
            self.assertEqual(int(torch.count_nonzero(tensors["adam_v." + key[len("master."):]])), 0)
        val = [line["val_loss"] for line in metrics(cwd, name) if "val_loss" in line]
        return val

    def original_weights(self):
        tensors, _ = read_safetensors(self.ckpt)
        return {k: v for k, v in tensors.items() if k.startswith("master.")}

    def test_hf_export_round_trip_is_bitwise_and_reproduces_eval(self):
        val = self.check_round_trip("from_hf", self.hf, self.original_weights())
        self.assertEqual(val, [self.eval_loss], "0 steps from the export must give the original's eval loss")

    def test_checkpoint_weights_round_trip(self):
        val = self.check_round_trip("from_ckpt", self.ckpt, self.original_weights())
        self.assertEqual(val, [self.eval_loss])

    def test_padded_vocabulary_round_trip(self):
        # Shards of a 300-token vocabulary: the model pads wte to 384 rows, the export drops them, --init-from
        # pads again with zeros.
        import random
        import struct

        rng = random.Random(5)
        tokens = [rng.randrange(300) for _ in range(6000)]
        header = [20240520, 1, len(tokens), 300] + [0] * 252
        shard = os.path.join(self.dir, "v300.bin")
        with open(shard, "wb") as f:
            f.write(struct.pack("<256i", *header) + struct.pack(f"<{len(tokens)}H", *tokens))
        cwd = os.path.join(self.dir, "v300")
        mptrain(ARGS, 2, "train", "--data", shard, "--run-name", "v300", "--steps", "2", *TINY, cwd=cwd)
        ckpt = os.path.join(cwd, "runs", "v300", "checkpoints", "ckpt_00000002.safetensors")
        out = os.path.join(self.dir, "hf300")
        mptrain(ARGS, 1, "export", "--checkpoint", ckpt, "--out", out, cwd=self.dir)
        exported, _ = read_safetensors(os.path.join(out, "model.safetensors"))
        self.assertEqual(list(exported["transformer.wte.weight"].shape), [300, 32])
        self.assertFalse(os.path.exists(os.path.join(out, "tokenizer.json")))  # no tokenizer was given
        original, _ = read_safetensors(ckpt)
        self.assertEqual(list(original["master.wte.weight"].shape), [384, 32])
        cwd2 = os.path.join(self.dir, "v300_back")
        mptrain(ARGS, 2, "train", "--data", shard, "--run-name", "back", "--steps", "0", "--init-from", out, *TINY,
                cwd=cwd2)
        back, _ = read_safetensors(os.path.join(cwd2, "runs", "back", "checkpoints", "ckpt_00000000.safetensors"))
        for key, want in original.items():
            if key.startswith("master."):
                self.assertTrue(torch.equal(back[key].view(torch.int32), want.view(torch.int32)), key)

    def test_fp16_export_gives_the_fp16_rounding(self):
        hf16 = os.path.join(self.dir, "hf16")
        mptrain(ARGS, 1, "export", "--checkpoint", self.ckpt, "--out", hf16, "--dtype", "fp16", cwd=self.dir)
        rounded = {k: v.half().float() for k, v in self.original_weights().items()}
        self.check_round_trip("from_hf16", os.path.join(hf16, "model.safetensors"), rounded)

    def test_weights_that_do_not_fit_are_one_line_naming_the_tensor(self):
        cases = [(["--channels", "64"], "n_embd"),  # config.json disagrees with the flags
                 (["--seq-len", "64"], "'transformer.wpe.weight' has shape [32, 32]"),
                 (["--layers", "3"], "--layers")]
        for extra, needle in cases:
            _, p = self.init_from("bad", self.hf, *extra, "--run-name", "bad", expect=1)
            lines = error_lines(p.stderr)
            self.assertEqual(len(lines), 1, p.stderr)
            self.assertIn(needle, lines[0])
        # Without config.json the tensors themselves are checked.
        bare = os.path.join(self.dir, "bare.safetensors")
        shutil.copy(os.path.join(self.hf, "model.safetensors"), bare)
        _, p = self.init_from("bad", bare, "--channels", "64", "--run-name", "bad", expect=1)
        self.assertIn("tensor 'transformer.wte.weight' has shape [256, 32]", error_lines(p.stderr)[0])
        _, p = self.init_from("bad", bare, "--layers", "1", "--run-name", "bad", expect=1)
        self.assertIn("tensor 'transformer.h.1.", error_lines(p.stderr)[0])
        self.assertIn("is not part of the model", error_lines(p.stderr)[0])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mptrain", required=True)
    ap.add_argument("--mpiexec", required=True)
    ARGS, rest = ap.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest)
