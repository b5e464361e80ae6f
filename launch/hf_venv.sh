#!/usr/bin/env bash
# Creates (once) the git-ignored Python environment of the Hugging Face interop tests and of
# launch/prepare_data.py, and prints its python. A venv over Debian's python3 with --system-site-packages, so
# torch is Debian's python3-torch 1.13 (launch/setup.sh installs it), never PyPI's multi-GB CUDA wheels; the
# pinned packages of launch/requirements-hf.txt come from PyPI. Idempotent and cached: a venv whose stamp
# matches the requirements file is reused without touching the network; concurrent callers (ctest -j) wait
# on a lock instead of building it twice.
#
#   python=$(bash launch/hf_venv.sh) && "$python" launch/prepare_data.py --help
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MPTRAIN_HF_VENV:-$root/.venv-hf}"
requirements="$root/launch/requirements-hf.txt"
stamp="$venv/.requirements-stamp"
base_python=/usr/bin/python3
[ -x "$base_python" ] || base_python="$(command -v python3)"

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
if [ ! -f "$stamp" ] || ! cmp -s "$stamp" "$requirements"; then
  echo "hf_venv: creating $venv (transformers and tokenizers from PyPI over Debian's torch)" >&2
  rm -rf "$venv"
  "$base_python" -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" >&2
  "$venv/bin/python" -c "import torch, transformers, tokenizers, safetensors" >&2
  cp "$requirements" "$stamp"
fi
echo "$venv/bin/python"
