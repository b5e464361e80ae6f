#!/usr/bin/env bash
# mptrain's GPU suite on the GPU test machine (one H100 or H200; CUDA 13, PyTorch and the NCCL/cuBLAS/cuDNN
# wheels in its image; no Open MPI, no network), in two parts that each fit one 540 s command: it checks and
# measures the build that benchmarks/gpu/prepare.sh shipped in .gpu-build/ (or its .gpu-build/bundle.tar.xz,
# unpacked here first):
#
#   --part correctness   steps 1-3, 6 and 7 below: the tests, a short training run, memcheck
#   --part speed         steps 1, 2, 4 and 5: the step benchmarks next to PyTorch and the collectives
#   --part all           everything, one after the other (default; for a machine without a per-command limit)
#
#   1. the manifest (every shipped file's sha256) and the CUDA libraries the binaries need, found in the
#      image's Python wheels (site-packages/nvidia/*/lib), the toolkit or the driver's folders
#   2. machine.json: nvidia-smi, driver, nvcc, compute-sanitizer, PyTorch, OS
#   3. the shipped CPU checks (test_dtype; test_comm_mpi as an MPI singleton), then every GPU test binary
#      (test_cuda_*, test_comm_nccl), each with gtest JSON output
#   4. the training-step benchmark next to PyTorch AMP (torch.autocast fp16 + GradScaler + SDPA) at GPT-2 small
#      (L=12 C=768 NH=12 T=1024 V=50304 B=32) and a 1.3B shape (L=24 C=2048 NH=16 T=1024 V=50304, the largest
#      micro-batch of 16, 8, 4, 2, 1 that fits, searched on each side): tokens/s, MFU at 989 TFLOP/s, ratio
#   5. bench_collectives on the NCCL communicator at 1 rank (algbw, busbw, #wrong)
#   6. a short single-rank `mptrain train --device cuda --precision fp16` on a 1 MB text corpus
#   7. compute-sanitizer memcheck on the op tests (test_cuda_ops, test_cuda_blas with a filter, test_cuda_amp),
#      after a probe that it runs on this device at all (else the steps are "skipped" with its answer);
#      --report-api-errors no: the tests' deliberate API failures (a 2^52-byte cudaMalloc) are not errors
#
# Every step has a time cap, and the caps of a part add up to less than its budget (default 510 s for one
# part, 1020 s for all), so each step gets its whole cap; `timeout` still stops a step at what is left of the
# budget, so one hang cannot eat the rest. A binary the bundle lacks is recorded as "missing" and the suite
# goes on. summary.json is rewritten after every step, so a command killed at its limit still returns what
# ran (results/ then stays unpacked). Output in --out DIR:
#
#   summary.json     every step's status, time and command; test counts; memcheck errors; tokens/s, MFU,
#                    ratios; collectives; the training run's losses; the CUDA libraries used
#   machine.json     the machine and its software
#   suite.log        everything printed
#   results.tar.gz   every step's own files: gtest JSON, benchmark JSON, logs, metrics.jsonl
#                    (packed so that the folder holds four files; --keep-results leaves results/ as well)
#
#   bash benchmarks/gpu/run_suite.sh --out DIR [--part correctness|speed|all] [--dry-run] [--quick]
#                                    [--budget SECONDS] [--keep-results]
#
# --dry-run: everything up to the first GPU call (arguments, bundle and manifest check, library discovery,
# the command lines it would run, the JSON skeleton), exit 0; CI runs it without a GPU and without a bundle.
# --quick: fewer benchmark iterations and a shorter training run.
# Exit status: 0 all steps passed; 1 a step failed or timed out, or the GPU tests skipped for want of a device;
# 3 nothing failed but something was missing or skipped (for time, or memcheck where compute-sanitizer does
# not support the device); 2 bad arguments.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-python3}

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
out=""
dry=0
quick=0
keep=0
budget=""
part=all
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --dry-run) dry=1; shift ;;
    --quick) quick=1; shift ;;
    --keep-results) keep=1; shift ;;
    --budget) budget=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    --part) part=${2:-}; shift 2 || { usage >&2; exit 2; } ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run_suite: unknown argument '$1' (--help)" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "run_suite: --out DIR is required (--help)" >&2; exit 2; }
