#!/usr/bin/env bash
# Regenerates the benchmark plots and their inputs into a results folder, with the machine description:
#
#   bash benchmarks/make_plots.sh [RESULTS_DIR]          (default: benchmarks/results/)
#
#   loss_{fp32,fp16,bf16}.jsonl + loss_curves.png  three short `mptrain train` runs (STEPS, default 200, global
#                                                  batch GLOBAL_BATCH, default 16 sequences of 128 bytes, on
#                                                  2 ranks x 1 thread) on the default corpus (data/kjv.txt)
#   scaling.json + scaling_efficiency.png          benchmarks/scaling.py (1, 2, 4 ranks x 1 thread; 4 oversubscribed)
#   collectives.json + busbw.png                   bench_collectives on 2 ranks up to MAX_BYTES (default 256M)
#   machine.txt                                    per run (appended): CPU, cores, memory, kernel, compilers, MPI,
#                                                  torch, load, date
#
# Environment: PARTS (default "loss scaling collectives": which inputs to regenerate; the plots are drawn
# from whatever the folder holds), BUILD (build directory, default build), STEPS, GLOBAL_BATCH, MAX_BYTES, RANKS (default 2 for the loss runs
# and the collectives). Needs a built tree (mptrain, bench_step, bench_collectives), gnuplot, and mpiexec.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
BUILD=${BUILD:-build}
STEPS=${STEPS:-200}
GLOBAL_BATCH=${GLOBAL_BATCH:-16}
MAX_BYTES=${MAX_BYTES:-256M}
RANKS=${RANKS:-2}
PARTS=${PARTS:-loss scaling collectives}
want() { [[ " $PARTS " == *" $1 "* ]]; }
for exe in mptrain benchmarks/bench_step benchmarks/bench_collectives; do
  [ -x "$BUILD/$exe" ] || { echo "make_plots: $BUILD/$exe not built (cmake --build $BUILD)" >&2; exit 1; }
done
mkdir -p "$out"
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}
export OMP_NUM_THREADS=1
mpirun=(mpiexec --oversubscribe --bind-to none)

{
  echo "== make_plots.sh run"
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "host: $(hostname)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "logical cores: $(nproc)"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
  echo "simd: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|f16c|fma|avx512f|avx512_bf16|amx_bf16|amx_tile)$' | tr '\n' ' ')"
  echo "kernel: $(uname -sr)"
  echo "compiler: $(c++ --version | head -n 1)"
  echo "mpi: $(mpiexec --version 2>&1 | head -n 1)"
  echo "torch: $({ python3 -c 'import torch; print(torch.__version__)' || /usr/bin/python3 -c 'import torch; print(torch.__version__)'; } 2>/dev/null || echo none)"
  echo "parts regenerated: $PARTS"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "threads: 1 per rank (OMP_NUM_THREADS=1); loss runs and collectives on $RANKS ranks"
} >>"$out/machine.txt"

if want loss; then
bash launch/corpus.sh
for p in fp32 fp16 bf16; do
  name=bench-loss-$p
  rm -rf "runs/$name"
  "${mpirun[@]}" -n "$RANKS" "$BUILD/mptrain" train --precision "$p" --steps "$STEPS" --run-name "$name" \
    --resume none --threads 1 --global-batch "$GLOBAL_BATCH" --micro-batch $((GLOBAL_BATCH / RANKS)) \
    --log-interval 10 --eval-interval 50 --eval-batches 4 --checkpoint-interval 0 \
    --checkpoint-dir "runs/$name/checkpoints" --sample-tokens 0 | tail -n 3
  cp "runs/$name/metrics.jsonl" "$out/loss_$p.jsonl"
done
fi

if want scaling; then
  python3 benchmarks/scaling.py --bench-step "$BUILD/benchmarks/bench_step" --ranks 1,2,4 --json "$out/scaling.json" |
    tee "$out/scaling.txt"
fi

if want collectives; then
  "${mpirun[@]}" -n "$RANKS" "$BUILD/benchmarks/bench_collectives" --max-bytes "$MAX_BYTES" --step-factor 4 \
    --json "$out/collectives.json" | tee "$out/collectives.txt"
fi

echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$out/machine.txt"
python3 benchmarks/plot_results.py "$out"
