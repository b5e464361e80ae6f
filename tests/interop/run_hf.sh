#!/usr/bin/env bash
# Runs tests/interop/test_hf.py with the Python of launch/hf_venv.sh (created on first use, then cached).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="$(bash "$here/../../launch/hf_venv.sh")"
exec "$python" "$here/test_hf.py" "$@"
