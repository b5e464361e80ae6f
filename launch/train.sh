#!/usr/bin/env bash
# mptrain's main job, on one machine: sets up and builds (launch/setup.sh), writes the default corpus
# (launch/corpus.sh -> data/kjv.txt), then trains with mpirun:
#
#   GPUs listed by `nvidia-smi -L` (and CUDA_VISIBLE_DEVICES, when set): one rank per GPU, --device cuda
#   no GPU:                                                              2 ranks on the CPU, --device cpu
#
# and finally draws runs/<name>/loss.png from runs/<name>/metrics.jsonl with benchmarks/plot.py. Prints the
# exact mpirun command line before running it, and the set-up + build time and the training time at the end.
#
#   bash launch/train.sh                          # the default run, named "default"
#   bash launch/train.sh --steps 100 --run-name short
#
# Every argument goes to `mptrain train` unchanged, after `--data data/kjv.txt` and `--device cpu|cuda`
# (each added only when the arguments do not already give it; with --device auto the ranks follow the GPUs
# found). The run name is taken from --run-name (else "default"), not from a --config file. Relative paths
# are relative to the repository root, where everything runs.
#
# Environment:
#   MPTRAIN_RANKS=N          number of ranks (default: the number of GPUs, or 2 on the CPU)
#   MPTRAIN_MPIRUN_ARGS=...  extra mpirun arguments, split on spaces (e.g. "--bind-to socket --map-by socket";
#                            a --bind-to here replaces the default --bind-to none)
#   MPTRAIN_BIN=path         the trainer executable (default build/mptrain)
#   MPTRAIN_DRY_RUN=1        do the set-up and the corpus, print the mpirun command, do not run it
#   MPTRAIN_SKIP_BUILD=1     passed on to launch/setup.sh: install packages only, do not build
#   OMP_NUM_THREADS=N        threads per rank (default 1), exported to every rank with -x
#
# As root, Open MPI 4.1 needs --allow-run-as-root and OMPI_ALLOW_RUN_AS_ROOT(_CONFIRM)=1; both are added.
# --mca btl_vader_single_copy_mechanism none keeps shared-memory transfers working in containers without
# ptrace rights. --oversubscribe is added when there are more ranks than processor cores (Open MPI's default
# slot count). SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 sent to this script are passed on to mpirun, which passes
# them on to the ranks; Ctrl-C reaches mpirun directly.
set -euo pipefail
cd "$(dirname "$0")/.."

