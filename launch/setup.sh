#!/usr/bin/env bash
# mptrain set-up: installs what the build and the tests need from Debian/Ubuntu packages (python3-torch is
# the independent reference the model is checked against) (apt, through sudo
# when not root), then configures and builds into build/ (Release). Idempotent: installed packages are not
# reinstalled and the build is incremental (ccache). Reports whether the CUDA toolkit was found.
#
#   bash launch/setup.sh            # deps + build
#   MPTRAIN_SKIP_BUILD=1 bash launch/setup.sh   # deps only
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake ccache pkg-config git python3
  openmpi-bin libopenmpi-dev
  libopenblas-openmp-dev
  libsleef-dev libdnnl-dev  # vector tanh/exp (GELU, softmax); oneDNN BF16/F32 matmul (CPU backend)
  libgtest-dev libgmock-dev libbenchmark-dev
  libcli11-dev nlohmann-json3-dev libfmt-dev
  clang-format
  universal-ctags  # function extents for tests/tools/function_length.py (CI)
  clang libclang-rt-14-dev libomp-14-dev  # libFuzzer targets (tests/fuzz, .ci/run)
  util-linux  # setpriv: the bad-input test that drops root's privileges; unshare: tests/multihost
  iproute2  # ip netns: the namespace hosts of tests/multihost
  python3-torch
  python3-venv  # launch/hf_venv.sh: transformers/tokenizers (PyPI) over Debian's torch for the interop tests
  bible-kjv gnuplot-nox  # default corpus (launch/corpus.sh), plots (benchmarks/plot.py)
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup: all ${#packages[@]} packages already installed"
fi

# CUDA: nvcc on PATH or in the toolkit's standard place.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
if command -v nvcc >/dev/null 2>&1; then
  echo "setup: CUDA toolkit found: $(nvcc --version | tail -n 2 | head -n 1) -> CUDA backend will be built"
  # Fused attention (cuDNN SDPA) needs the header-only cuDNN frontend from PyPI; without it (no pip, no
  # network) attention runs unfused and the build says so.
  bash launch/cudnn_frontend.sh || echo "setup: cuDNN frontend not fetched -> attention will run unfused"
else
  echo "setup: CUDA toolkit not found -> CPU-only build"
fi

if [ "${MPTRAIN_SKIP_BUILD:-0}" != "1" ]; then
  # shellcheck disable=SC2086  # MPTRAIN_CMAKE_ARGS is split into words on purpose
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release ${MPTRAIN_CMAKE_ARGS:-}
  cmake --build build -j "$(nproc)"
fi
