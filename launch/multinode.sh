#!/usr/bin/env bash
# mptrain on several nodes with mpirun and a hostfile (for a cluster without Slurm; with Slurm see
# launch/slurm.sbatch): one rank per GPU, the same number of GPUs on every node, all ranks on CUDA with NCCL.
# Run it on the first node of the hostfile, from a repository that every node sees at the same path, after
# `bash launch/setup.sh` (with the CUDA toolkit) and `bash launch/corpus.sh`.
#
#   cp launch/hostfile.example launch/hostfile     # then edit the node names and slots
#   bash launch/multinode.sh --steps 20000 --run-name big
#   MPTRAIN_DRY_RUN=1 bash launch/multinode.sh     # only print the mpirun command
#
# What the mpirun command holds, and why:
#   --hostfile FILE        the nodes and their slots (launch/hostfile.example documents the format)
#   -np N -npernode G      N = nodes x G ranks, G per node; G = the hostfile's slots (all nodes alike) or
#                          MPTRAIN_GPUS_PER_NODE. mptrain picks GPU OMPI_COMM_WORLD_LOCAL_RANK mod visible.
#   --bind-to none         no CPU pinning (add your own --bind-to/--map-by through MPTRAIN_MPIRUN_ARGS)
#   -x VAR                 passes VAR from here to every rank: OMP_NUM_THREADS, and the NCCL_* variables
#                          below when they are set (-x of an unset variable only draws a warning, so
#                          unset ones are left out). PATH and LD_LIBRARY_PATH go too, for the remote shells.
#   --mca btl_tcp_if_include IF --mca oob_tcp_if_include IF
#                          (with MPTRAIN_MPI_IFACE=IF) the interface for Open MPI's own traffic between
#                          nodes (start-up, the MPI_Bcast of NCCL's unique id, the config-hash check);
#                          without it Open MPI tries every interface, and docker/virtual bridges that exist
#                          on every node but do not connect them can make it hang.
#   --mca btl_vader_single_copy_mechanism none   shared memory within a node without ptrace rights
#   --allow-run-as-root    only as root (Open MPI 4.1 refuses otherwise)
#
# NCCL's network (export before running; passed on with -x):
#   NCCL_SOCKET_IFNAME=ib0      interface for NCCL's bootstrap and TCP transport: prefixes ("eth", "enp")
#                               or an exclusion list ("^lo,docker"); must exist on every node
#   NCCL_IB_HCA=mlx5_0,mlx5_1   InfiniBand/RoCE adapters NCCL may use ("^mlx5_4" excludes one)
#   NCCL_IB_DISABLE=1           TCP sockets only (no InfiniBand)
#   NCCL_DEBUG=INFO             print the transports NCCL chose (NET/IB or NET/Socket), rings and trees
#
# Environment: MPTRAIN_HOSTFILE (default launch/hostfile), MPTRAIN_GPUS_PER_NODE, MPTRAIN_MPI_IFACE,
# MPTRAIN_MPIRUN_ARGS (extra mpirun arguments, split on spaces), MPTRAIN_BIN (default build/mptrain),
# MPTRAIN_DRY_RUN=1, OMP_NUM_THREADS (default 1). Script arguments go to `mptrain train` after
# --device cuda --data data/kjv.txt (mptrain takes the last value of a repeated flag).
set -euo pipefail
cd "$(dirname "$0")/.."

hostfile=${MPTRAIN_HOSTFILE:-launch/hostfile}
bin=${MPTRAIN_BIN:-build/mptrain}
if [ ! -f "$hostfile" ]; then
  echo "multinode: error: no hostfile $hostfile (cp launch/hostfile.example launch/hostfile, then edit it)" >&2
  exit 1
fi

# Nodes and slots from the hostfile: "name [slots=N] ..." per line, # comments.
nodes=0
slots_seen=()
while read -r host rest; do
  case "$host" in '' | '#'*) continue ;; esac
  nodes=$((nodes + 1))
  s=$(sed -n 's/.*slots=\([0-9]*\).*/\1/p' <<<"$rest")
  slots_seen+=("${s:-1}")
done <"$hostfile"
if ((nodes == 0)); then
  echo "multinode: error: $hostfile lists no node" >&2
  exit 1
fi
gpn=${MPTRAIN_GPUS_PER_NODE:-}
if [ -z "$gpn" ]; then
  gpn=${slots_seen[0]}
  for s in "${slots_seen[@]}"; do
    if [ "$s" != "$gpn" ]; then
      echo "multinode: error: $hostfile has different slots per node (${slots_seen[*]}); set MPTRAIN_GPUS_PER_NODE" >&2
      exit 1
    fi
  done
fi
if ! [[ "$gpn" =~ ^[1-9][0-9]*$ ]]; then
  echo "multinode: error: GPUs per node must be a positive integer, not '$gpn'" >&2
  exit 1
fi
ranks=$((nodes * gpn))

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cmd=(mpirun --hostfile "$hostfile" -np "$ranks" -npernode "$gpn" --bind-to none)
if [ "$(id -u)" -eq 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  cmd+=(--allow-run-as-root)
fi
for v in OMP_NUM_THREADS PATH LD_LIBRARY_PATH NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_DISABLE NCCL_DEBUG; do
  if [ -n "${!v+set}" ]; then cmd+=(-x "$v"); fi
done
if [ -n "${MPTRAIN_MPI_IFACE:-}" ]; then
  # Each named interface must exist here (on the node that runs mpirun); a subnet (a.b.c.d/n) is not checked.
  # Open MPI's own message for a missing one is a banner per framework; this is one line.
  IFS=, read -r -a ifaces <<<"$MPTRAIN_MPI_IFACE"
  for i in "${ifaces[@]}"; do
    if [ "${MPTRAIN_DRY_RUN:-0}" != 1 ] && [[ "$i" != */* ]] && [ ! -e "/sys/class/net/$i" ]; then
      # shellcheck disable=SC2012  # interface names are plain
      echo "multinode: error: MPTRAIN_MPI_IFACE: no network interface '$i' on $(hostname) (there: $(ls /sys/class/net | tr '\n' ' '))" >&2
      exit 1
    fi
  done
  cmd+=(--mca btl_tcp_if_include "$MPTRAIN_MPI_IFACE" --mca oob_tcp_if_include "$MPTRAIN_MPI_IFACE")
fi
cmd+=(--mca btl_vader_single_copy_mechanism none)
if [ -n "${MPTRAIN_MPIRUN_ARGS:-}" ]; then
  read -r -a extra <<<"$MPTRAIN_MPIRUN_ARGS"
  cmd+=("${extra[@]}")
fi
cmd+=("$bin" train --device cuda --data data/kjv.txt "$@")

echo "multinode: $nodes node(s) x $gpn GPU(s) = $ranks ranks, hostfile $hostfile"
line=$(printf '%q ' "${cmd[@]}")
echo "multinode: ${line% }"
if [ "${MPTRAIN_DRY_RUN:-0}" = "1" ]; then
  echo "multinode: dry run (MPTRAIN_DRY_RUN=1): not started"
  exit 0
fi
if [ ! -x "$bin" ]; then
  echo "multinode: error: $bin was not built (bash launch/setup.sh)" >&2
  exit 1
fi
if [ ! -s data/kjv.txt ]; then bash launch/corpus.sh; fi
exec "${cmd[@]}"
