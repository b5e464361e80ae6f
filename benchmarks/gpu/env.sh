# shellcheck shell=bash
# The runtime environment of the shipped GPU build (.gpu-build/, made by benchmarks/gpu/prepare.sh), sourced by
# prepare.sh (its checks) and run_suite.sh. Defines one function:
#
#   mpt_gpu_env BUNDLE [DIR...]
#
# BUNDLE is the absolute path of the unpacked .gpu-build folder; each DIR (the CUDA library folders that
# run_suite.sh found) is appended to LD_LIBRARY_PATH after BUNDLE/lib. Exports what the relocated Open MPI and
# PMIx need to find their components, help texts and defaults under BUNDLE instead of the paths Debian compiled
# in (/usr, /etc/openmpi), and the settings Open MPI needs to run as root inside a container.

mpt_gpu_env() {
  local bundle=$1
  shift
  local path=$bundle/lib dir
  for dir in "$@"; do path=$path:$dir; done
  export LD_LIBRARY_PATH=$path
  export OPAL_PREFIX=$bundle/openmpi
  export OPAL_EXEC_PREFIX=$bundle/openmpi
  export OPAL_BINDIR=$bundle/bin
  export OPAL_LIBDIR=$bundle/lib
  export OPAL_PKGLIBDIR=$bundle/openmpi/lib/openmpi3
  export OPAL_DATAROOTDIR=$bundle/openmpi/share
  export OPAL_DATADIR=$bundle/openmpi/share
  export OPAL_PKGDATADIR=$bundle/openmpi/share/openmpi
  export OPAL_SYSCONFDIR=$bundle/openmpi/etc
  export PMIX_PREFIX=$bundle/pmix
  export PMIX_EXEC_PREFIX=$bundle/pmix
  export PMIX_LIBDIR=$bundle/pmix/lib
  export PMIX_DATAROOTDIR=$bundle/pmix/share
  export PMIX_DATADIR=$bundle/pmix/share
  export PMIX_PKGDATADIR=$bundle/pmix/share/pmix
  export PMIX_SYSCONFDIR=$bundle/pmix/share
  # Root inside a container: Open MPI refuses root unless told, and the vader single-copy path needs ptrace.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  export OMPI_MCA_btl_vader_single_copy_mechanism=none
  # A singleton (a binary started without mpiexec) runs without forking an orted daemon.
  export OMPI_MCA_ess_singleton_isolated=1
  export OMPI_MCA_rmaps_base_oversubscribe=1
  # hwloc's optional plugins are not shipped; it works without them.
  export HWLOC_PLUGINS_PATH=$bundle/lib/hwloc
  # The launcher of the tests that start a child job (tests/child_job.hpp): the bundle's own mpiexec, which the
  # OPAL_*/PMIX_* variables above let find its relocated prefix (the GPU machine has no Open MPI).
  export MPT_TEST_MPIEXEC=$bundle/bin/mpiexec
}
