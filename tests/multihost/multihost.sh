#!/usr/bin/env bash
# Multi-host tests of mptrain on one machine: each "host" is a network namespace with its own hostname (a UTS
# namespace), one veth interface on a bridge and an address in a private test subnet that exists only inside
# the namespaces this script makes. Open MPI starts the remote ranks through plm_rsh_agent set to a small
# launcher that runs `ip netns exec` (no ssh); the command comes from launch/multinode.sh with a hostfile
# (slots=) and MPTRAIN_MPI_IFACE naming the test interface, so Open MPI's traffic between hosts is TCP on it.
# Everything the script makes (namespaces, their processes, the temporary directory) is removed on every exit
# path (trap on EXIT, INT, TERM, HUP).
#
#   bash tests/multihost/multihost.sh --mptrain build/mptrain CASE
#   bash tests/multihost/multihost.sh --list
#
# Cases:
#   placement      2 hosts x 2 ranks train the default model 4 steps in fp16 (CPU backend): metrics and
#                  checkpoint bitwise identical to a 4-rank single-host run; then 3 hosts x 1 rank resume from
#                  that checkpoint and train on
#   unknown_host   a hostfile naming a host that does not exist: one line naming it, exit non-zero, no hang
#   no_interface   MPTRAIN_MPI_IFACE names an interface that does not exist: one line, exit non-zero, no hang
#   link_cut       2 hosts x 1 rank, h1's link cut mid-run (its bridge port set down): every rank exits
#                  non-zero within --collective-timeout + 10 s with one line naming rank, host and collective
#                  (each rank's stderr goes to a file on its own host: mpirun cannot hear the cut-off host),
#                  and so does mpirun, given net.ipv4.tcp_retries2=2 in the hosts (see the case); with the
#                  link back, --resume auto continues from the newest checkpoint
#   decoy_interface  3 hosts x 1 rank with a decoy bridge of the same address on every host (the docker0
#                  case): without the interface flag the first collective hangs in Open MPI's TCP wire-up and
#                  the watchdog ends the job (every rank exits non-zero within --collective-timeout + 10 s,
#                  one start-up line per rank naming its host and the interface flag); with the test interface
#                  named (MPTRAIN_MPI_IFACE), the same job runs
#
# Exit status: 0 passed, 1 failed, 77 skipped (namespaces cannot be made here: not root, no iproute2 or
# unshare, or the kernel refuses), 2 usage.
set -euo pipefail

CASES=(placement unknown_host no_interface link_cut decoy_interface)
repo=$(cd "$(dirname "$0")/../.." && pwd)
mptrain=""
case_name=""
while (($#)); do
  case "$1" in
    --list) printf '%s\n' "${CASES[@]}"; exit 0 ;;
    --mptrain) mptrain=$(realpath "$2"); shift 2 ;;
    -*) echo "multihost: error: unknown option $1" >&2; exit 2 ;;
    *) case_name=$1; shift ;;
  esac
done
if [ -z "$mptrain" ] || [ -z "$case_name" ]; then
  echo "usage: multihost.sh --mptrain BIN CASE | --list" >&2
  exit 2
fi
known=0
for c in "${CASES[@]}"; do if [ "$c" = "$case_name" ]; then known=1; fi; done
if ((known == 0)); then
  echo "multihost: error: unknown case $case_name (--list shows them)" >&2
  exit 2
fi

skip() { echo "multihost: SKIPPED: $*"; exit 77; }
fail() { echo "multihost: FAILED: $*" >&2; exit 1; }
note() { echo "multihost: $*"; }

[ "$(id -u)" -eq 0 ] || skip "network namespaces need root"
command -v ip >/dev/null || skip "no ip (iproute2)"
command -v unshare >/dev/null || skip "no unshare (util-linux)"
command -v mpirun >/dev/null || skip "no mpirun"

# ---- the test network --------------------------------------------------------------------------------------
prefix="mh$$"                 # namespaces: $prefix-sw (the bridge), $prefix-h0.. (the hosts)
iface=mhnet0                  # the test interface, the same name in every host
subnet=10.213.77              # private test subnet, only inside these namespaces
decoy_addr=172.31.254.1/24    # the docker0 case: the same address on every host
work=$(mktemp -d /tmp/multihost.XXXXXX)
made=()