case $part in
  correctness | speed) budget=${budget:-510} ;;
  all) budget=${budget:-1020} ;;
  *) echo "run_suite: --part takes correctness, speed or all" >&2; exit 2 ;;
esac
[[ $budget =~ ^[0-9]+$ ]] || { echo "run_suite: --budget takes whole seconds" >&2; exit 2; }
in_part() { [ "$part" = all ] || [ "$part" = "$1" ]; }
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
res=$out/results
rm -rf "$res" "$out/results.tar.gz" "$out/summary.json" "$out/machine.json"
mkdir -p "$res"
exec > >(tee "$out/suite.log") 2>&1
start=$(date +%s)
bundle=$root/.gpu-build
reserve=15 # seconds kept back for the summary and the archive

elapsed() { echo $(($(date +%s) - start)); }
say() { printf '[%4ss] %s\n' "$(elapsed)" "$*"; }

# steps.tsv: name, kind, status, exit code, seconds, timeout, log, json, command, note (suite.py summarize
# reads it). After every step the summary is rewritten (quietly), so a killed command leaves what ran.
note=""
record() { # name kind status rc seconds timeout log json command...
  local name=$1 kind=$2 status=$3 rc=$4 secs=$5 tmo=$6 log=$7 json=$8
  shift 8
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$status" "$rc" "$secs" "$tmo" "$log" \
    "$json" "$*" "$note" >>"$res/steps.tsv"
  note=""
  "$python" "$here/suite.py" summarize "$out" "$res" --quiet >/dev/null 2>&1 || true
}

finish() {
  local rc
  "$python" "$here/suite.py" summarize "$out" "$res"
  rc=$?
  (cd "$out" && tar -czf results.tar.gz results) || echo "run_suite: could not pack results.tar.gz"
  [ "$keep" = 1 ] || rm -rf "$res"
  say "done: $out/summary.json, machine.json, suite.log, results.tar.gz"
  exit "$rc"
}
trap finish EXIT
trap 'say "interrupted"; exit 1' INT TERM

