// The device choice (resolve_device, select_local_device) and make_runtime: backend + gradient communicator
// for --device (see include/mptrain/runtime.hpp).
#include "mptrain/runtime.hpp"

#include "mptrain/comm_mpi.hpp"
#include "mptrain/error.hpp"

#if MPTRAIN_WITH_CUDA
#include <cuda_runtime.h>

#include <array>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "mptrain/comm_nccl.hpp"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_ops.hpp"
#endif

namespace mpt {

#if MPTRAIN_WITH_CUDA
namespace {

/// Non-negative integer from environment variable `name`; -1 when unset. Throws InputError when malformed.
int env_local_rank(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return -1;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  MPT_INPUT_CHECK(*end == '\0' && x >= 0 && x <= INT_MAX, "{}={} is not a node-local rank", name, v);
  return static_cast<int>(x);
}

}  // namespace

int select_local_device(MPI_Comm comm) {
  int rank = 0;
  MPT_MPI_CHECK(MPI_Comm_rank(comm, &rank));
  MPI_Comm node = MPI_COMM_NULL;
  MPT_MPI_CHECK(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node));
  // Freed on every path out of this function (the node communicator is needed for the GPU check below).
  struct NodeComm {
    MPI_Comm comm;
    ~NodeComm() { MPI_Comm_free(&comm); }
  } node_guard{node};
  int node_rank = 0, node_size = 1;
  MPT_MPI_CHECK(MPI_Comm_rank(node, &node_rank));
  MPT_MPI_CHECK(MPI_Comm_size(node, &node_size));

  std::string problem;
  int local_rank = -1;
  try {
    local_rank = env_local_rank("OMPI_COMM_WORLD_LOCAL_RANK");
    if (local_rank < 0) local_rank = env_local_rank("SLURM_LOCALID");
  } catch (const InputError& e) {
    problem = e.what();
  }
  if (local_rank < 0) local_rank = node_rank;

  int devices = 0;
  const cudaError_t rc = cudaGetDeviceCount(&devices);
  if (rc != cudaSuccess) {
    (void)cudaGetLastError();
    devices = 0;
  }
  const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
  const std::string visible_text =
      visible ? MPT_FORMAT("CUDA_VISIBLE_DEVICES={}", visible) : "CUDA_VISIBLE_DEVICES unset";
  const std::string host = detail::host_name();
  if (problem.empty() && devices == 0)
    problem = MPT_FORMAT("no CUDA device on {} (rank {}; {}{})", host, rank, visible_text,
                         rc != cudaSuccess ? MPT_FORMAT("; {}", cudaGetErrorString(rc)) : std::string());

  // Two ranks of a node must not drive one physical GPU. Compared by UUID, not by counts: with one GPU per
  // task (srun --gpus-per-task=1) every rank sees one device and they are still all different. Every rank
  // of the node takes part (zeros when it has no device).
  std::array<unsigned char, 16> uuid{};
  if (problem.empty() && devices > 0) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, local_rank % devices) == cudaSuccess)
      std::memcpy(uuid.data(), &prop.uuid, uuid.size());
    else
      (void)cudaGetLastError();
  }
  std::vector<unsigned char> uuids(uuid.size() * static_cast<size_t>(node_size));
  MPT_MPI_CHECK(MPI_Allgather(uuid.data(), static_cast<int>(uuid.size()), MPI_BYTE, uuids.data(),
                              static_cast<int>(uuid.size()), MPI_BYTE, node));
  const auto uuid_of = [&](int r) {
    return std::vector<unsigned char>(uuids.begin() + static_cast<std::ptrdiff_t>(r * uuid.size()),
                                      uuids.begin() + static_cast<std::ptrdiff_t>((r + 1) * uuid.size()));
  };
  const std::vector<unsigned char> none(uuid.size(), 0);
  if (problem.empty() && devices > 0)
    for (int r = 0; r < node_size; ++r)
      if (r != node_rank && uuid_of(r) != none && uuid_of(r) == uuid_of(node_rank)) {
        problem = MPT_FORMAT(
            "{} ranks run on {} with {} visible CUDA device(s) ({}) and two of them would share one GPU; "
            "start one rank per GPU",
            node_size, host, devices, visible_text);
        break;
      }

  // Every rank learns the first rank's problem, so all fail together with the same message.
  const int mine = problem.empty() ? INT_MAX : rank;
  int first = INT_MAX;
  MPT_MPI_CHECK(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm));
  if (first != INT_MAX) {
    char text[512] = {};
    if (rank == first) std::snprintf(text, sizeof(text), "%s", problem.c_str());
    MPT_MPI_CHECK(MPI_Bcast(text, static_cast<int>(sizeof(text)), MPI_CHAR, first, comm));
    throw InputError(MPT_FORMAT("--device cuda: {}", text));
  }
  return local_rank % devices;
}
#endif

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
