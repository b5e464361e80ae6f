#!/usr/bin/env bash
# A byte-level BPE (vocabulary 4096, launch/prepare_data.py) against the byte-level default on the same
# corpus (data/kjv.txt) and the same model (L=4 C=128 NH=4 T=128, global batch 32), compared in validation
# nats per BYTE, at lr 3e-3 (the lr this comparison was measured with; fixed here so that it does not follow
# the trainer's default). The two runs train at the same time, side by side (2 ranks x 1 thread each), so a shared
# machine slows both alike; the step counts are chosen so both take about the same training time (a short
# concurrent calibration gives the per-step times; BYTES_STEPS/BPE_STEPS override them). Prints uptime
# before and after, each run's training time and final validation loss, into $OUT (default
# benchmarks/results/bpe_vs_bytes.txt).
#
#   bash benchmarks/bpe_vs_bytes.sh        # needs build/mptrain (or MPTRAIN=...), data/kjv.txt, the venv
set -euo pipefail
cd "$(dirname "$0")/.."
mptrain="${MPTRAIN:-build/mptrain}"
out="${OUT:-benchmarks/results/bpe_vs_bytes.txt}"
bytes_steps="${BYTES_STEPS:-90}"
bpe_steps="${BPE_STEPS:-76}"
warmup="${WARMUP_STEPS:-10}"
work="${WORK:-build/bpe_vs_bytes}"
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none

bash launch/corpus.sh >/dev/null
if [ ! -f data/kjv_bpe4096/tokenizer.json ]; then
  python="$(bash launch/hf_venv.sh)"
  "$python" launch/prepare_data.py --vocab-size 4096 --out data/kjv_bpe4096 data/kjv.txt
fi
rm -rf "$work" && mkdir -p "$work" "$(dirname "$out")"
common=(--eval-interval 0 --checkpoint-interval 0 --log-interval 10 --sample-tokens 0 --warmup-steps "$warmup"
        --lr 3e-3 --resume none)
{
  echo "machine: $(lscpu | grep "Model name" | sed "s/ \+/ /g"), $(getconf _NPROCESSORS_ONLN) cores"
  echo "uptime before: $(uptime)"
} >"$out"
mpirun -n 2 --oversubscribe --bind-to none "$PWD/$mptrain" train --data "$PWD/data/kjv.txt" --run-name bytes \
  --steps "$bytes_steps" "${common[@]}" --checkpoint-dir "$PWD/$work/bytes" >"$work/bytes.log" 2>&1 &
bytes_pid=$!
mpirun -n 2 --oversubscribe --bind-to none "$PWD/$mptrain" train --data "$PWD/data/kjv_bpe4096/shard_*.bin" \
  --run-name bpe4096 --steps "$bpe_steps" "${common[@]}" --checkpoint-dir "$PWD/$work/bpe" >"$work/bpe.log" 2>&1
wait "$bytes_pid"
echo "uptime after: $(uptime)" >>"$out"
for run in bytes bpe; do
  {
    echo "== $run: $(grep -m1 '^data:' "$work/$run.log")"
    grep -m1 '^model:' "$work/$run.log"
    grep '^training:' "$work/$run.log"
    grep 'val loss' "$work/$run.log" | tail -n 1
  } >>"$out"
done
cat "$out"