# The command as shown and recorded: the bundle's environment (the same for every step, in suite.log once)
# shortened to "env <bundle-env>".
show_cmd() {
  local a shown=() short=0
  for a in "$@"; do
    if [ "$short" = 0 ] && [ "$a" = env ] && [ ${#shown[@]} = 0 ]; then
      shown+=("env <bundle-env>")
      short=1
    elif [ "$short" = 1 ] && [[ $a =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
      continue
    else
      short=2
      shown+=("$a")
    fi
  done
  echo "${shown[*]}"
}

# run_step NAME KIND CAP_SECONDS JSON_NAME CMD...: runs CMD under timeout (the smaller of CAP_SECONDS and what
# is left of the budget) with its output in results/NAME.log; records the status; returns CMD's exit code.
# JSON_NAME is the file (in results/) the command writes, or "".
last_status=""
run_step() {
  local name=$1 kind=$2 cap=$3 json=$4
  shift 4
  local left=$((budget - $(elapsed) - reserve)) t
  t=$((cap < left ? cap : left))
  if [ "$dry" = 1 ]; then
    say "would run ($name, timeout ${cap}s): $(show_cmd "$@")"
    record "$name" "$kind" dry-run "" "" "$cap" "" "$json" "$(show_cmd "$@")"
    last_status="dry-run"
    return 0
  fi
  if [ "$t" -lt 5 ]; then
    say "$name: SKIPPED, budget spent"
    record "$name" "$kind" skipped-budget "" "" "$t" "" "" "$(show_cmd "$@")"
    last_status="skipped-budget"
    return 1
  fi
  local log=$name.log s e rc status
  say "$name: running (timeout ${t}s): $(show_cmd "$@")"
  s=$(date +%s.%N)
  (cd "$res/work" && timeout -k 10 "$t" "$@") >"$res/$log" 2>&1
  rc=$?
  e=$(date +%s.%N)
  if [ "$rc" = 0 ]; then
    status=passed
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status=timeout
  elif grep -Eqi 'out of memory|cudaErrorMemoryAllocation|OutOfMemoryError|ALLOC_FAILED' "$res/$log"; then
    status=oom
  else
    status=failed
  fi
  [ -n "$json" ] && [ ! -s "$res/$json" ] && json=""
  local secs
  secs=$(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.1f", e - s }')
  record "$name" "$kind" "$status" "$rc" "$secs" "$t" "$log" "$json" "$(show_cmd "$@")"
  say "$name: $status (exit $rc, ${secs}s of ${t}s)$([ "$status" = passed ] || echo "; last lines of $log:")"
  [ "$status" = passed ] || tail -n 8 "$res/$log" | sed 's/^/    /'
  last_status=$status
  return "$rc"
}

missing() { # name kind what
  say "$1: MISSING ($3)"
  record "$1" "$2" missing "" "" "" "" "" "$3"
}

skipped() { # name kind reason command...
  local name=$1 kind=$2 reason=$3
  shift 3
  say "$name: SKIPPED ($reason)"
  note=$reason
  record "$name" "$kind" skipped "" "" "" "" "" "$(show_cmd "$@")"
}

mkdir -p "$res/work"
say "mptrain GPU suite: part $part, out $out, budget ${budget}s$([ "$dry" = 1 ] && echo ', DRY RUN')$([ "$quick" = 1 ] && echo ', quick')"

# ------------------------------------------------------------------------------------------- 1. bundle + libs
if [ ! -f "$bundle/manifest.json" ] && [ -f "$bundle/bundle.tar.xz" ]; then
  say "unpacking $bundle/bundle.tar.xz"
  if command -v xz >/dev/null 2>&1; then
    tar -xJf "$bundle/bundle.tar.xz" -C "$bundle"
  else
    "$python" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$bundle/bundle.tar.xz" "$bundle"
  fi || say "unpacking FAILED"
fi
"$python" "$here/suite.py" manifest "$bundle" "$res/manifest_check.json"
mapfile -t cuda_dirs < <("$python" "$here/suite.py" find-libs "$bundle/manifest.json" "$res/libs.json")
say "LD_LIBRARY_PATH for the shipped binaries: $bundle/lib${cuda_dirs[*]:+:}$(IFS=:; echo "${cuda_dirs[*]}")"
# The environment of the shipped binaries (benchmarks/gpu/env.sh); PyTorch and the tools keep the machine's own.
# shellcheck source=benchmarks/gpu/env.sh
mapfile -t benv < <(source "$here/env.sh" && mpt_gpu_env "$bundle" "${cuda_dirs[@]}" &&
  env | grep -E '^(LD_LIBRARY_PATH|OPAL_|PMIX_|OMPI_|HWLOC_|MPT_TEST_MPIEXEC=)')
ours=(env "${benv[@]}" OMP_NUM_THREADS=1)
say "<bundle-env>: ${benv[*]} OMP_NUM_THREADS=1"
if [ -d "$bundle/bin" ]; then
  "$python" "$here/suite.py" ldd "$bundle" "$res/ldd.json" "${benv[@]}"
fi
"$python" - "$res/suite_meta.json" "$dry" "$quick" "$budget" "$bundle" "$part" <<'PY'
import json, sys
path, dry, quick, budget, bundle, part = sys.argv[1:]
json.dump({"dry_run": dry == "1", "quick": quick == "1", "budget_seconds": int(budget), "bundle": bundle,
           "part": part, "peak_flops_for_mfu": 989e12}, open(path, "w"), indent=1)
PY

# ------------------------------------------------------------------------------------------- 2. machine
if [ "$dry" = 1 ]; then
  "$python" "$here/suite.py" machine "$out/machine.json" --no-gpu
  say "would query the GPU: nvidia-smi; nvidia-smi --query-gpu=...; torch.cuda device names and NCCL version"
else
  timeout 20 "$python" "$here/suite.py" machine "$out/machine.json" || say "machine.json: query failed"
fi

# In a dry run a binary the bundle lacks is still shown with its command line (CI has no bundle).
have() {
  [ -x "$bundle/bin/$1" ] && return 0
  [ "$dry" = 1 ] && say "($1 is not in the bundle: a real run records it as missing)" && return 0
  return 1
}

# Time caps (seconds). correctness: 15 + 30 host checks, 60 + 50 + 45 + 50 + 45 GPU tests, 45 training,
# 20 + 40 + 40 + 30 memcheck = 470; speed: 75 + 90 GPT-2 small, 120 + 120 1.3B searches, 60 collectives = 465.
# With the start (unpacking, manifest, libraries, machine.json: under 25 s) both stay within the 510 s budget
# less its 15 s reserve, so no step is cut short by an earlier one.
declare -A test_cap=([test_dtype]=15 [test_comm_mpi]=30 [test_cuda_ops]=60 [test_cuda_blas]=50 [test_cuda_amp]=45
  [test_comm_nccl]=50 [test_cuda_step]=45)

# ------------------------------------------------------------------------------------------- 3. tests
if in_part correctness; then
  for t in test_dtype test_comm_mpi; do
    if have "$t"; then
      run_step "host.$t" host-check "${test_cap[$t]}" "gtest_$t.json" "${ours[@]}" "$bundle/bin/$t" \
        "--gtest_output=json:$res/gtest_$t.json"
    else
      missing "host.$t" host-check "$bundle/bin/$t"
    fi
  done
  gpu_tests=(test_cuda_ops test_cuda_blas test_cuda_amp test_comm_nccl test_cuda_step)
  for b in "$bundle"/bin/test_cuda_*; do # any further GPU test binary the bundle carries
    [ -x "$b" ] || continue
    n=$(basename "$b")
    [[ " ${gpu_tests[*]} " == *" $n "* ]] || gpu_tests+=("$n")
  done
  for t in "${gpu_tests[@]}"; do
    if have "$t"; then
      run_step "gpu.$t" gtest "${test_cap[$t]:-45}" "gtest_$t.json" "${ours[@]}" "$bundle/bin/$t" \
        "--gtest_output=json:$res/gtest_$t.json"
    else
      missing "gpu.$t" gtest "$bundle/bin/$t"
    fi
  done
fi

# ------------------------------------------------------------------------------------------- 4. step benchmarks
warmup=2 iters=6
[ "$quick" = 1 ] && warmup=1 iters=3
# bench_side SHAPE SIDE CAP "B..." MODEL_ARGS...: tries each micro-batch until one runs (stops at a failure
# that is not out-of-memory), all tries together within CAP seconds; records every try.
bench_side() {
  local shape=$1 side=$2 cap=$3 batches=$4
  shift 4
  local b name json left deadline=$(($(elapsed) + cap))
  for b in $batches; do
    name=bench.$shape.$side.b$b
    json=$name.json
    left=$((deadline - $(elapsed)))
    [ "$dry" = 1 ] && left=$cap
    if [ "$left" -lt 5 ]; then
      say "$name: SKIPPED, the ${cap}s of this micro-batch search are spent"
      record "$name" bench skipped-budget "" "" "$left" "" "" "micro-batch search of $shape/$side"
      return 1
    fi
    if [ "$side" = mptrain ]; then
      run_step "$name" bench "$left" "$json" "${ours[@]}" "$bundle/bin/bench_step" --device cuda --precision fp16 \
        "$@" --micro-batch "$b" --accumulation 1 --threads 8 --warmup "$warmup" --iters "$iters" \
        --grad-sync reduce-scatter --peak-tflops 989 --json "$res/$json"
    else
      run_step "$name" bench "$left" "$json" "$python" "$root/benchmarks/pytorch_step.py" --device cuda \
        --precision fp16amp "$@" --micro-batch "$b" --accumulation 1 --threads 8 --warmup "$warmup" \
        --iters "$iters" --peak-tflops 989 --json "$res/$json"
    fi
    case "$last_status" in
      passed) return 0 ;;
      dry-run) ;; # show every try's command line
      oom) say "$name: out of memory, trying a smaller micro-batch" ;;
      *) return 1 ;;
    esac
  done
  return 1
}
gpt2_small=(--layers 12 --channels 768 --heads 12 --seq-len 1024 --vocab 50304)
gpt_1p3b=(--layers 24 --channels 2048 --heads 16 --seq-len 1024 --vocab 50304)
if in_part speed; then
  for side in mptrain pytorch; do
    if [ "$side" = mptrain ] && ! have bench_step; then
      missing "bench.gpt2-small.mptrain" bench "$bundle/bin/bench_step"
      missing "bench.gpt-1p3b.mptrain" bench "$bundle/bin/bench_step"
      continue
    fi
    if [ "$side" = pytorch ] && [ ! -f "$root/benchmarks/pytorch_step.py" ]; then
      missing "bench.gpt2-small.pytorch" bench "$root/benchmarks/pytorch_step.py"
      missing "bench.gpt-1p3b.pytorch" bench "$root/benchmarks/pytorch_step.py"
      continue
    fi
    small_cap=75 large_cap=120
    [ "$side" = pytorch ] && small_cap=90
    bench_side gpt2-small "$side" "$small_cap" "32" "${gpt2_small[@]}"
    bench_side gpt-1p3b "$side" "$large_cap" "16 8 4 2 1" "${gpt_1p3b[@]}"
  done

  # ----------------------------------------------------------------------------------------- 5. collectives
  if have bench_collectives; then
    run_step collectives.nccl.np1 collectives 60 collectives.json "${ours[@]}" "$bundle/bin/bench_collectives" \
      --device cuda --min-bytes 1K --max-bytes 256M --step-factor 4 --types fp16,fp32 \
      --ops all_reduce,reduce_scatter,all_gather --warmup 2 --iters "$iters" --json "$res/collectives.json"
  else
    missing collectives.nccl.np1 collectives "$bundle/bin/bench_collectives"
  fi
fi

# ------------------------------------------------------------------------------------------- 6. training run
steps=60
[ "$quick" = 1 ] && steps=20
if ! in_part correctness; then
  :
elif have mptrain && { [ -s "$bundle/data/tiny.txt" ] || [ "$dry" = 1 ]; }; then
  run_step train.cuda.np1 train 45 "" "${ours[@]}" "$bundle/bin/mptrain" train --device cuda --precision fp16 \
    --data "$bundle/data/tiny.txt" --layers 4 --channels 256 --heads 4 --seq-len 256 --global-batch 32 \
    --micro-batch 32 --steps "$steps" --warmup-steps 10 --lr 1e-3 --eval-interval "$steps" --eval-batches 2 \
    --checkpoint-interval "$steps" --log-interval 10 --sample-tokens 64 --resume none --threads 1 \
    --run-name gpu-suite
  for f in metrics.jsonl config.json; do
    [ -f "$res/work/runs/gpu-suite/$f" ] && cp "$res/work/runs/gpu-suite/$f" "$res/train_$f"
  done
  rm -rf "$res/work/runs/gpu-suite/checkpoints"
  "$python" "$here/suite.py" summarize "$out" "$res" --quiet >/dev/null 2>&1 || true
else
  missing train.cuda.np1 train "$bundle/bin/mptrain or $bundle/data/tiny.txt"
fi

# ------------------------------------------------------------------------------------------- 7. memcheck
# test_cuda_blas under memcheck: the cuBLASLt GEMMs, the unfused attention, one cuDNN SDPA shape and the
# argument checks (cuDNN's graph building for every shape and dtype is what makes the whole binary slow).
# MPT_MEMCHECK_FILTER (a gtest filter) replaces these filters for all three.
declare -A memcheck_filter=([test_cuda_ops]='*' [test_cuda_amp]='*'
  [test_cuda_blas]='CudaBlas/*.Matmul*:CudaBlas/*.UnfusedAttentionMatchesCpu:CudnnSdpa/0.MatchesUnfusedAtT37:CudaBlasErrors.*')
declare -A memcheck_cap=([test_cuda_ops]=40 [test_cuda_blas]=40 [test_cuda_amp]=30)
sanitizer=$(PATH=$PATH:/usr/local/cuda/bin:/usr/local/cuda/compute-sanitizer command -v compute-sanitizer ||
  echo compute-sanitizer)
# --report-api-errors no: a CUDA API call that fails on purpose (test_cuda_ops allocates 2^52 bytes to check
# the error path) is not a memory error; kernels' out-of-bounds and misaligned accesses still are.
memcheck=("$sanitizer" --tool memcheck --leak-check no --report-api-errors no --error-exitcode 86 --print-limit 50)
memcheck_unsupported=""
probe=("${memcheck[@]}" "$bundle/bin/test_cuda_ops" --gtest_filter=CudaBackend.MemoryAccountingZeroingCopiesAndErrors
  --gtest_brief=1)
if in_part correctness && [ "$dry" = 1 ]; then
  say "would probe compute-sanitizer (timeout 20s): $(show_cmd "${ours[@]}" "${probe[@]}")"
elif in_part correctness && [ -x "$sanitizer" ] && [ -x "$bundle/bin/test_cuda_ops" ]; then
  # The probe: one small test under memcheck. Where memcheck ran, it prints its ERROR SUMMARY (a finding
  # there is reported by the memcheck.test_cuda_ops step); where it does not (some runtimes answer "Device not
  # supported", or it cannot attach), its steps are skipped with its own words, not failed.
  (cd "$res/work" && timeout -k 5 20 "${ours[@]}" "${probe[@]}") >"$res/memcheck.probe.log" 2>&1
  if grep -q 'ERROR SUMMARY' "$res/memcheck.probe.log"; then
    say "memcheck probe: compute-sanitizer runs on this device"
  else
    memcheck_unsupported=$(grep -m 1 -iE 'not supported|unable|cannot|fail|error' "$res/memcheck.probe.log" |
      tr -d '\t' | cut -c1-200)
    memcheck_unsupported=${memcheck_unsupported:-no ERROR SUMMARY from the probe (memcheck.probe.log)}
  fi
fi
for t in test_cuda_ops test_cuda_blas test_cuda_amp; do
  in_part correctness || break
  if ! have "$t"; then
    missing "memcheck.$t" sanitizer "$bundle/bin/$t"
  elif [ ! -x "$sanitizer" ] && [ "$dry" = 0 ]; then # the image has it in /usr/local/cuda/bin
    missing "memcheck.$t" sanitizer "compute-sanitizer"
  elif [ -n "$memcheck_unsupported" ]; then
    skipped "memcheck.$t" sanitizer "compute-sanitizer does not run here: $memcheck_unsupported" \
      "${memcheck[@]}" "$bundle/bin/$t"
  else
    run_step "memcheck.$t" sanitizer "${memcheck_cap[$t]}" "" "${ours[@]}" "${memcheck[@]}" "$bundle/bin/$t" \
      "--gtest_filter=${MPT_MEMCHECK_FILTER:-${memcheck_filter[$t]}}" --gtest_brief=1
  fi
done
