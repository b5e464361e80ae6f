#!/usr/bin/env python3
"""Independent PyTorch reference for mptrain's GPT-2 model (tests/test_gpt_reference.cpp runs it).

Reads a safetensors file written by mptrain with the FP32 weights (GPT-2 names, torch.nn.Linear layout),
the batch (tokens, targets: int32 [B, T]) and the config and AdamW settings in the metadata; builds the same
model with torch.nn.functional ops; writes logits [B, T, V], the mean cross-entropy loss, every parameter's
gradient, and the losses of `steps` AdamW steps on the same batch (torch.optim.AdamW, decay on 2-D tensors
only) to another safetensors file. Uses only torch and the standard library (a short safetensors reader and
writer below), FP32, one thread.
"""
import argparse
import json
import math
import struct

import torch
import torch.nn.functional as F

DTYPES = {"F32": torch.float32, "I32": torch.int32, "F64": torch.float64}
NAMES = {v: k for k, v in DTYPES.items()}


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, e in header.items():
        lo, hi = e["data_offsets"]
        t = torch.frombuffer(bytearray(data[lo:hi]), dtype=DTYPES[e["dtype"]])
        tensors[name] = t.reshape(e["shape"]).clone()
    return tensors, meta


def write_safetensors(path, tensors):
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def gpt_loss(p, tokens, targets, cfg):
    B, T = tokens.shape
    C, NH, L, V = cfg["channels"], cfg["num_heads"], cfg["num_layers"], cfg["vocab_size"]
    hs = C // NH
    x = p["wte.weight"][tokens.long()] + p["wpe.weight"][:T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for l in range(L):
        h = f"h.{l}."
        y = F.layer_norm(x, (C,), p[h + "ln_1.weight"], p[h + "ln_1.bias"], 1e-5)
        qkv = F.linear(y, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
        q, k, v = qkv.split(C, dim=2)
        q, k, v = (z.view(B, T, NH, hs).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + F.linear(y, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        y = F.layer_norm(x, (C,), p[h + "ln_2.weight"], p[h + "ln_2.bias"], 1e-5)
        y = F.gelu(F.linear(y, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"]), approximate="tanh")
        x = x + F.linear(y, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
    x = F.layer_norm(x, (C,), p["ln_f.weight"], p["ln_f.bias"], 1e-5)
    logits = F.linear(x, p["wte.weight"])[:, :, :V]
    loss = F.cross_entropy(logits.reshape(-1, V), targets.long().reshape(-1))
    return logits, loss


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True, help="safetensors from mptrain: weights, tokens, targets")
    ap.add_argument("--output", required=True, help="safetensors to write: logits, loss, grads, step losses")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tensors, meta = read_safetensors(args.input)
    cfg = {k: int(meta[k]) for k in ("vocab_size", "num_layers", "num_heads", "channels")}
    steps = int(meta["steps"])
    tokens, targets = tensors.pop("tokens"), tensors.pop("targets")
    params = {k: v.requires_grad_(True) for k, v in tensors.items()}

    logits, loss = gpt_loss(params, tokens, targets, cfg)
    loss.backward()
    out = {"logits": logits.detach(), "loss": loss.detach().reshape(1)}
    out.update({"grad." + k: v.grad.detach().clone() for k, v in params.items()})

    decay = [v for v in params.values() if v.dim() >= 2]
    no_decay = [v for v in params.values() if v.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(meta["weight_decay"])}, {"params": no_decay, "weight_decay": 0.0}],
        lr=float(meta["lr"]), betas=(float(meta["beta1"]), float(meta["beta2"])), eps=float(meta["eps"]),
        foreach=False)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        _, loss = gpt_loss(params, tokens, targets, cfg)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(gpt_loss(params, tokens, targets, cfg)[1].item())
    out["step_losses"] = torch.tensor(losses, dtype=torch.float64)
    write_safetensors(args.output, out)


if __name__ == "__main__":
    main()
