// What the step-level benchmarks share: the choice of backend and communicator (one place, so the CUDA
// backend and the NCCL communicator are wired in here and nowhere else), the machine description that goes
// into every JSON report, and writing that report.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "mptrain/backend.hpp"
#include "mptrain/comm_mpi.hpp"
#include "mptrain/error.hpp"

namespace mpt::bench {

/// The process's rank within its node: OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID, else 0. Picks the GPU.
inline int local_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"})
    if (const char* v = std::getenv(name)) return std::atoi(v);
  return 0;
}

/// The backend for `device` ("cpu" or "cuda"). CUDA: device local_rank() (modulo the visible devices is the
/// CUDA backend's business). Throws mpt::InputError for cuda in a build without MPTRAIN_WITH_CUDA.
inline std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_backend();
#if MPTRAIN_WITH_CUDA
  if (device == "cuda") return make_cuda_backend(local_rank());
#endif
  MPT_INPUT_CHECK(device != "cuda",
                  "--device cuda: this build has no CUDA backend (configure with "
                  "-DMPTRAIN_WITH_CUDA=ON on a machine with nvcc)");
  MPT_INPUT_CHECK(false, "--device {}: expected cpu or cuda", device);
  return nullptr;
}

/// The communicator the engine uses on `backend`'s memory: MPI for host memory. Device memory needs the NCCL
/// communicator, which is not part of this build yet: throws mpt::InputError for a CUDA backend (the one
/// place to wire NCCL in).
inline std::unique_ptr<Communicator> make_communicator(Backend& backend) {
  MPT_INPUT_CHECK(backend.name() == "cpu",
                  "backend {}: the benchmarks have no communicator for device memory yet (NCCL is wired in "
                  "benchmarks/bench_common.hpp make_communicator)",
                  backend.name());
  return std::make_unique<MpiCommunicator>();
}

/// "model name" from /proc/cpuinfo, or "unknown".
inline std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  return "unknown";
}

/// The machine a report was measured on: host, CPU model, logical cores, ranks, threads per rank.
inline nlohmann::json machine_json(int ranks, int threads_per_rank) {
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  return {{"host", host},
          {"cpu_model", cpu_model()},
          {"logical_cores", std::thread::hardware_concurrency()},
          {"ranks", ranks},
          {"threads_per_rank", threads_per_rank},
          {"oversubscribed",
           static_cast<unsigned>(ranks * threads_per_rank) > std::thread::hardware_concurrency()}};
}

/// Prints `report` (indented JSON) on stdout and, when `path` is not empty, writes it there. Returns false
/// (after one line on stderr naming `program`) when the file cannot be written.
inline bool emit_json(const nlohmann::json& report, const std::string& path, const char* program) {
  const std::string text = report.dump(2);
  std::printf("%s\n", text.c_str());
  if (path.empty()) return true;
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f || std::fprintf(f, "%s\n", text.c_str()) < 0 || std::fclose(f) != 0) {
    std::fprintf(stderr, "%s: cannot write --json file '%s'\n", program, path.c_str());
    return false;
  }
  return true;
}

}  // namespace mpt::bench
