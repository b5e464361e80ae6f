#!/usr/bin/env bash
# The CPU comparison with PyTorch in one command, for a quiet machine: installs current PyTorch from PyPI into
# benchmarks/.venv-torch (once), builds bench_step (Release), and runs benchmarks/compare_pytorch.py with 5
# alternating repeats of every pair on THREADS threads per side (default: all cores), writing
# benchmarks/results/compare_cpu.{json,txt} with lscpu, the load average and the GEMM share inside the JSON.
#
#   bash benchmarks/compare_cpu.sh                 # THREADS=1 bash benchmarks/compare_cpu.sh for one core
#
# The ratios depend on the CPU (AVX-512, AVX512_BF16/AMX) and on what else runs: check `uptime` first; the
# script warns when the 1-minute load average is above 0.5 per core.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-$(nproc)}
repeats=${REPEATS:-5}
bash benchmarks/setup_torch_venv.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" --target bench_step >/dev/null
load=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load" -v n="$(nproc)" 'BEGIN { exit !(l > 0.5 * n) }'; then
  echo "compare_cpu: warning: load average $load on $(nproc) cores: the machine is not quiet" >&2
fi
mkdir -p benchmarks/results
python3 benchmarks/compare_pytorch.py --bench-step build/benchmarks/bench_step --threads "$threads" \
  --repeats "$repeats" --json benchmarks/results/compare_cpu.json | tee benchmarks/results/compare_cpu.txt
