#!/usr/bin/env bash
# Prepares the GPU suite's shipment on a machine WITHOUT a GPU: builds mptrain for sm_90 (Release, tests and
# benchmarks on), then assembles the git-ignored folder .gpu-build/ that benchmarks/gpu/run_suite.sh runs on the
# GPU machine, whose image has CUDA 13 (cudart, cuBLAS, cuDNN and NCCL as Python wheels) but no Open MPI,
# OpenBLAS, fmt or OpenMP runtime of ours:
#
#   .gpu-build/bin/       mptrain, the GPU test binaries, bench_step, bench_collectives (whatever this tree
#                         builds of them), two CPU-only tests as a check of the shipped libraries, and Open MPI's
#                         mpiexec + orted; all stripped
#   .gpu-build/lib/       every shared library those need that is not glibc and not CUDA (ldd decides), named
#                         by soname: OpenBLAS, libgomp, fmt, libstdc++, Open MPI, PMIx, hwloc, libevent, ...
#   .gpu-build/openmpi/   Open MPI's relocated prefix: its MCA components, help texts, Debian's MCA defaults
#   .gpu-build/pmix/      PMIx's relocated prefix (its plugins and help texts)
#   .gpu-build/data/      a small text corpus (1 MB of data/kjv.txt) for the single-rank training run
#   .gpu-build/manifest.json   what is in it, sizes, sha256, git commit, and the CUDA sonames the binaries need
#   .gpu-build/bundle.tar.xz   all of the above in one archive: the file that travels to the GPU machine
#
# Open MPI is shipped (not a no-MPI build): the product keeps one build configuration and every binary is the
# one CI tests; only the Open MPI runtime (a few MB without OpenBLAS) travels. Its files are taken from the
# installed Debian packages (libopenmpi3, openmpi-bin, openmpi-common, libpmix2: the packages this tree was
# linked against, `dpkg -L` lists them), which is what `apt-get download` + `dpkg -x` would unpack.
# MCA components that need network stacks absent on the GPU machine (UCX, libfabric, PSM, verbs, netlink) are
# left out, so Open MPI never warns that it cannot load them.
#
# After assembling, the shipped test binaries are run here with ONLY the shipped libraries and the system's
# glibc (env -i, LD_LIBRARY_PATH=.gpu-build/lib; the GPU tests also get this machine's CUDA libraries, found as
# the suite finds them on the GPU machine): test_dtype (no MPI), test_comm_mpi as an MPI singleton and under
# the shipped mpiexec -n 1, and every GPU test binary, whose GPU tests skip here ("no CUDA device") while the
# child-job test starts a 2-rank job with the shipped mpiexec (MPT_TEST_MPIEXEC, set by env.sh), as the NCCL
# watchdog test does on the GPU machine.
#
#   bash benchmarks/gpu/prepare.sh [--build-dir DIR] [--jobs N] [--no-build]
#
# Defaults: --build-dir build-sm90, --jobs 2. --no-build stages from an existing build. Exit 0 only when the
# folder was assembled, passed the checks above, and the bundle is at most 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

build_dir=build-sm90
jobs=2
do_build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build_dir=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --no-build) do_build=0; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "prepare: unknown argument '$1' (--help)" >&2; exit 2 ;;
  esac
done

