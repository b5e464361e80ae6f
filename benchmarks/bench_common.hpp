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
#include "mptrain/runtime.hpp"

namespace mpt::bench {

/// The backend for `device` ("cpu" or "cuda") and the engine's communicator on its memory (MPI for host
/// memory; NCCL on the node-local GPU for CUDA), chosen by the trainer's own make_runtime
/// (include/mptrain/runtime.hpp). Throws mpt::InputError for cuda in a build without MPTRAIN_WITH_CUDA.
inline Runtime make_bench_runtime(const std::string& device) {
  return make_runtime(resolve_device(device), MPI_COMM_WORLD, 0.0);
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