now() { date +%s.%N; }
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# --- what the arguments already say ------------------------------------------------------------------------
run_name=default
user_device=""
user_data=0
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  a=${args[i]}
  case "$a" in
    --run-name) if ((i + 1 < ${#args[@]})); then run_name=${args[i + 1]}; fi ;;
    --run-name=*) run_name=${a#--run-name=} ;;
    --device) if ((i + 1 < ${#args[@]})); then user_device=${args[i + 1]}; fi ;;
    --device=*) user_device=${a#--device=} ;;
    --data | --data=*) user_data=1 ;;
  esac
done

# --- set-up, build, corpus ---------------------------------------------------------------------------------
t0=$(now)
bash launch/setup.sh
t1=$(now)
bash launch/corpus.sh
t2=$(now)

bin=${MPTRAIN_BIN:-build/mptrain}
dry_run=${MPTRAIN_DRY_RUN:-0}
if [ ! -x "$bin" ]; then
  if [ "$dry_run" = "1" ]; then
    echo "train: note: $bin does not exist (yet); dry run, so going on"
  else
    echo "train: error: $bin was not built (see the output of launch/setup.sh above)" >&2
    exit 1
  fi
fi

# --- device and ranks --------------------------------------------------------------------------------------
ngpu=0
if command -v nvidia-smi >/dev/null 2>&1; then
  ngpu=$(timeout 30 nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ] && ((ngpu > 0)); then
  IFS=',' read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  if ((${#visible[@]} < ngpu)); then ngpu=${#visible[@]}; fi
fi

# A build configured with MPTRAIN_WITH_CUDA=OFF (for instance: no nvcc at set-up) cannot use the GPUs.
cache=$(dirname "$bin")/CMakeCache.txt
cuda_built=1
if grep -qiE '^MPTRAIN_WITH_CUDA:[A-Z]*=(OFF|0|FALSE|NO|N)$' "$cache" 2>/dev/null; then cuda_built=0; fi

if [ -n "$user_device" ] && [ "$user_device" != auto ]; then
  device=$user_device
elif ((ngpu > 0)) && ((cuda_built == 0)); then
  echo "train: note: $ngpu GPU(s) found, but $cache says MPTRAIN_WITH_CUDA=OFF; training on the CPU"
  device=cpu
elif ((ngpu > 0)); then
  device=cuda
else
  device=cpu
fi

if [ "$device" = "cuda" ]; then
  ranks=${MPTRAIN_RANKS:-$((ngpu > 0 ? ngpu : 1))}
else
  ranks=${MPTRAIN_RANKS:-2}
fi
if ! [[ "$ranks" =~ ^[1-9][0-9]*$ ]]; then
  echo "train: error: MPTRAIN_RANKS must be a positive integer, not '$ranks'" >&2
  exit 1
fi

# Open MPI's default slots on one node: the processor cores (not hardware threads), within what we may use.
slots=$(nproc)
if command -v lscpu >/dev/null 2>&1; then
  cores=$(lscpu -p=Core,Socket 2>/dev/null | grep -v '^#' | sort -u | wc -l)
  if ((cores > 0 && cores < slots)); then slots=$cores; fi
fi

# --- the mpirun command ------------------------------------------------------------------------------------
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
envs=(OMP_NUM_THREADS="$OMP_NUM_THREADS")
extra=()
if [ -n "${MPTRAIN_MPIRUN_ARGS:-}" ]; then read -r -a extra <<<"$MPTRAIN_MPIRUN_ARGS"; fi

cmd=(mpirun -n "$ranks")
if [[ " ${extra[*]} " != *" --bind-to "* ]]; then cmd+=(--bind-to none); fi
if ((ranks > slots)); then cmd+=(--oversubscribe); fi
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  envs+=(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
  cmd+=(--allow-run-as-root)
fi
cmd+=(-x OMP_NUM_THREADS --mca btl_vader_single_copy_mechanism none)
cmd+=("${extra[@]}")
cmd+=("$bin" train)
if ((user_data == 0)); then cmd+=(--data data/kjv.txt); fi
if [ -z "$user_device" ]; then cmd+=(--device "$device"); fi
cmd+=("$@")

echo "train: $ranks rank(s) on $device (GPUs found: $ngpu, processor cores: $slots), run '$run_name'"
echo "train: mpirun command:"
line=$(printf '%q ' "${cmd[@]}")
echo "  ${envs[*]} ${line% }"

metrics=runs/$run_name/metrics.jsonl
plot=runs/$run_name/loss.png
if [ "$dry_run" = "1" ]; then
  echo "train: dry run (MPTRAIN_DRY_RUN=1): not started; would then plot $metrics -> $plot"
  echo "train: setup+build $(seconds "$t0" "$t1") s, corpus $(seconds "$t1" "$t2") s, training 0 s (dry run)"
  exit 0
fi

# --- training ----------------------------------------------------------------------------------------------
# mpirun runs in the background so that the signals below can be passed on to it while this script waits.
t3=$(now)
"${cmd[@]}" &
pid=$!
signalled=0
# shellcheck disable=SC2317  # called from the traps
forward() { signalled=1; kill -s "$1" "$pid" 2>/dev/null || true; }
for sig in TERM HUP USR1 USR2 INT; do
  # shellcheck disable=SC2064  # $sig is meant to be expanded now
  trap "forward $sig" "$sig"
done
while :; do
  signalled=0
  rc=0
  wait "$pid" || rc=$?
  # A trapped signal makes wait return early (and runs the trap); mpirun is still running then: wait again.
  if ((signalled == 0)); then break; fi
done
trap - TERM HUP USR1 USR2 INT
t4=$(now)

if [ -s "$metrics" ]; then
  if python3 benchmarks/plot.py "$metrics" --out "$plot"; then
    echo "train: plot: $plot"
  else
    echo "train: warning: could not plot $metrics" >&2
  fi
else
  echo "train: no $metrics, no plot"
fi

echo "train: setup+build $(seconds "$t0" "$t1") s, corpus $(seconds "$t1" "$t2") s, training $(seconds "$t3" "$t4") s"
if ((rc != 0)); then echo "train: mpirun exited with status $rc" >&2; fi
exit "$rc"
