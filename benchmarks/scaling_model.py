#!/usr/bin/env python3
"""Predicted step time and weak-scaling efficiency of mptrain on 1..1024 GPUs from an alpha-beta model.

    python3 benchmarks/scaling_model.py                         # GPT-2 124M, MFU assumption
    python3 benchmarks/scaling_model.py --gpu-json results/gpu/step_bf16.json   # compute time measured

Bytes. Psi = gradient bytes of one step = the padded flat gradient vector of the model shape: P from the shapes
mptrain registers (gpt_tensors: wte [Vp, C] with Vp = V rounded up to 128, wpe [T, C], per block ln_1, c_attn
[3C, C] + bias, c_proj [C, C] + bias, ln_2, c_fc [4C, C] + bias, mlp c_proj [C, 4C] + bias; ln_f), split in
25 MiB buckets, each padded to a multiple of N x 1024 elements (ParamLayout), times the storage bytes (2).
mptrain moves per step, per rank's link, in ring terms:
    reduce-scatter mode (default): reduce-scatter(Psi) + weight all-gather(Psi)  = 2 Psi (N-1)/N
    all-reduce mode:               all-reduce(Psi) [2 Psi] + weight all-gather(Psi) = 3 Psi (N-1)/N
Time of one collective on N GPUs, g GPUs per node, m = ceil(N/g) nodes (hierarchical ring: NCCL-style rings
inside the node and across nodes), per bucket:
    t = k * ((g'-1) alpha_intra + (m-1) alpha_inter) + factor * bytes / busbw
    k = 2 for all-reduce, 1 for reduce-scatter / all-gather; factor = 2(N-1)/N or (N-1)/N (nccl-tests);
    busbw = --busbw-intra (default 475 GB/s: all-reduce busbw measured inside an 8xH200 NVLink node) when
    m = 1, else --busbw-inter (default 46 GB/s: one 400 Gb/s NIC per GPU, ~92% of 50 GB/s).
    alpha_intra = 5 us, alpha_inter = 15 us per ring step (stated defaults, flags to change).
Compute. From --gpu-json (a bench_step report from the GPU suite: forward + backward + optimizer medians of
that run, its shape and batch replace the defaults; the sharded optimizer's time scales with ranks_json / N),
otherwise ASSUMED: tokens x (6P + 12 L C T) / (peak x MFU) with --peak-tflops 989 (H100/H200 dense BF16) and
--mfu 0.40 (an assumption, labelled so in the output), optimizer time ignored.
Overlap. Without: step = compute + grad sync + weight all-gather. With (DESIGN.md: buckets reduced as
backward finishes them; backward = 2/3 of forward + backward): grad sync is hidden behind backward except
max(last bucket's collective, sync - backward); the weight all-gather (phase 7) stays exposed.
Efficiency = compute / step (weak scaling: the per-GPU batch is fixed, so N = 1 has no communication).
"""

import argparse
import json
import math
import sys


def gpt_parameters(L, C, T, V):
    Vp = (V + 127) // 128 * 128
    per_block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    return Vp * C + T * C + L * per_block + 2 * C


def padded_gradient_elements(P, N, bucket_bytes=25 << 20, esize=2, block=1024):
    """Bucketed layout: buckets of bucket_bytes, each padded to a multiple of N x block elements."""
    per_bucket = bucket_bytes // esize
    buckets = max(1, math.ceil(P / per_bucket))
    total = 0
    left = P
    for _ in range(buckets):
        n = min(per_bucket, left)
        left -= n
        unit = N * block
        total += (n + unit - 1) // unit * unit
    return total, buckets


