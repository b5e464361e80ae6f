// make_runtime: backend + gradient communicator for --device (see include/mptrain/runtime.hpp).
#include "mptrain/runtime.hpp"

#include "mptrain/comm_mpi.hpp"
#include "mptrain/error.hpp"

#if MPTRAIN_WITH_CUDA
#include <cuda_runtime.h>

#include "mptrain/comm_nccl.hpp"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_ops.hpp"
#endif

namespace mpt {

bool cuda_available() {
#if MPTRAIN_WITH_CUDA
  return cuda::device_count() > 0;
#else
  return false;
#endif
}

std::string resolve_device(const std::string& device) {
  if (device == "auto") return cuda_available() ? "cuda" : "cpu";
  MPT_INPUT_CHECK(device == "cpu" || device == "cuda", "--device {}: expected auto, cpu or cuda", device);
#if !MPTRAIN_WITH_CUDA
  MPT_INPUT_CHECK(
      device != "cuda",
      "--device cuda: this build of mptrain has no CUDA backend (it was configured where nvcc was "
      "not found, or with -DMPTRAIN_WITH_CUDA=OFF); use --device cpu");
#endif
  return device;
}

Runtime make_runtime(const std::string& device, MPI_Comm comm, double timeout_seconds) {
  Runtime r;
  if (device == "cpu") {
    r.backend = make_cpu_backend();
    r.grad_comm = std::make_unique<MpiCommunicator>(comm);
  } else {
    MPT_INPUT_CHECK(device == "cuda", "--device {}: expected cpu or cuda", device);
#if MPTRAIN_WITH_CUDA
    const int gpu = select_local_device(comm);
    MPT_CUDA_CHECK(cudaSetDevice(gpu));
    r.backend = make_cuda_backend(gpu);
    r.grad_comm = std::make_unique<NcclCommunicator>(
        comm, static_cast<cudaStream_t>(r.backend->native_stream()), timeout_seconds);
#else
    resolve_device(device);  // throws the build's InputError
#endif
  }
  r.grad_comm->set_timeout_seconds(timeout_seconds);
  return r;
}

Runtime make_runtime(const std::string& device, const Communicator& comm, double timeout_seconds) {
  const auto* mpi = dynamic_cast<const MpiCommunicator*>(&comm);
  MPT_CHECK(mpi != nullptr, "make_runtime: needs the ranks' MPI communicator to start from, got a {} one",
            comm.name());
  return make_runtime(device, mpi->handle(), timeout_seconds);
}

}  // namespace mpt
