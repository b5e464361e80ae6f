#!/usr/bin/env bash
# Installs current PyTorch from PyPI into a git-ignored venv (benchmarks/.venv-torch) for
# benchmarks/compare_pytorch.py: the reference that mptrain's CPU speed is compared against. Debian's
# python3-torch (1.13) is not that reference. Idempotent: an existing venv with an importable torch is kept.
#
#   bash benchmarks/setup_torch_venv.sh          # then: benchmarks/.venv-torch/bin/python -c 'import torch'
#
# Only PyPI is reachable, so this is PyPI's default Linux wheel; on x86_64 it depends on the nvidia-* CUDA
# runtime wheels (several GiB). They are installed too, because the wheel's libtorch links against them; the
# CPU path does not use them. PYTHON picks the interpreter (default: python3 on PATH).
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv-torch
py=${PYTHON:-python3}
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  echo "setup_torch_venv: $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)') already in benchmarks/$venv"
  exit 0
fi
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q torch numpy
"$venv/bin/python" -c 'import torch; print("setup_torch_venv: torch", torch.__version__, "in benchmarks/.venv-torch")'
du -sh "$venv" | sed 's/^/setup_torch_venv: venv size /'
