#!/usr/bin/env python3
"""Draws the benchmark PNGs of a results folder with gnuplot (benchmarks/make_plots.sh calls it).

    python3 benchmarks/plot_results.py results

Reads, where present, from the folder:
  loss_fp32.jsonl, loss_fp16.jsonl, loss_bf16.jsonl  mptrain metrics files  -> loss_curves.png
                                                     (train loss, and validation loss as points, vs step)
  scaling.json     benchmarks/scaling.py             -> scaling_efficiency.png (weak and strong, vs ranks;
                                                        oversubscribed points labelled)
  collectives.json bench_collectives                 -> busbw.png (busbw vs message size, log-log, per op/type)
Missing inputs are reported and skipped; the exit status is 1 when nothing could be drawn. Needs gnuplot.
"""

import json
import math
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot import PlotError, gnuplot_terminal, number, read_metrics  # noqa: E402


def run_gnuplot(script):
    with tempfile.NamedTemporaryFile("w", suffix=".gp", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        r = subprocess.run(["gnuplot", path], capture_output=True, text=True)
        if r.returncode != 0:
            raise PlotError(f"gnuplot failed: {r.stderr.strip()}")
    finally:
        os.unlink(path)


def data_file(rows):
    f = tempfile.NamedTemporaryFile("w", suffix=".dat", delete=False)
    for r in rows:
        f.write(" ".join(str(x) for x in r) + "\n")
    f.close()
    return f.name


def loss_curves(folder, term, temps):
    plots = []
    for prec in ("fp32", "fp16", "bf16"):
        path = os.path.join(folder, f"loss_{prec}.jsonl")
        if not os.path.exists(path):
            continue
        records, _, _ = read_metrics(path)
        train = [(s, number(r.get("train_loss"))) for s, r in sorted(records.items())]
        val = [(s, number(r.get("val_loss"))) for s, r in sorted(records.items())]
        train = [t for t in train if t[1] is not None]
        val = [v for v in val if v[1] is not None]
        if train:
            temps.append(data_file(train))
            plots.append(f"'{temps[-1]}' using 1:2 with lines lw 2 title '{prec} train'")
        if val:
            temps.append(data_file(val))
            plots.append(f"'{temps[-1]}' using 1:2 with linespoints pt 7 title '{prec} validation'")
    if not plots:
        return None
    out = os.path.join(folder, "loss_curves.png")
    run_gnuplot(f"set terminal {term} size 1000,600\nset output '{out}'\n"
                "set title 'mptrain loss on the KJV corpus: fp32 vs fp16 (dynamic loss scaling) vs bf16'\n"
                "set xlabel 'step'\nset ylabel 'cross-entropy (nats/byte)'\nset grid\nset key top right\n"
                "plot " + ", ".join(plots) + "\n")
    return out


def scaling(folder, term, temps):
    path = os.path.join(folder, "scaling.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        j = json.load(f)
    plots, labels = [], []
    for kind in ("weak", "strong"):
        rows = [(r["ranks"], r["efficiency"]) for r in j.get(kind, [])]
        if rows:
            temps.append(data_file(rows))
            plots.append(f"'{temps[-1]}' using 1:2 with linespoints lw 2 pt 7 title '{kind} scaling'")
        for r in j.get(kind, []):
            if r.get("oversubscribed"):
                labels.append(f"set label 'oversubscribed' at {r['ranks']},{r['efficiency']} offset 1,0")
    if not plots:
        return None
    out = os.path.join(folder, "scaling_efficiency.png")
    run_gnuplot(f"set terminal {term} size 900,600\nset output '{out}'\n"
                f"set title 'mptrain scaling efficiency, {j.get('precision')}, 1 thread per rank, "
                f"{j.get('logical_cores')} cores'\n"
                "set xlabel 'ranks'\nset ylabel 'efficiency = tok/s(N) / (N tok/s(1))'\nset grid\n"
                "set yrange [0:1.1]\nset xtics 1\n" + "\n".join(labels) + "\nplot " + ", ".join(plots) + "\n")
    return out


def busbw(folder, term, temps):
    path = os.path.join(folder, "collectives.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        j = json.load(f)
    series = {}
    for r in j.get("results", []):
        if r["busbw_gb_per_s"] > 0 and math.isfinite(r["busbw_gb_per_s"]):
            series.setdefault(f"{r['op']} {r['type']}", []).append((r["size_bytes"], r["busbw_gb_per_s"]))
    if not series:
        return None
    plots = []
    for name, rows in series.items():
        temps.append(data_file(rows))
        plots.append(f"'{temps[-1]}' using 1:2 with linespoints title '{name.replace('_', '-')}'")
    out = os.path.join(folder, "busbw.png")
    run_gnuplot(f"set terminal {term} size 1000,600\nset output '{out}'\n"
                f"set title 'bus bandwidth through the {j.get('comm')} Communicator, {j.get('ranks')} ranks "
                "(busbw = algbw x 2(n-1)/n all-reduce, x (n-1)/n reduce-scatter/all-gather)'\n"
                "set xlabel 'message size (bytes)'\nset ylabel 'busbw (GB/s)'\nset logscale xy 2\nset grid\n"
                "set format x '%.0b%B'\nset key top left\nplot " + ", ".join(plots) + "\n")
    return out


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(sys.argv) == 2 else 1
    folder = sys.argv[1]
    temps = []
    try:
        term = re.sub(r"\s*size \d+,\d+", "", gnuplot_terminal("gnuplot"))  # each plot sets its own size
        drawn = []
        for fn in (loss_curves, scaling, busbw):
            out = fn(folder, term, temps)
            if out:
                drawn.append(out)
            else:
                print(f"plot_results: no input for {fn.__name__} in {folder}", file=sys.stderr)
    except PlotError as e:
        print(f"plot_results: {e}", file=sys.stderr)
        return 1
    finally:
        for t in temps:
            os.unlink(t)
    for d in drawn:
        print(f"wrote {d}")
    return 0 if drawn else 1


if __name__ == "__main__":
    sys.exit(main())