case $build_dir in /*) ;; *) build_dir=$root/$build_dir ;; esac
stage_dir=$root/.gpu-build
bundle=$stage_dir/bundle.tar.xz
limit_bytes=$((64 * 1024 * 1024))
multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
ompi_pkglibdir=/usr/lib/$multiarch/openmpi/lib/openmpi3
pmix_prefix=/usr/lib/$multiarch/pmix2
log() { echo "prepare: $*"; }
die() { echo "prepare: error: $*" >&2; exit 1; }

# Shipped binaries. Names that this tree does not build (yet) are reported and skipped; the GPU tests are
# every test_cuda_* target plus the NCCL communicator's test.
programs=(mptrain bench_step bench_collectives)
host_checks=(test_dtype test_comm_mpi)
gpu_test_pattern='^(test_cuda_[A-Za-z0-9_]+|test_comm_nccl)$'

# ---------------------------------------------------------------------------------------------- build
if [ "$do_build" = 1 ]; then
  # The fused attention (cuDNN SDPA) is part of what the GPU run must check: without the frontend headers
  # (git-ignored, fetched once) CMake would quietly build attention unfused only.
  [ -f third_party/cudnn-frontend/include/cudnn_frontend.h ] || bash launch/cudnn_frontend.sh ||
    die "could not fetch the cuDNN frontend (launch/cudnn_frontend.sh): the build would have no cuDNN SDPA"
  log "configuring $build_dir (Release, CUDA architecture 90, tests and benchmarks)"
  mkdir -p "$build_dir"
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DMPTRAIN_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DMPTRAIN_BUILD_TESTS=ON -DMPTRAIN_BUILD_BENCHMARKS=ON >"$build_dir/prepare-configure.log" 2>&1 ||
    { tail -n 30 "$build_dir/prepare-configure.log" >&2; die "cmake failed ($build_dir/prepare-configure.log)"; }
  grep -q 'fused attention via cuDNN SDPA on' "$build_dir/prepare-configure.log" ||
    { grep 'fused attention' "$build_dir/prepare-configure.log" >&2; die "configured without cuDNN SDPA"; }
fi
[ -f "$build_dir/CMakeCache.txt" ] || die "$build_dir is not a configured build tree"
grep -Eq '^MPTRAIN_WITH_CUDA:[A-Z]+=ON$' "$build_dir/CMakeCache.txt" || die "$build_dir was configured without CUDA"
grep -Eq '^CMAKE_CUDA_ARCHITECTURES:[A-Z]+=90$' "$build_dir/CMakeCache.txt" ||
  die "$build_dir is not built for CUDA architecture 90 alone (CMAKE_CUDA_ARCHITECTURES)"

# Makefiles list targets as "... name", Ninja as "name: phony".
mapfile -t all_targets < <(cmake --build "$build_dir" --target help |
  sed -n 's/^\.\.\. \([A-Za-z0-9_]*\).*/\1/p; s/^\([A-Za-z0-9_]*\): .*/\1/p')
has_target() {
  local t
  for t in "${all_targets[@]}"; do [ "$t" = "$1" ] && return 0; done
  return 1
}
mapfile -t gpu_tests < <(printf '%s\n' "${all_targets[@]}" | grep -E "$gpu_test_pattern" | sort)
wanted=()
missing=()
for t in "${programs[@]}" "${host_checks[@]}" "${gpu_tests[@]}"; do
  if has_target "$t"; then wanted+=("$t"); else missing+=("$t"); fi