def collective_seconds(kind, nbytes, N, g, a):
    if N == 1:
        return 0.0
    m = math.ceil(N / g)
    gi = min(N, g)
    steps = (gi - 1) * a.alpha_intra_us * 1e-6 + (m - 1) * a.alpha_inter_us * 1e-6
    busbw = (a.busbw_intra if m == 1 else a.busbw_inter) * 1e9
    k, factor = (2, 2 * (N - 1) / N) if kind == "all_reduce" else (1, (N - 1) / N)
    return k * steps + factor * nbytes / busbw


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--channels", type=int, default=768)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per GPU per step")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--busbw-intra", type=float, default=475.0, help="GB/s bus bandwidth inside a node")
    ap.add_argument("--busbw-inter", type=float, default=46.0, help="GB/s bus bandwidth across nodes (per GPU NIC)")
    ap.add_argument("--alpha-intra-us", type=float, default=5.0, help="latency per ring step inside a node (us)")
    ap.add_argument("--alpha-inter-us", type=float, default=15.0, help="latency per ring step across nodes (us)")
    ap.add_argument("--bucket-mib", type=float, default=25.0)
    ap.add_argument("--gpu-json", help="bench_step JSON measured on a GPU: compute time and shape from it")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="assumed peak per GPU (TFLOP/s)")
    ap.add_argument("--mfu", type=float, default=0.40, help="assumed MFU when there is no --gpu-json")
    ap.add_argument("--max-gpus", type=int, default=1024)
    ap.add_argument("--json", help="write the predictions here")
    a = ap.parse_args()

    L, C, T, V, B = a.layers, a.channels, a.seq_len, a.vocab, a.micro_batch
    source = None
    if a.gpu_json:
        with open(a.gpu_json) as f:
            g = json.load(f)
        try:
            cfg = g["config"]
            L, C, T, V = cfg["layers"], cfg["channels"], cfg["seq_len"], cfg["vocab"]
            B = cfg["micro_batch"] * cfg["accumulation"]
            ph = g["phases_seconds"]
            fwd_bwd = ph["forward"]["median"] + ph["backward"]["median"]
            opt_json = ph["optimizer"]["median"]
            ranks_json = cfg["ranks"]
            bwd = ph["backward"]["median"]
        except (KeyError, TypeError) as e:
            sys.exit(f"scaling_model: {a.gpu_json}: not a bench_step report (missing {e})")
        source = f"measured: {a.gpu_json} ({g.get('machine', {}).get('gpu') or cfg.get('device')})"
    P = gpt_parameters(L, C, T, V)
    flops_per_token = 6 * P + 12 * L * C * T
    tokens = B * T
    if not a.gpu_json:
        fwd_bwd = tokens * flops_per_token / (a.peak_tflops * 1e12 * a.mfu)
        bwd = fwd_bwd * 2 / 3
        opt_json, ranks_json = 0.0, 1
        source = (f"ASSUMPTION: MFU {a.mfu:.0%} of {a.peak_tflops:g} TFLOP/s per GPU "
                  f"({flops_per_token:.3e} FLOP/token x {tokens} tokens/GPU/step)")
    rows = []
    print(f"alpha-beta model: GPT L={L} C={C} T={T} V={V}, P={P:,} parameters, {tokens} tokens per GPU per step")
    print(f"compute: {source}")
    print(f"busbw {a.busbw_intra:g} GB/s inside a {a.gpus_per_node}-GPU node, {a.busbw_inter:g} GB/s across nodes; "
          f"alpha {a.alpha_intra_us:g} us (intra), {a.alpha_inter_us:g} us (inter) per ring step; "
          f"{a.bucket_mib:g} MiB buckets")
    print(f"{'GPUs':>5} {'grad MB':>8} {'compute ms':>10} | {'RS+AG: step ms':>14} {'eff':>6} {'overlap ms':>10} "
          f"{'eff':>6} | {'AR+AG: step ms':>14} {'eff':>6} {'overlap ms':>10} {'eff':>6}")
    N = 1
    while N <= a.max_gpus:
        elems, nb = padded_gradient_elements(P, N, int(a.bucket_mib * 2**20))
        psi = 2 * elems
        compute = fwd_bwd + opt_json * ranks_json / N
        backward = bwd
        row = {"gpus": N, "gradient_bytes": psi, "buckets": nb, "compute_seconds": compute}
        for mode in ("reduce_scatter", "all_reduce"):
            sync = sum(collective_seconds(mode, psi / nb, N, a.gpus_per_node, a) for _ in range(nb))
            gather = sum(collective_seconds("all_gather", psi / nb, N, a.gpus_per_node, a) for _ in range(nb))
            plain = compute + sync + gather
            exposed = max(sync / nb, sync - backward)
            over = compute + exposed + gather
            row[mode] = {"grad_sync_seconds": sync, "all_gather_seconds": gather, "step_seconds": plain,
                         "efficiency": compute / plain, "step_seconds_overlap": over,
                         "efficiency_overlap": compute / over}
        rows.append(row)
        rs, ar = row["reduce_scatter"], row["all_reduce"]
        print(f"{N:>5} {psi / 1e6:>8.1f} {1e3 * compute:>10.2f} | {1e3 * rs['step_seconds']:>14.2f} "
              f"{rs['efficiency']:>6.1%} {1e3 * rs['step_seconds_overlap']:>10.2f} {rs['efficiency_overlap']:>6.1%} | "
              f"{1e3 * ar['step_seconds']:>14.2f} {ar['efficiency']:>6.1%} {1e3 * ar['step_seconds_overlap']:>10.2f} "
              f"{ar['efficiency_overlap']:>6.1%}")
        N *= 2
    if a.json:
        out = {"benchmark": "scaling_model", "shape": {"L": L, "C": C, "T": T, "V": V, "tokens_per_gpu": tokens},
               "parameters": P, "flops_per_token": flops_per_token, "compute_source": source,
               "assumptions": {"busbw_intra_gb_s": a.busbw_intra, "busbw_inter_gb_s": a.busbw_inter,
                               "alpha_intra_us": a.alpha_intra_us, "alpha_inter_us": a.alpha_inter_us,
                               "gpus_per_node": a.gpus_per_node, "bucket_mib": a.bucket_mib,
                               "mfu": None if a.gpu_json else a.mfu,
                               "peak_tflops": None if a.gpu_json else a.peak_tflops},
               "rows": rows}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
