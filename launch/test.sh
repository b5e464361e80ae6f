#!/usr/bin/env bash
# Runs mptrain's whole test suite: builds (incrementally) with launch/setup.sh, then every CTest test,
# unit tests and the MPI tests at 1, 2, 3 and 4 ranks (label "mpi").
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
ctest --test-dir build --output-on-failure -j "$(nproc)" "$@"