done
[ ${#missing[@]} -eq 0 ] || log "not built by this tree (the suite will record them as missing): ${missing[*]}"
if [ "$do_build" = 1 ]; then
  log "building ${wanted[*]} with -j$jobs"
  cmake --build "$build_dir" -j "$jobs" --target "${wanted[@]}" >"$build_dir/prepare-build.log" 2>&1 ||
    { tail -n 40 "$build_dir/prepare-build.log" >&2; die "build failed (log: $build_dir/prepare-build.log)"; }
fi

# ---------------------------------------------------------------------------------------------- stage
rm -rf "$stage_dir"
mkdir -p "$stage_dir"/{bin,lib,data} "$stage_dir/openmpi/lib" "$stage_dir/openmpi/etc" "$stage_dir/pmix/lib"

# Where CMake put each target's executable: the top of the build tree, tests/ or benchmarks/.
find_binary() {
  local d
  for d in "$build_dir" "$build_dir/tests" "$build_dir/benchmarks"; do
    [ -x "$d/$1" ] && [ -f "$d/$1" ] && { echo "$d/$1"; return 0; }
  done
  return 1
}
for t in "${wanted[@]}"; do
  src=$(find_binary "$t") || die "target $t has no executable in $build_dir (build it first)"
  install -m 755 "$src" "$stage_dir/bin/$t"
done
# Open MPI's launcher and daemon (the singleton runs need neither; mpiexec -n 1 and multi-GPU machines do).
install -m 755 /usr/bin/orterun "$stage_dir/bin/mpiexec"
install -m 755 /usr/bin/orted "$stage_dir/bin/orted"

# Open MPI's components: all of libopenmpi3's except those that link network stacks the GPU image lacks.
excluded_deps='libuc[pstm]|libfabric|libpsm|libibverbs|librdmacm|libnl-|libjvm|libcuda\.so'
mkdir -p "$stage_dir/openmpi/lib/openmpi3"
kept=0
dropped=()
for comp in "$ompi_pkglibdir"/mca_*.so; do
  # (grep reads all of ldd's output: with grep -q and pipefail, ldd's SIGPIPE would fail the test at random)
  if ldd "$comp" | grep -E "$excluded_deps" >/dev/null; then
    dropped+=("$(basename "$comp" .so)")
  else
    install -m 644 "$comp" "$stage_dir/openmpi/lib/openmpi3/"
    kept=$((kept + 1))
  fi
done
log "Open MPI: $kept MCA components shipped, ${#dropped[@]} left out (need UCX/libfabric/PSM/verbs/netlink)"
cp -r /usr/share/openmpi "$stage_dir/openmpi/share-openmpi.tmp"
mkdir -p "$stage_dir/openmpi/share"
mv "$stage_dir/openmpi/share-openmpi.tmp" "$stage_dir/openmpi/share/openmpi"
rm -f "$stage_dir"/openmpi/share/openmpi/*wrapper-data.txt "$stage_dir"/openmpi/share/openmpi/*.supp
install -m 644 /etc/openmpi/openmpi-mca-params.conf /etc/openmpi/openmpi-default-hostfile \
  "$stage_dir/openmpi/etc/"
# PMIx: its plugins and help texts (libpmix itself goes to lib/ with the other libraries).
cp -r "$pmix_prefix/lib/pmix" "$stage_dir/pmix/lib/pmix"
cp -r "$pmix_prefix/share" "$stage_dir/pmix/share"
rm -f "$stage_dir"/pmix/share/pmix/*.supp "$stage_dir"/pmix/share/pmix/*wrapper-data.txt

# Libraries: the closure (ldd is transitive) of everything shipped, minus glibc, the kernel's vDSO and CUDA.
is_glibc='^(linux-vdso\.so|ld-linux[^ ]*\.so|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libresolv\.so|libutil\.so)'
is_cuda='^(libcuda\.so|libcudart\.so|libcublas(Lt)?\.so|libcudnn[a-z_]*\.so|libnccl\.so|libnvrtc|libnvJitLink|libcufile|libcusparse|libcufft|libcurand|libcusolver|libnvidia-)'
objects=("$stage_dir"/bin/* "$stage_dir"/openmpi/lib/openmpi3/*.so "$stage_dir"/pmix/lib/pmix/*.so)
declare -A cuda_needed=()
for obj in "${objects[@]}"; do
  while read -r name arrow path _; do
    [ "$arrow" = "=>" ] || continue
    if [[ $name =~ $is_glibc ]]; then continue; fi
    if [[ $name =~ $is_cuda ]]; then cuda_needed[$name]=1; continue; fi
    [ "$path" != "not" ] || die "$(basename "$obj") needs $name, which is not installed here"
    [ -f "$stage_dir/lib/$name" ] || install -m 644 "$(readlink -f "$path")" "$stage_dir/lib/$name"
  done < <(ldd "$obj")
done
# (The libmca_common_* libraries that components link come along the same way; Open MPI finds the components
# themselves through OPAL_PKGLIBDIR, set by benchmarks/gpu/env.sh.)

# Strip what we built and what we copied (OpenBLAS, Open MPI and Debian's libraries are stripped already;
# strip is idempotent). CUDA device code lives in .nv_fatbin, which --strip-unneeded keeps.
strip --strip-unneeded "$stage_dir"/bin/* "$stage_dir"/lib/*.so* "$stage_dir"/openmpi/lib/openmpi3/*.so \
  "$stage_dir"/pmix/lib/pmix/*.so 2>/dev/null || true

# A small corpus for the training run: the first 1,000,000 bytes of the default corpus, cut at a line end.
[ -s data/kjv.txt ] || bash launch/corpus.sh >/dev/null
head -c 1000000 data/kjv.txt | sed '$d' >"$stage_dir/data/tiny.txt"
[ -s "$stage_dir/data/tiny.txt" ] || die "could not write the small corpus"

# The C++ runtime (libstdc++, libgcc_s) goes to lib/cxx: the suite uses the GPU machine's own where it is new
# enough (it is there for PyTorch, and a newer one may need a newer glibc than Debian 12's 2.36), else this one.
mkdir -p "$stage_dir/lib/cxx"
for l in libstdc++.so.6 libgcc_s.so.1; do
  [ -f "$stage_dir/lib/$l" ] && mv "$stage_dir/lib/$l" "$stage_dir/lib/cxx/$l"
done
# newest_version PREFIX FILE...: the newest symbol version PREFIX_x.y.z that FILEs need.
newest_version() {
  local prefix=$1
  shift
  objdump -T "$@" 2>/dev/null | grep '\*UND\*' | grep -o "[( ]${prefix}_[0-9][0-9.]*" |
    sed "s/^.${prefix}_//" | sort -uV | tail -n 1
}
mapfile -d '' -t shipped < <(find "$stage_dir" -type f \( -name '*.so*' -o -path "$stage_dir/bin/*" \) \
  -not -path "$stage_dir/lib/cxx/*" -print0)
glibc_required=$(newest_version GLIBC "${shipped[@]}")
glibc_with_cxx=$(newest_version GLIBC "${shipped[@]}" "$stage_dir"/lib/cxx/*)
glibcxx_required=$(newest_version GLIBCXX "${shipped[@]}")
cxxabi_required=$(newest_version CXXABI "${shipped[@]}")
gcc_required=$(newest_version GCC "${shipped[@]}")
log "shipped files need glibc >= $glibc_required ($glibc_with_cxx with the shipped libstdc++)," \
  "GLIBCXX_$glibcxx_required, CXXABI_$cxxabi_required, GCC_$gcc_required"

# ---------------------------------------------------------------------------------------------- manifest
cuda_list=$(printf '%s\n' "${!cuda_needed[@]}" | sort | tr '\n' ' ')
python3 - "$stage_dir" "$build_dir" "$cuda_list" "${missing[*]}" "${dropped[*]}" "$glibc_required" \
  "$glibc_with_cxx" "$glibcxx_required" "$cxxabi_required" "$gcc_required" <<'PY'
import hashlib, json, os, subprocess, sys, time
stage, build_dir, cuda, missing, dropped, glibc_required = sys.argv[1:7]
glibc_with_cxx, glibcxx, cxxabi, gcc = sys.argv[7:11]
def commit():
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
files = {}
for d, _, names in os.walk(stage):
    for n in sorted(names):
        p = os.path.join(d, n)
        rel = os.path.relpath(p, stage)
        if rel in ("manifest.json", "bundle.tar.xz"):
            continue
        with open(p, "rb") as f:
            files[rel] = {"bytes": os.path.getsize(p), "sha256": hashlib.sha256(f.read()).hexdigest()}
cache = dict(l.split("=", 1) for l in open(os.path.join(build_dir, "CMakeCache.txt")).read().splitlines()
             if "=" in l and not l.startswith(("#", "//")))
def cache_value(key):
    return next((v for k, v in cache.items() if k.split(":")[0] == key), None)
bins = sorted(os.listdir(os.path.join(stage, "bin")))
manifest = {
    "format": 1,
    "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "git_commit": commit(),
    "build": {"dir": build_dir, "build_type": cache_value("CMAKE_BUILD_TYPE"),
              "cuda_architectures": cache_value("CMAKE_CUDA_ARCHITECTURES"),
              "cuda_compiler": cache_value("CMAKE_CUDA_COMPILER"),
              "cxx_compiler": cache_value("CMAKE_CXX_COMPILER")},
    "binaries": bins,
    "gpu_tests": [b for b in bins if b.startswith("test_cuda_") or b == "test_comm_nccl"],
    "host_checks": [b for b in bins if b in ("test_dtype", "test_comm_mpi")],
    "not_built": missing.split(),
    "cuda_sonames_needed": cuda.split(),
    "glibc_required": glibc_required,
    "cxx_runtime": {"dir": "lib/cxx", "glibc_required_with_it": glibc_with_cxx,
                    "versions_required": {"GLIBCXX": glibcxx, "CXXABI": cxxabi, "GCC": gcc}},
    "openmpi_components_left_out": dropped.split(),
    "total_bytes": sum(f["bytes"] for f in files.values()),
    "files": files,
}
with open(os.path.join(stage, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.write("\n")
PY

# ---------------------------------------------------------------------------------------------- checks
# Only the shipped libraries and the system's glibc: env -i, the suite's own environment file.
# shellcheck disable=SC2016 # expanded by the inner bash, inside the clean environment
check_env=(env -i PATH=/usr/bin:/bin HOME="${TMPDIR:-/tmp}" MPT_GPU_BUNDLE="$stage_dir" MPT_GPU_ENV="$root/benchmarks/gpu/env.sh" bash -c
  'source "$MPT_GPU_ENV" && mpt_gpu_env "$MPT_GPU_BUNDLE" "$MPT_GPU_BUNDLE/lib/cxx" && exec "$@"' check)
# skip_reasons LOG: each distinct reason a gtest log gives for its skipped tests, with a count.
skip_reasons() {
  grep -A1 -E ': Skipped$' "$1" | grep -vE ': Skipped$|^--$' | sort | uniq -c | sed 's/^ */    skipped: /' || true
}
# require_child_job NAME LOG: the binaries with the child-job test must have run it (not skipped it).
require_child_job() {
  case $1 in test_comm_mpi | test_comm_nccl) ;; *) return 0 ;; esac
  grep -E '^\[ +OK +\] ChildJob\.TheLauncherStartsAJobFromInsideThisOne' "$2" | sed 's/^/  /' ||
    { cat "$2" >&2; die "$1: the child-job test did not run and pass with the shipped mpiexec"; }
}
for t in "${host_checks[@]}"; do
  [ -x "$stage_dir/bin/$t" ] || continue
  # Anything still resolved outside .gpu-build/lib (other than glibc and CUDA) means the closure is incomplete.
  leaks=$("${check_env[@]}" ldd "$stage_dir/bin/$t" | awk '$2 == "=>" { print $1, $3 }' |
    grep -Ev "$is_glibc" | grep -Ev "$is_cuda" | grep -v " $stage_dir/lib/" || true)
  [ -z "$leaks" ] || die "$t resolves libraries outside $stage_dir/lib: $leaks"
  log "check: $t with only the shipped libraries"
  check_log=$build_dir/prepare-check-$t.log
  (cd "${TMPDIR:-/tmp}" && "${check_env[@]}" "$stage_dir/bin/$t") >"$check_log" 2>&1 ||
    { cat "$check_log" >&2; die "$t failed with only the shipped libraries"; }
  grep -E '^\[  (PASSED|SKIPPED|FAILED) +\] [0-9]+ test' "$check_log" | sed 's/^/  /'
  skip_reasons "$check_log"
  require_child_job "$t" "$check_log"
  rm -f "$check_log"
