#!/usr/bin/env python3
"""Hugging Face interop and the tokenizer pipeline (CTest runs this with the Python of launch/hf_venv.sh:
transformers and tokenizers from PyPI over Debian's torch).

- `mptrain export`: transformers' GPT2LMHeadModel.from_pretrained loads the directory with no missing,
  unexpected or mismatched keys, and its FP32 logits equal mptrain's forward (tests/interop/mptrain_logits)
  within 1e-4 on several sequences; an FP16/BF16 export holds exactly the rounded FP32 weights; the byte-level
  tokenizer.json encodes text to its bytes and back.
- launch/prepare_data.py: a byte-level BPE trained by `tokenizers` (or a given tokenizer.json) -> shards
  whose header carries the vocabulary; the shards decode back to the text; mptrain trains on them, reports
  the validation loss in nats per byte (checked against the loss per token x tokens / bytes of the same
  windows), and `mptrain sample` prints text through tokenizer.json.
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import TINY, error_lines, metrics, mptrain, run, write_corpus  # noqa: E402
from gpt_reference import read_safetensors, write_safetensors  # noqa: E402

ARGS = None
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


class Export(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="mptrain_hf_")
        cls.corpus = os.path.join(cls.dir, "corpus.txt")
        write_corpus(cls.corpus)
        # fp16 training (the default precision): the export reads the FP32 master weights.
        mptrain(ARGS, 2, "train", "--data", cls.corpus, "--run-name", "src", "--steps", "8", *TINY,
                cwd=cls.dir)
        cls.ckpt = os.path.join(cls.dir, "runs", "src", "checkpoints", "ckpt_00000008.safetensors")
        cls.out = os.path.join(cls.dir, "hf")
        mptrain(ARGS, 1, "export", "--checkpoint", cls.ckpt, "--out", cls.out, cwd=cls.dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def load(self, path):
        from transformers import GPT2LMHeadModel

        model, info = GPT2LMHeadModel.from_pretrained(path, output_loading_info=True, torch_dtype=torch.float32)
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
            self.assertEqual(list(info[key]), [], f"{key} of {path}")
        return model.eval()

    def test_transformers_logits_equal_mptrain_forward(self):
        model = self.load(self.out)
        with open(os.path.join(self.out, "config.json")) as f:
            config = json.load(f)
        self.assertEqual((config["vocab_size"], config["n_layer"], config["n_head"], config["n_embd"],
                          config["n_positions"], config["activation_function"], config["layer_norm_epsilon"]),
                         (256, 2, 2, 32, 32, "gelu_new", 1e-5))
        with open(self.corpus, "rb") as f:
            data = f.read()
        T = 32
        starts = [0, 1000, 54321, len(data) - T - 7]  # train and validation text
        tokens = torch.tensor([list(data[s:s + T]) for s in starts], dtype=torch.int32)
        write_safetensors(os.path.join(self.dir, "tokens.safetensors"), {"tokens": tokens})
        run([ARGS.logits, self.ckpt, os.path.join(self.dir, "tokens.safetensors"),
             os.path.join(self.dir, "logits.safetensors")], cwd=self.dir)
        ours = read_safetensors(os.path.join(self.dir, "logits.safetensors"))[0]["logits"]
        with torch.no_grad():
            theirs = model(tokens.long()).logits
        self.assertEqual(theirs.shape, ours.shape)
        diff = (theirs - ours).abs().max().item()
        print(f"max |logits transformers - mptrain| = {diff:.3g} over {tuple(ours.shape)} (fp32)")
        self.assertLess(diff, 1e-4)
        # A shorter sequence (positions 0..16 only) agrees too.
        with torch.no_grad():
            short = model(tokens[:, :17].long()).logits
        self.assertLess((short - ours[:, :17]).abs().max().item(), 1e-4)

    def test_half_exports_hold_the_rounded_weights(self):
        full = self.load(self.out).state_dict()
        for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            out = os.path.join(self.dir, f"hf_{dtype}")
            mptrain(ARGS, 1, "export", "--checkpoint", self.ckpt, "--out", out, "--dtype", dtype, cwd=self.dir)
            half = self.load(out).state_dict()
            for key, value in full.items():
                if key.endswith("attn.bias") or key.endswith("masked_bias"):
                    continue  # transformers' causal-mask buffers, not weights
                self.assertTrue(torch.equal(half[key], value.to(torch_dtype).float()), f"{dtype} {key}")

    def test_byte_level_tokenizer_maps_ids_to_bytes(self):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.out)
        text = "In the beginning\n ÿ \x00 \u00e9té.  "
        ids = tok(text)["input_ids"]
        self.assertEqual(ids, list(text.encode("utf-8")))
        self.assertEqual(tok.decode(ids), text)


class PrepareData(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="mptrain_prepare_")
        cls.corpus = os.path.join(cls.dir, "corpus.txt")
        write_corpus(cls.corpus, n_bytes=200_000)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def prepare(self, out, *args, expect=0):
        return run([sys.executable, os.path.join(ROOT, "launch", "prepare_data.py"), "--out", out, *args],
                   cwd=self.dir, expect=expect)

    @staticmethod
    def read_shard(path):
        with open(path, "rb") as f:
            blob = f.read()
        header = struct.unpack("<256i", blob[:1024])
        return header, list(struct.unpack(f"<{header[2]}H", blob[1024:]))

    def test_bpe_shards_train_report_nats_per_byte_and_sample_text(self):
        from tokenizers import Tokenizer

        out = os.path.join(self.dir, "bpe")
        self.prepare(out, "--vocab-size", "300", "--shard-tokens", "20000", self.corpus)
        shards = sorted(f for f in os.listdir(out) if f.endswith(".bin"))
        self.assertGreater(len(shards), 1)
        tokens = []
        for name in shards:
            header, t = self.read_shard(os.path.join(out, name))
            self.assertEqual(header[:2], (20240520, 1))
            self.assertEqual(header[3], 300)  # the vocabulary slot
            tokens += t
        tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
        with open(self.corpus, encoding="utf-8") as f:
            text = f.read()
        self.assertEqual(tok.decode(tokens), text)
        self.assertLess(len(tokens), 0.6 * len(text.encode()))  # merges happened

        glob = os.path.join(out, "shard_*.bin")
        p = mptrain(ARGS, 2, "train", "--data", glob, "--run-name", "bpe", "--steps", "4", *TINY, cwd=self.dir)
        self.assertIn("vocab 300", p.stdout)
        self.assertIn("tokenizer: " + os.path.join(out, "tokenizer.json"), p.stdout)
        val = [m for m in metrics(self.dir, "bpe") if "val_loss" in m][-1]
        # nats/byte = loss per token x target tokens / their bytes, over the same validation windows.
        T, G, batches = 32, 8, 2
        val_start = int((1 - 0.1) * len(tokens))
        windows = (len(tokens) - val_start) // (T + 1)
        target_bytes = 0
        for w in range(G * batches):
            start = val_start + (w % windows) * (T + 1)
            target_bytes += len(tok.decode(tokens[start + 1:start + T + 1]).encode())
        self.assertAlmostEqual(val["val_loss_per_byte"], val["val_loss"] * G * batches * T / target_bytes, places=9)
        self.assertLess(val["val_loss_per_byte"], val["val_loss"])

        ckpt = os.path.join(self.dir, "runs", "bpe", "checkpoints", "ckpt_00000004.safetensors")
        prompt = tok.encode("In the beginning").ids
        p = mptrain(ARGS, 1, "sample", "--checkpoint", ckpt, "--prompt", " ".join(map(str, prompt)),
                    "--sample-tokens", "20", cwd=self.dir)
        self.assertTrue(p.stdout.startswith("In the beginning"), p.stdout)
        # The decoded sample is what tokenizers decodes from the same ids.
        self.assertGreater(len(p.stdout.strip()), len("In the beginning"))

        # The export carries the tokenizer.json beside the training shards: transformers reads model and
        # tokenizer from the one directory, and its logits equal mptrain's.
        from transformers import AutoTokenizer, GPT2LMHeadModel

        hf = os.path.join(self.dir, "hf_bpe")
        mptrain(ARGS, 1, "export", "--checkpoint", ckpt, "--out", hf, cwd=self.dir)
        hf_tok = AutoTokenizer.from_pretrained(hf)
        self.assertEqual(hf_tok("In the beginning")["input_ids"], prompt)
        model = GPT2LMHeadModel.from_pretrained(hf).eval()
        ids = torch.tensor([tokens[:32], tokens[1000:1032]], dtype=torch.int32)
        write_safetensors(os.path.join(self.dir, "bpe_tokens.safetensors"), {"tokens": ids})
        run([ARGS.logits, ckpt, os.path.join(self.dir, "bpe_tokens.safetensors"),
             os.path.join(self.dir, "bpe_logits.safetensors")], cwd=self.dir)
        ours = read_safetensors(os.path.join(self.dir, "bpe_logits.safetensors"))[0]["logits"]
        with torch.no_grad():
            self.assertLess((model(ids.long()).logits - ours).abs().max().item(), 1e-4)

        # A token the header's vocabulary does not hold is a clear error.
        header, t = self.read_shard(os.path.join(out, shards[0]))
        t[5] = 300
        bad = os.path.join(self.dir, "bad.bin")
        with open(bad, "wb") as f:
            f.write(struct.pack("<256i", *header) + struct.pack(f"<{len(t)}H", *t))
        p = mptrain(ARGS, 2, "train", "--data", bad, "--run-name", "bad", *TINY, cwd=self.dir, expect=1)
        lines = error_lines(p.stderr)
        self.assertEqual(len(lines), 1, p.stderr)
        self.assertIn("token 300 at index 5 is outside the shard's vocabulary of 300", lines[0])

    def test_given_tokenizer_and_bad_input(self):
        first = os.path.join(self.dir, "first")
        self.prepare(first, "--vocab-size", "280", self.corpus)
        again = os.path.join(self.dir, "again")
        self.prepare(again, "--tokenizer", os.path.join(first, "tokenizer.json"), self.corpus)
        shards = []
        for directory in (first, again):
            with open(os.path.join(directory, "shard_000000.bin"), "rb") as f:
                shards.append(f.read())
        self.assertEqual(shards[0], shards[1])
        p = self.prepare(os.path.join(self.dir, "x"), "--vocab-size", "100", self.corpus, expect=2)
        self.assertIn("--vocab-size must be in [256, 65536]", p.stderr)
        p = self.prepare(os.path.join(self.dir, "x"), "--vocab-size", "300", "missing.txt", expect=2)
        self.assertIn("missing.txt", p.stderr)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mptrain", required=True)
    ap.add_argument("--mpiexec", required=True)
    ap.add_argument("--logits", required=True, help="the mptrain_logits test tool")
    ARGS, rest = ap.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest)
