#!/usr/bin/env python3
"""Draws the training curves of an mptrain run as one PNG, with gnuplot.

    python3 benchmarks/plot.py runs/NAME/metrics.jsonl [--out runs/NAME/loss.png]

Input: the run's JSON-lines metrics file, one object per line with any of the keys step, train_loss,
val_loss (only on some lines), loss_scale, skipped, lr, grad_norm, tokens_per_second. Lines without a
numeric step, blank lines and lines that are not JSON (say, a line cut short while the trainer was writing
it) are left out. Lines of the same step are merged (mptrain writes val_loss on a line of its own, with the
step of the training line); where a key repeats, the later line wins.

Output (default: loss.png beside the metrics file), two panels sharing the step axis:
  top:    train loss and validation loss against step;
  bottom: loss scale against step (log scale), skipped steps marked. `skipped` may be a per-step flag
          (true/false) or a number: the running count of skipped steps when it never decreases (a step is
          marked when the count has grown since the previous line), otherwise a count per line.
          Without any loss_scale (fp32/bf16 runs) only the top panel is drawn.

Needs only the Python standard library and the gnuplot program (Debian: gnuplot-nox; uses the pngcairo
terminal, or png where gnuplot lacks cairo). Errors are one line on stderr and exit status 1.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile


class PlotError(Exception):
    pass


def number(v):
    """v as a finite float, or None (missing, null, bool, string, NaN, inf)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def read_metrics(path):
    """Returns ({step: merged record}, lines read, lines left out)."""
    if not os.path.exists(path):
        raise PlotError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise PlotError(f"{path}: not a file")
    records, lines, bad = {}, 0, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            lines += 1
            try:
                obj = json.loads(line)
            except ValueError:
                bad += 1
                continue
            step = number(obj.get("step")) if isinstance(obj, dict) else None
            if step is None:
                bad += 1
                continue
            # Lines of one step merge (the trainer writes val_loss on a line of its own); a later value of a
            # key wins, as after a resume from an earlier checkpoint.
            records.setdefault(step, {}).update(obj)
    if lines == 0:
        raise PlotError(f"{path}: empty, no metrics to plot")
    if not records:
        raise PlotError(f"{path}: none of its {lines} lines is a JSON object with a numeric 'step'")
    return records, lines, bad


def series(records):
    steps = sorted(records)
    train, val, scale, skipped_marks = [], [], [], []
    # `skipped` as numbers: a running count when it never decreases, else a per-line count or 0/1 flag.
    counts = [number(records[s].get("skipped")) for s in steps if not isinstance(records[s].get("skipped"), bool)]
    counts = [c for c in counts if c is not None]
    cumulative = bool(counts) and all(a <= b for a, b in zip(counts, counts[1:]))
    prev_count = 0.0
    last_scale = None
    total_skipped = 0
    for s in steps:
        r = records[s]
        t = number(r.get("train_loss"))
        if t is not None:
            train.append((s, t))
        v = number(r.get("val_loss"))
        if v is not None:
            val.append((s, v))
        ls = number(r.get("loss_scale"))
        if ls is not None and ls > 0:
            scale.append((s, ls))
            last_scale = ls
        k = r.get("skipped")
        n = 0
        if isinstance(k, bool):
            n = 1 if k else 0
        elif number(k) is not None:
            if cumulative:
                n = max(0, int(round(k - prev_count)))
                prev_count = k
            else:
                n = int(round(k)) if k > 0 else 0
        if n > 0:
            total_skipped += n
            if last_scale is not None:
                skipped_marks.append((s, last_scale, n))
    return steps, train, val, scale, skipped_marks, total_skipped


def gnuplot_terminal(gnuplot):
    out = subprocess.run([gnuplot, "-e", "set terminal"], capture_output=True, text=True, check=False)
    names = {line.split()[0] for line in (out.stdout + out.stderr).splitlines() if line.split()}
    if "pngcairo" in names:
        return "pngcairo enhanced font 'Sans,10' size 1100,850"
    if "png" in names:
        return "png enhanced size 1100,850"
    raise PlotError(f"{gnuplot} has neither the pngcairo nor the png terminal")


def quote(s):
    return "'" + s.replace("'", "''") + "'"


def write(path, rows):
    with open(path, "w", encoding="ascii") as f:
        for row in rows:
            f.write(" ".join(repr(float(x)) if isinstance(x, float) else str(x) for x in row) + "\n")