done
# The GPU test binaries: this machine's CUDA libraries (not shipped) as on the GPU machine, the rest shipped.
mapfile -t cuda_dirs < <(python3 benchmarks/gpu/suite.py find-libs "$stage_dir/manifest.json" \
  "$build_dir/prepare-libs.json" 2>/dev/null)
# shellcheck disable=SC2016 # expanded by the inner bash, inside the clean environment
gpu_check_env=(env -i PATH=/usr/bin:/bin HOME="${TMPDIR:-/tmp}" MPT_GPU_BUNDLE="$stage_dir" MPT_GPU_ENV="$root/benchmarks/gpu/env.sh"
  MPT_CUDA_DIRS="$(IFS=:; echo "${cuda_dirs[*]}")" bash -c
  'IFS=: read -r -a d <<<"$MPT_CUDA_DIRS"; unset MPT_CUDA_DIRS
   source "$MPT_GPU_ENV" && mpt_gpu_env "$MPT_GPU_BUNDLE" "${d[@]}" "$MPT_GPU_BUNDLE/lib/cxx" && exec "$@"' check)
for b in "$stage_dir"/bin/test_cuda_* "$stage_dir"/bin/test_comm_nccl; do
  [ -x "$b" ] || continue
  t=$(basename "$b")
  log "check: $t with only the shipped libraries (and this machine's CUDA libraries)"
  check_log=$build_dir/prepare-check-$t.log
  (cd "${TMPDIR:-/tmp}" && timeout 300 "${gpu_check_env[@]}" "$b") >"$check_log" 2>&1 ||
    { tail -n 60 "$check_log" >&2; die "$t failed with only the shipped libraries"; }
  # What ran, what skipped and why (without a GPU the device tests skip with "no CUDA device").
  grep -E '^\[  (PASSED|SKIPPED|FAILED) +\] [0-9]+ test' "$check_log" | sed 's/^/  /'
  skip_reasons "$check_log"
  require_child_job "$t" "$check_log"
  rm -f "$check_log"
done
if [ -x "$stage_dir/bin/test_comm_mpi" ]; then
  log "check: mpiexec -n 1 test_comm_mpi with the shipped Open MPI"
  (cd "${TMPDIR:-/tmp}" && "${check_env[@]}" "$stage_dir/bin/mpiexec" -n 1 "$stage_dir/bin/test_comm_mpi" \
    --gtest_brief=1) >"$build_dir/prepare-check-mpiexec.log" 2>&1 ||
    { cat "$build_dir/prepare-check-mpiexec.log" >&2; die "mpiexec -n 1 failed with the shipped Open MPI"; }
  tail -n 2 "$build_dir/prepare-check-mpiexec.log" | sed 's/^/  /'
  rm -f "$build_dir/prepare-check-mpiexec.log"
fi

# ---------------------------------------------------------------------------------------------- bundle
log "packing $bundle"
(cd "$stage_dir" && tar --sort=name --owner=0 --group=0 --numeric-owner -cf - --exclude=./bundle.tar.xz . |
  xz -T "$jobs" -6 >"$build_dir/bundle.tar.xz.tmp") || die "packing the bundle failed"
mv "$build_dir/bundle.tar.xz.tmp" "$bundle"
tree_bytes=$(du -sb --exclude=bundle.tar.xz "$stage_dir" | cut -f1)
bundle_bytes=$(stat -c %s "$bundle")
log "$(awk -v t="$tree_bytes" -v b="$bundle_bytes" \
  'BEGIN { printf "unpacked %.1f MiB, bundle %.1f MiB (limit 64 MiB for what travels)", t / 1048576, b / 1048576 }')"
log "CUDA libraries the binaries need (found on the GPU machine, not shipped): ${cuda_list:-none}"
[ "$bundle_bytes" -le "$limit_bytes" ] || die "bundle is over 64 MiB"
log "done: carry .gpu-build/bundle.tar.xz and run, one command each:" \
  "bash benchmarks/gpu/run_suite.sh --part correctness --out \"\$OUT\";" \
  "bash benchmarks/gpu/run_suite.sh --part speed --out \"\$OUT\""
