#!/usr/bin/env python3
"""Text files -> llm.c token shards for `mptrain train --data 'DIR/shard_*.bin'`.

Tokenizes the files (concatenated in the order given) with a byte-level BPE trained on them by the
`tokenizers` package (--vocab-size), or with a given tokenizer.json (--tokenizer, e.g. GPT-2's; nothing is
downloaded). Writes DIR/shard_000000.bin, ... (llm.c's format: 256 x int32 header {20240520, 1, token count,
vocabulary size, 0, ...} then uint16 tokens; the vocabulary size in slot 3 is mptrain's addition, 0 there
meaning GPT-2's 50257) and DIR/tokenizer.json, which mptrain finds beside the shards: `mptrain sample` decodes
with it and evaluation reports the loss in nats per byte. mptrain holds out the last --val-fraction of the
tokens for validation, so the end of the last file is the validation text, as with a text file.

Run it with the Python of launch/hf_venv.sh (which has `tokenizers`):
    python=$(bash launch/hf_venv.sh)
    "$python" launch/prepare_data.py --vocab-size 4096 --out data/kjv_bpe4096 data/kjv.txt
"""
import argparse
import array
import json
import os
import shutil
import struct
import sys

MAGIC, VERSION, HEADER_INTS, VOCAB_SLOT = 20240520, 1, 256, 3


def fail(message):
    print(f"prepare_data: error: {message}", file=sys.stderr)
    sys.exit(2)


def train_tokenizer(texts, vocab_size, min_frequency):
    """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet, no prefix space) trained on `texts`; all 256
    bytes are in its vocabulary, so it encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def chunks(text, target_chars=1 << 20):
    """`text` cut into pieces of about `target_chars` at a newline between two non-space characters: no
    pre-tokenizer piece spans such a point, so encoding the pieces gives the tokens of the whole text."""
    start = 0
    while start < len(text):
        end = min(start + target_chars, len(text))
        while end < len(text) and not (text[end - 1] == "\n" and not text[end - 2].isspace()
                                       and not text[end].isspace()):
            end += 1
        yield text[start:end]
        start = end


def write_shard(path, tokens, vocab_size):
    header = [0] * HEADER_INTS
    header[0], header[1], header[2], header[VOCAB_SLOT] = MAGIC, VERSION, len(tokens), vocab_size
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack(f"<{HEADER_INTS}i", *header))
        f.write(array.array("H", tokens).tobytes())  # little-endian hosts, as mptrain reads them
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("files", nargs="+", help="UTF-8 text files, concatenated in this order")
    ap.add_argument("--out", required=True, help="output directory (shards + tokenizer.json)")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this many tokens (256..65536)")
    group.add_argument("--tokenizer", help="use this tokenizer.json (byte-level, <= 65536 tokens)")
    ap.add_argument("--min-frequency", type=int, default=2, help="BPE training: least count of a merged pair")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (llm.c: 100M)")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    texts = []
    for path in args.files:
        try:
            with open(path, "rb") as f:
                texts.append(f.read().decode("utf-8"))
        except OSError as e:
            fail(f"{path}: {e.strerror}")
        except UnicodeDecodeError as e:
            fail(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
    if args.shard_tokens < 1:
        fail(f"--shard-tokens must be >= 1, got {args.shard_tokens}")
    if args.tokenizer:
        try:
            tok = Tokenizer.from_file(args.tokenizer)
            decoder = json.load(open(args.tokenizer)).get("decoder") or {}
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            fail(f"--tokenizer {args.tokenizer}: cannot load ({e})")
        if decoder.get("type") != "ByteLevel":
            fail(f"--tokenizer {args.tokenizer}: the decoder is not ByteLevel (mptrain decodes byte-level BPE)")
    else:
        if not 256 <= args.vocab_size <= 65536:
            fail(f"--vocab-size must be in [256, 65536] (the 256 bytes, uint16 tokens), got {args.vocab_size}")
        tok = train_tokenizer(texts, args.vocab_size, args.min_frequency)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size > 65536:
        fail(f"the tokenizer has {vocab_size} tokens; shards hold uint16 tokens (<= 65536)")

    os.makedirs(args.out, exist_ok=True)
    tokens = []
    for text in texts:
        for enc in tok.encode_batch(list(chunks(text)), add_special_tokens=False):
            tokens.extend(enc.ids)
    if not tokens:
        fail("the files hold no text")
    names = []
    for i, start in enumerate(range(0, len(tokens), args.shard_tokens)):
        names.append(os.path.join(args.out, f"shard_{i:06d}.bin"))
        write_shard(names[-1], tokens[start:start + args.shard_tokens], vocab_size)
    if args.tokenizer:
        if os.path.abspath(args.tokenizer) != os.path.abspath(os.path.join(args.out, "tokenizer.json")):
            shutil.copyfile(args.tokenizer, os.path.join(args.out, "tokenizer.json"))
    else:
        tok.save(os.path.join(args.out, "tokenizer.json"))
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"prepare_data: {len(args.files)} file(s), {num_bytes} bytes -> {len(tokens)} tokens "
          f"({num_bytes / len(tokens):.3f} bytes/token), vocabulary {vocab_size}, {len(names)} shard(s) in "
          f"{args.out} with tokenizer.json")


if __name__ == "__main__":
    main()
