#!/usr/bin/env bash
# Fetches the header-only cuDNN frontend (NVIDIA cudnn-frontend, Apache-2.0 and MIT) that the fused attention
# path (kernels/cuda/attention_cudnn.cu) is written against, and unpacks its C++ headers into
# third_party/cudnn-frontend/ (git-ignored; never committed): include/ plus the wheel's licence files.
#
# The headers come from the PyPI wheel nvidia-cudnn-frontend at a pinned version and file hash; the wheel's
# Python parts are not used. The wheel is tagged for one Python and platform, but the headers in it are the
# same for every tag, so one tag is pinned and the download does not depend on the local Python. CMake finds
# the result through MPTRAIN_CUDNN_FRONTEND_DIR (default: this folder's include/).
#
# Idempotent: an unpacked copy whose VERSION file names the pinned version is kept. Needs python3 with pip and
# network access to PyPI (or a pip configured with a mirror). Prints where the headers are.
#
#   bash launch/cudnn_frontend.sh
set -euo pipefail
cd "$(dirname "$0")/.."

version=1.32.0
wheel=nvidia_cudnn_frontend-${version}-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
sha256=c6006556017a4d1c914c52a556c71b1267f2d6a0500f742e7b4edef539878df0
dest=third_party/cudnn-frontend

if [ -f "$dest/VERSION" ] && [ "$(cat "$dest/VERSION")" = "$version" ] && [ -f "$dest/include/cudnn_frontend.h" ]; then
  echo "cudnn-frontend: $version kept in $dest/include"
  exit 0
fi

tmp=$(mktemp -d)
staging=""
trap 'rm -rf "$tmp" ${staging:+"$staging"}' EXIT

echo "cudnn-frontend: downloading nvidia-cudnn-frontend==$version (headers only are kept)"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
  --abi cp311 --platform manylinux_2_28_x86_64 -d "$tmp" "nvidia-cudnn-frontend==$version"
if [ ! -f "$tmp/$wheel" ]; then
  echo "cudnn-frontend: expected $wheel, got: $(ls "$tmp")" >&2
  exit 1
fi
got=$(sha256sum "$tmp/$wheel" | cut -d ' ' -f 1)
if [ "$got" != "$sha256" ]; then
  echo "cudnn-frontend: $wheel has sha256 $got, expected $sha256" >&2
  exit 1
fi

# Unpack next to the destination and rename into place, so an interrupted run leaves no half-written tree.
mkdir -p third_party
staging=$(mktemp -d third_party/.cudnn-frontend.XXXXXX)
python3 - "$tmp/$wheel" "$staging" <<'EOF'
import sys, zipfile

wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    keep = [n for n in z.namelist()
            if n.startswith("include/") or (".dist-info/" in n and "/licenses/" in n)]
    if not any(n == "include/cudnn_frontend.h" for n in keep):
        sys.exit(f"cudnn-frontend: {wheel} has no include/cudnn_frontend.h")
    for name in keep:
        z.extract(name, out)
EOF
mv "$staging"/nvidia_cudnn_frontend-*.dist-info/licenses "$staging/licenses"
rm -rf "$staging"/nvidia_cudnn_frontend-*.dist-info
echo "$version" >"$staging/VERSION"
rm -rf "$dest"
mv "$staging" "$dest"
echo "cudnn-frontend: $version unpacked into $dest/include ($(find "$dest/include" -type f | wc -l) files)"