def plot(metrics, out):
    gnuplot = shutil.which("gnuplot")
    if gnuplot is None:
        raise PlotError("gnuplot not found (Debian/Ubuntu: apt-get install gnuplot-nox, or bash launch/setup.sh)")
    records, lines, bad = read_metrics(metrics)
    steps, train, val, scale, marks, total_skipped = series(records)
    if not train and not val:
        raise PlotError(f"{metrics}: no train_loss or val_loss values to plot")
    terminal = gnuplot_terminal(gnuplot)
    run = os.path.basename(os.path.dirname(os.path.abspath(metrics))) or metrics
    first, last = steps[0], steps[-1]
    lo, hi = first, last
    if hi == lo:
        lo, hi = lo - 1, hi + 1

    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise PlotError(f"{out}: directory {out_dir} does not exist")
    with tempfile.TemporaryDirectory(prefix="mptrain-plot-") as tmp:
        files = {name: os.path.join(tmp, name + ".dat") for name in ("train", "val", "scale", "skipped")}
        write(files["train"], train)
        write(files["val"], val)
        write(files["scale"], scale)
        write(files["skipped"], marks)
        png = os.path.join(tmp, "plot.png")

        title = f"mptrain run '{run}': {len(steps)} logged steps, {first:g}..{last:g}"
        if train:
            title += f", last train loss {train[-1][1]:.4f}"
        if val:
            title += f", best val loss {min(v for _, v in val):.4f}"
        g = [
            f"set terminal {terminal}",
            f"set output {quote(png)}",
            "set grid",
            f"set xrange [{lo!r}:{hi!r}]",
            "set key top right opaque box",
            "set lmargin 12",
            "set rmargin 4",
            "set multiplot" if scale else "",
        ]
        if scale:
            g += ["set origin 0,0.4", "set size 1,0.6", "set bmargin 2", "set format x ''"]
        else:
            g += ["set xlabel 'step'"]
        g += [
            f"set title {quote(title)} noenhanced",
            "set ylabel 'loss (nats/token)'",
        ]
        curves = []
        if train:
            curves.append(f"{quote(files['train'])} using 1:2 with lines lw 1.5 lc rgb '#1f77b4' title 'train'")
        if val:
            curves.append(
                f"{quote(files['val'])} using 1:2 with linespoints lw 2 pt 7 ps 0.8 lc rgb '#d62728' title 'validation'"
            )
        g.append("plot " + ", ".join(curves))
        if scale:
            g += [
                "set origin 0,0",
                "set size 1,0.4",
                "set tmargin 1",
                "set bmargin 4",
                "unset title",
                "set format x '%g'",
                "set xlabel 'step'",
                "set logscale y 2",
                # one octave of room above and below, so marks at the extremes are not cut by the frame
                f"set yrange [{min(v for _, v in scale) / 2!r}:{max(v for _, v in scale) * 2!r}]",
                "set format y '2^{%L}'",
                "set ylabel 'loss scale'",
            ]
            curves = [f"{quote(files['scale'])} using 1:2 with steps lw 1.5 lc rgb '#2ca02c' title 'loss scale'"]
            if marks:
                label = f"skipped steps ({total_skipped})"
                curves.append(
                    f"{quote(files['skipped'])} using 1:2 with points pt 2 ps 1.5 lc rgb '#d62728' title {quote(label)}"
                )
            g.append("plot " + ", ".join(curves))
            g.append("unset multiplot")
        script = os.path.join(tmp, "plot.gp")
        with open(script, "w", encoding="utf-8") as f:
            f.write("\n".join(x for x in g if x) + "\n")
        r = subprocess.run([gnuplot, script], capture_output=True, text=True, check=False)
        if r.returncode != 0 or not os.path.isfile(png) or os.path.getsize(png) == 0:
            msg = " ".join(r.stderr.split())[-300:] or f"exit status {r.returncode}"
            raise PlotError(f"gnuplot failed: {msg}")
        # Into place atomically: a temporary name in the output's directory, then a rename.
        fd, part = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=out_dir)
        os.close(fd)
        try:
            shutil.copyfile(png, part)
            os.chmod(part, 0o644)
            os.replace(part, out)
        except BaseException:
            os.unlink(part)
            raise
    summary = f"plot: {out}: {len(steps)} steps ({first:g}..{last:g}), {len(train)} train / {len(val)} val loss points"
    summary += f", loss scale {'on ' + str(len(scale)) + ' steps' if scale else 'absent'}, {total_skipped} skipped"
    if bad:
        summary += f"; {bad} of {lines} lines left out (not JSON or no step)"
    print(summary)


def main():
    ap = argparse.ArgumentParser(description="Plot an mptrain metrics.jsonl (loss, loss scale) to a PNG with gnuplot.")
    ap.add_argument("metrics", help="runs/NAME/metrics.jsonl")
    ap.add_argument("--out", help="PNG to write (default: loss.png beside the metrics file)")
    a = ap.parse_args()
    out = a.out or os.path.join(os.path.dirname(a.metrics), "loss.png")
    try:
        plot(a.metrics, out)
    except (PlotError, OSError) as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