cleanup() {
  local ns pids
  for ns in "${made[@]}"; do
    read -r -a pids <<<"$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
    if ((${#pids[@]})); then kill -9 "${pids[@]}" 2>/dev/null || true; fi
  done
  for ns in "${made[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# hosts N [decoy]: namespaces for hosts h0..h(N-1) on one bridge; with "decoy", also a dummy interface with the
# same address on every host.
hosts() {
  local n=$1 decoy=${2:-} i ns
  ip netns add "$prefix-sw" 2>/dev/null || skip "ip netns add fails here (no CAP_SYS_ADMIN or no netns support)"
  made+=("$prefix-sw")
  unshare --uts true 2>/dev/null || skip "unshare --uts fails here (hosts need their own hostname)"
  ip -n "$prefix-sw" link add br0 type bridge || skip "no bridge support in this kernel"
  ip -n "$prefix-sw" link set br0 up
  for ((i = 0; i < n; i++)); do
    ns="$prefix-h$i"
    ip netns add "$ns"
    made+=("$ns")
    ip link add "$iface" netns "$ns" type veth peer name "port$i" netns "$prefix-sw" || skip "no veth support"
    ip -n "$prefix-sw" link set "port$i" master br0 up
    ip -n "$ns" addr add "$subnet.$((10 + i))/24" dev "$iface"
    ip -n "$ns" link set "$iface" up
    ip -n "$ns" link set lo up
    if [ "$decoy" = decoy ]; then
      ip -n "$ns" link add decoy0 type bridge
      ip -n "$ns" addr add "$decoy_addr" dev decoy0
      ip -n "$ns" link set decoy0 up
    fi
  done
  # The launcher Open MPI runs instead of ssh: `agent HOST COMMAND...` runs COMMAND on HOST's namespace under
  # the hostname HOST.
  cat >"$work/netns-agent" <<EOF
#!/bin/sh
host=\$1
shift
if [ ! -e "/run/netns/$prefix-\$host" ]; then
  echo "netns-agent: error: no host \$host (no network namespace $prefix-\$host)" >&2
  exit 255
fi
exec ip netns exec "$prefix-\$host" unshare --uts sh -c 'hostname "\$0" && exec sh -c "\$1"' "\$host" "\$*"
EOF
  chmod +x "$work/netns-agent"
}

# hostfile FILE HOST:SLOTS...
hostfile() {
  local file=$1 h
  shift
  : >"$file"
  for h in "$@"; do echo "${h%%:*} slots=${h##*:}" >>"$file"; done
}

# Training flags of every run: the default model (4 layers, 4 heads, 128 channels, 128 tokens), fp16, a few
# steps of 32 sequences, one validation batch, checkpoint at the end.
corpus="$work/corpus.txt"
python3 -c "import sys; sys.path.insert(0, '$repo/tests/trainer'); from test_trainer import write_corpus; \
write_corpus('$corpus')"
TRAIN=(--device cpu --threads 1 --data "$corpus" --precision fp16 --global-batch 24 --micro-batch 6
       --eval-batches 1 --eval-interval 0 --sample-tokens 0 --log-interval 1 --checkpoint-interval 0
       --keep-checkpoints 10)

# multinode HOSTFILE TIMEOUT RUN_DIR [mptrain train flags...]: launch/multinode.sh on h0 with the test's
# hostfile, interface and agent; the ranks work in RUN_DIR. Output in $work/out, exit code in $rc.
rc=0
multinode() {
  local hf=$1 limit=$2 dir=$3
  shift 3
  mkdir -p "$dir"
  set +e
  # shellcheck disable=SC2016  # $@ is the inner shell's
  MPTRAIN_HOSTFILE=$hf MPTRAIN_BIN=${MH_BIN:-$mptrain} MPTRAIN_MPI_IFACE=${MH_IFACE-$iface} OMP_NUM_THREADS=1 \
    MPTRAIN_MPIRUN_ARGS="--mca plm_rsh_agent $work/netns-agent --wdir $dir ${MH_MPIRUN_ARGS:-}" \
    timeout -k 5 "$limit" ip netns exec "$prefix-h0" unshare --uts sh -c 'hostname h0 && shift && exec "$@"' x x \
    bash "$repo/launch/multinode.sh" "${TRAIN[@]}" "$@" >"$work/out" 2>&1
  rc=$?
  set -e
}

# The metrics of a run without the timing fields, one JSON object per line with sorted keys.
metrics() {
  python3 - "$1" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    for k in ("tokens_per_second", "mfu", "elapsed_seconds"):
        d.pop(k, None)
    print(json.dumps(d, sort_keys=True))
EOF
}

# The tensor bytes of a safetensors file (after its JSON header, which names the run).
tensors() {
  python3 - "$1" <<'EOF'
import hashlib, sys
raw = open(sys.argv[1], "rb").read()
n = int.from_bytes(raw[:8], "little")
print(hashlib.sha256(raw[8 + n:]).hexdigest(), len(raw) - 8 - n)
EOF
}

case_placement() {
  hosts 3
  local steps=4 t0 single=$work/single multi=$work/multi resumed=$work/resumed
  # The reference: 4 ranks on one host (h0), shared memory between them.
  hostfile "$work/hf1" h0:4
  t0=$SECONDS
  multinode "$work/hf1" 120 "$single" --steps "$steps" --run-name single
  ((rc == 0)) || fail "4 ranks on one host: exit $rc: $(cat "$work/out")"
  note "4 ranks on h0: $steps steps in $((SECONDS - t0)) s"
  # 2 hosts x 2 ranks over TCP on the test interface.
  hostfile "$work/hf2" h0:2 h1:2
  t0=$SECONDS
  local rx0 rx1
  rx0=$(ip netns exec "$prefix-h1" cat /sys/class/net/$iface/statistics/rx_bytes)
  multinode "$work/hf2" 120 "$multi" --steps "$steps" --run-name multi
  rx1=$(ip netns exec "$prefix-h1" cat /sys/class/net/$iface/statistics/rx_bytes)
  ((rc == 0)) || fail "2 hosts x 2 ranks: exit $rc: $(cat "$work/out")"
  note "2 hosts x 2 ranks: $steps steps in $((SECONDS - t0)) s"
  grep -q "2 node(s) x 2 GPU(s) = 4 ranks" "$work/out" || fail "multinode.sh did not start 2 x 2: $(cat "$work/out")"
  # The gradients crossed the test interface: more than 1 MB per step reached h1 (the fp16 gradients are 1.7 MB).
  ((rx1 - rx0 > steps * 1000000)) || fail "only $((rx1 - rx0)) bytes reached h1 on $iface"
  note "h1 received $((rx1 - rx0)) bytes on $iface"
  local a b ca cb
  a=$(metrics "$single/runs/single/metrics.jsonl")
  b=$(metrics "$multi/runs/multi/metrics.jsonl")
  [ "$(wc -l <<<"$a")" -ge "$steps" ] || fail "only $(wc -l <<<"$a") metric lines: $a"
  [ "$a" = "$b" ] || fail "metrics differ between 1 host and 2 hosts:
$(diff <(echo "$a") <(echo "$b"))"
  ca=$(tensors "$single/runs/single/checkpoints/ckpt_0000000$steps.safetensors")
  cb=$(tensors "$multi/runs/multi/checkpoints/ckpt_0000000$steps.safetensors")
  [ "$ca" = "$cb" ] || fail "checkpoint tensor bytes differ: $ca vs $cb"
  note "metrics ($(wc -l <<<"$a") lines) and checkpoint tensors ($ca) bitwise identical, 1 host vs 2 hosts"
  # 3 hosts x 1 rank resume from the 2-host run's checkpoint (another run: a copy of its directory).
  mkdir -p "$resumed/runs"
  cp -r "$multi/runs/multi" "$resumed/runs/multi"
  rm -f "$resumed/runs/multi/lock"
  hostfile "$work/hf3" h0:1 h1:1 h2:1
  t0=$SECONDS
  # The same global batch (a checkpoint resumes only with the batch it was trained with), now in whole
  # micro-batches of 3 ranks: 3 x 4 x 2 = 24 (4 ranks: 4 x 6).
  multinode "$work/hf3" 120 "$resumed" --steps $((steps + 2)) --run-name multi --resume auto --micro-batch 4
  ((rc == 0)) || fail "3 hosts x 1 rank resume: exit $rc: $(cat "$work/out")"
  grep -q "3 node(s) x 1 GPU(s) = 3 ranks" "$work/out" || fail "multinode.sh did not start 3 x 1: $(cat "$work/out")"
  grep -qi "resum" "$work/out" || fail "no resume in the output: $(cat "$work/out")"
  [ -f "$resumed/runs/multi/checkpoints/ckpt_0000000$((steps + 2)).safetensors" ] ||
    fail "no checkpoint of step $((steps + 2)) after the resume: $(ls "$resumed/runs/multi/checkpoints")"
  note "3 hosts x 1 rank resumed at step $steps and reached step $((steps + 2)) in $((SECONDS - t0)) s"
}

case_unknown_host() {
  hosts 2
  hostfile "$work/hf" h0:1 nosuchhost:1
  local t0=$SECONDS
  multinode "$work/hf" 60 "$work/run" --steps 2 --run-name unknown
  note "exit $rc after $((SECONDS - t0)) s; output:"
  sed 's/^/  | /' "$work/out"
  ((rc != 0 && rc != 124 && rc != 137)) || fail "expected a non-zero exit before the timeout, got $rc"
  grep -q "netns-agent: error: no host nosuchhost" "$work/out" || fail "no line naming the unknown host"
}

case_no_interface() {
  hosts 2
  hostfile "$work/hf" h0:1 h1:1
  local t0=$SECONDS
  MH_IFACE=nosuch0 multinode "$work/hf" 60 "$work/run" --steps 2 --run-name noiface
  note "exit $rc after $((SECONDS - t0)) s; output:"
  sed 's/^/  | /' "$work/out"
  ((rc != 0 && rc != 124 && rc != 137)) || fail "expected a non-zero exit before the timeout, got $rc"
  grep -q "^multinode: error: MPTRAIN_MPI_IFACE: no network interface 'nosuch0' on h0" "$work/out" ||
    fail "no line naming the interface"
  ! grep -q "^multinode: mpirun" "$work/out" || fail "mpirun was started"
}

# A small model for the cases that only need steps to go by.
TINY=(--layers 1 --heads 2 --channels 32 --seq-len 32 --global-batch 8 --micro-batch 4 --warmup-steps 2)

# The number of live mptrain processes in the hosts.
ranks_alive() {
  local ns p n=0
  for ns in "${made[@]}"; do
    for p in $(ip netns pids "$ns"); do
      if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = mptrain ]; then n=$((n + 1)); fi
    done
  done
  echo "$n"
}

case_link_cut() {
  hosts 2
  # mpirun learns that a host is gone only when TCP gives up on its connection to that host's orted: after
  # net.ipv4.tcp_retries2 retransmissions (Linux default 15: about 15 minutes). 2 is a few seconds.
  local h
  for h in h0 h1; do ip netns exec "$prefix-$h" sysctl -qw net.ipv4.tcp_retries2=2; done
  hostfile "$work/hf" h0:1 h1:1
  # Each rank's stderr goes to a file on its own host.
  # shellcheck disable=SC2016  # expanded by the wrapper
  printf '#!/bin/sh\nexec "%s" "$@" 2>"%s/stderr.rank$OMPI_COMM_WORLD_RANK.$(hostname)"\n' "$mptrain" "$work" \
    >"$work/mptrain-log"
  chmod +x "$work/mptrain-log"
  local dir=$work/run ckpts=$work/run/runs/cut/checkpoints timeout_s=4 t0 t_cut gone waited newest r f
  (
    MH_BIN=$work/mptrain-log multinode "$work/hf" 90 "$dir" "${TINY[@]}" --steps 100000 --checkpoint-interval 10 \
      --keep-checkpoints 2 --collective-timeout "$timeout_s" --run-name cut
    exit "$rc"
  ) &
  local job=$!
  t0=$SECONDS
  until compgen -G "$ckpts/ckpt_*.safetensors" >/dev/null; do
    ((SECONDS - t0 < 60)) || fail "no checkpoint within 60 s: $(cat "$work/out")"
    kill -0 "$job" 2>/dev/null || fail "the job ended before the cut: $(cat "$work/out")"
    sleep 0.2
  done
  ip -n "$prefix-sw" link set port1 down
  t_cut=$SECONDS
  while (($(ranks_alive) > 0 && SECONDS - t_cut < 60)); do sleep 0.5; done
  gone=$((SECONDS - t_cut))
  set +e
  wait "$job"
  rc=$?
  set -e
  waited=$((SECONDS - t_cut))
  note "link of h1 cut: ranks gone after $gone s, mpirun exit $rc after $waited s; the ranks said:"
  for r in 0 1; do
    f=$work/stderr.rank$r.h$r
    [ -f "$f" ] || fail "no stderr of rank $r on h$r: $(ls "$work")"
    grep "^mptrain: " "$f" | sed "s/^/  | /"
    [ "$(grep -c "^mptrain: rank $r on h$r: collective .* did not complete within $timeout_s s" "$f")" = 1 ] ||
      fail "rank $r: not one watchdog line naming rank, host and collective: $(cat "$f")"
  done
  ((gone <= timeout_s + 10)) || fail "ranks still alive $gone s after the cut (limit $((timeout_s + 10)) s)"
  ((rc != 0 && rc != 124 && rc != 137)) || fail "mpirun: expected a non-zero exit, got $rc: $(cat "$work/out")"
  ((waited <= timeout_s + 10)) || fail "mpirun ended $waited s after the cut (limit $((timeout_s + 10)) s)"
  ip -n "$prefix-sw" link set port1 up
  newest=$(find "$ckpts" -name 'ckpt_*.safetensors' | sed -n 's/.*ckpt_0*\([0-9][0-9]*\)\.safetensors$/\1/p' |
    sort -n | tail -1)
  t0=$SECONDS
  multinode "$work/hf" 90 "$dir" "${TINY[@]}" --steps $((newest + 3)) --checkpoint-interval 10 --keep-checkpoints 2 \
    --collective-timeout "$timeout_s" --run-name cut --resume auto
  ((rc == 0)) || fail "resume after the link came back: exit $rc: $(cat "$work/out")"
  grep "^resumed from" "$work/out" | sed 's/^/  | /'
  grep -q "^resumed from .*ckpt_$(printf %08d "$newest").safetensors at step $newest" "$work/out" ||
    fail "no resume from step $newest: $(cat "$work/out")"
  [ -f "$ckpts/ckpt_$(printf %08d $((newest + 3))).safetensors" ] || fail "no checkpoint of step $((newest + 3))"
  note "link back: --resume auto from step $newest reached step $((newest + 3)) in $((SECONDS - t0)) s"
}

case_decoy_interface() {
  hosts 3 decoy
  hostfile "$work/hf" h0:1 h1:1 h2:1
  # Without the interface named, Open MPI offers both addresses of each host and a rank may connect to
  # 172.31.254.1, which is its own host's decoy0: the first collective never completes. The watchdog guards
  # it: one start-up line per rank. (The global batch in whole micro-batches of 3 ranks: 3 x 4 = 12.)
  local timeout_s=4 t0 took r
  t0=$SECONDS
  MH_IFACE='' multinode "$work/hf" 60 "$work/run" "${TINY[@]}" --global-batch 12 --steps 5 \
    --collective-timeout "$timeout_s" --run-name decoy
  took=$((SECONDS - t0))
  while (($(ranks_alive) > 0 && SECONDS - t0 < timeout_s + 10)); do sleep 0.2; done
  note "decoy0 ($decoy_addr) on all 3 hosts, no MPTRAIN_MPI_IFACE: exit $rc after $took s; the ranks said:"
  sed "s/^/  | /" "$work/out"
  ((rc != 0 && rc != 124 && rc != 137)) || fail "without the interface: expected a non-zero exit, got $rc: $(cat "$work/out")"
  ((took <= timeout_s + 10)) || fail "without the interface: mpirun ended after $took s (limit $((timeout_s + 10)) s)"
  (($(ranks_alive) == 0)) || fail "without the interface: $(ranks_alive) ranks still alive $((SECONDS - t0)) s after the start"
  for r in 0 1 2; do
    [ "$(grep -c "^mptrain: rank $r on h$r: start-up: the first collective .* did not complete within $timeout_s s" \
      "$work/out")" = 1 ] || fail "rank $r: not one start-up watchdog line: $(cat "$work/out")"
  done
  [ "$(grep -c "^mptrain: " "$work/out")" = 3 ] || fail "more mptrain lines than one per rank: $(cat "$work/out")"
  # With the test interface named, the same job runs.
  t0=$SECONDS
  multinode "$work/hf" 60 "$work/run" "${TINY[@]}" --global-batch 12 --steps 5 --collective-timeout "$timeout_s" \
    --run-name decoy
  ((rc == 0)) || fail "with the decoy and MPTRAIN_MPI_IFACE=$iface: exit $rc: $(cat "$work/out")"
  [ -f "$work/run/runs/decoy/checkpoints/ckpt_00000005.safetensors" ] || fail "no checkpoint of step 5"
  note "decoy0 ($decoy_addr) on all 3 hosts, MPTRAIN_MPI_IFACE=$iface: 5 steps, exit 0 after $((SECONDS - t0)) s"
}

"case_$case_name"
note "PASSED $case_name"
