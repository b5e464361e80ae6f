// Where a rank computes and how its gradients travel: the backend for --device (CPU, or the CUDA device this
// rank owns on its node) and the communicator the engine reduces gradients with on that backend's memory (MPI
// for host memory, NCCL for device memory). The trainer and the benchmarks choose both here and nowhere else.
#pragma once

#include <memory>
#include <string>

#include <mpi.h>

#include "mptrain/backend.hpp"
#include "mptrain/comm.hpp"

namespace mpt {

/// A rank's backend and the engine's communicator on its memory. The communicator may keep a pointer to the
/// backend's stream, so it is declared after (destroyed before) the backend.
struct Runtime {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Communicator> grad_comm;
};

/// True when this build has the CUDA backend and this process sees at least one CUDA device.
bool cuda_available();

/// Resolves --device: "auto" is "cuda" when cuda_available(), else "cpu"; "cpu" and "cuda" stay. Throws
/// mpt::InputError naming --device for anything else, or for "cuda" in a build without MPTRAIN_WITH_CUDA.
std::string resolve_device(const std::string& device);

#if MPTRAIN_WITH_CUDA
/// This rank's CUDA device: the node-local rank (OMPI_COMM_WORLD_LOCAL_RANK, else SLURM_LOCALID, else the
/// rank in MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED)) modulo the number of visible devices. Does not
/// set the device: call cudaSetDevice with the result before creating the CUDA backend and the
/// NcclCommunicator. Only in builds with MPTRAIN_WITH_CUDA. Collective over `comm` (every rank must call it).
/// Throws mpt::InputError on every rank when any rank has no CUDA device ("no CUDA device") or two ranks of a
/// node would drive the same physical GPU (compared by UUID, so one GPU per task with its own
/// CUDA_VISIBLE_DEVICES is fine; NCCL does not support sharing); the message names the rank and device counts
/// and CUDA_VISIBLE_DEVICES. Throws mpt::LibraryError when MPI fails.
int select_local_device(MPI_Comm comm);
#endif

/// Builds the runtime for `device` ("cpu" or "cuda", see resolve_device) over the ranks of `comm`:
///  - cpu: make_cpu_backend() and an MpiCommunicator (a duplicate of `comm`);
///  - cuda: the node-local GPU (select_local_device: node-local rank modulo visible devices, an error when
///    two ranks would share one), cudaSetDevice, make_cuda_backend on it, and an NcclCommunicator whose
///    collectives are ordered after the backend's stream.
/// `timeout_seconds` arms the collective watchdog of the communicator (0: off). Collective over `comm`: every
/// rank must call it with the same device. Throws mpt::InputError (no device, ranks sharing a GPU) or
/// mpt::LibraryError (CUDA/NCCL failures).
Runtime make_runtime(const std::string& device, MPI_Comm comm, double timeout_seconds);

/// make_runtime over the ranks of `comm`, which must be an MpiCommunicator (the ranks' host communicator
/// that bootstraps the backend's: its MPI handle is what the device choice and the NCCL set-up use). Throws
/// mpt::Error naming the communicator otherwise.
Runtime make_runtime(const std::string& device, const Communicator& comm, double timeout_seconds);

}  // namespace mpt
