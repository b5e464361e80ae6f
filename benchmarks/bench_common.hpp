// What the MPI benchmarks share: their main (run_main: MPI, flags, errors, the JSON report), the choice of
// backend and communicator (one place, so the CUDA backend and the NCCL communicator are wired in here and
// nowhere else), and the machine description that goes into every JSON report.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include <mpi.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "mptrain/backend.hpp"
#include "mptrain/comm_mpi.hpp"
#include "mptrain/config.hpp"
#include "mptrain/error.hpp"
#include "mptrain/runtime.hpp"

namespace mpt::bench {

/// The backend for `device` ("cpu" or "cuda") and the engine's communicator on its memory (MPI for host
/// memory; NCCL on the node-local GPU for CUDA), chosen by the trainer's own make_runtime
/// (include/mptrain/runtime.hpp). Throws mpt::InputError for cuda in a build without MPTRAIN_WITH_CUDA.
inline Runtime make_bench_runtime(const std::string& device) {
  return make_runtime(resolve_device(device), MPI_COMM_WORLD, 0.0);
}

/// Adds the model-shape flags of the step-level benchmarks to `app`, with `rc`'s values as the defaults:
/// --precision, --layers, --channels, --heads, --seq-len into `rc`, --vocab into `vocab`, and --micro-batch
/// into rc.micro_batch with `micro_batch_help` (what B means in this benchmark).
inline void add_model_flags(CLI::App& app, RunConfig& rc, int64_t& vocab,
                            const std::string& micro_batch_help) {
  app.add_option("--precision", rc.precision, "storage precision of weights, activations and gradients")
      ->check(CLI::IsMember({"fp32", "fp16", "bf16"}))
      ->capture_default_str();
  app.add_option("--layers", rc.layers, "transformer blocks L")->capture_default_str();
  app.add_option("--channels", rc.channels, "channels C")->capture_default_str();
  app.add_option("--heads", rc.heads, "attention heads NH")->capture_default_str();
  app.add_option("--seq-len", rc.seq_len, "sequence length T (tokens)")->capture_default_str();
  app.add_option("--vocab", vocab, "vocabulary size V")->capture_default_str();
  app.add_option("--micro-batch", rc.micro_batch, micro_batch_help)->capture_default_str();
}

/// Adds --warmup (untimed, >= 0) and --iters (timed, >= 1) to `app`; `unit` names what is repeated
/// ("steps", "iterations per point").
inline void add_timing_flags(CLI::App& app, int& warmup, int& iters, const std::string& unit) {
  app.add_option("--warmup", warmup, "untimed " + unit)->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("--iters", iters, "timed " + unit)->check(CLI::PositiveNumber)->capture_default_str();
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
  return {{"host", detail::host_name()},
          {"cpu_model", cpu_model()},
          {"logical_cores", std::thread::hardware_concurrency()},
          {"ranks", ranks},
          {"threads_per_rank", threads_per_rank},
          {"oversubscribed",
           static_cast<unsigned>(ranks * threads_per_rank) > std::thread::hardware_concurrency()}};
}

/// Whether a JSON report is also printed on stdout (no: the benchmark prints its own table there).
enum class ReportOnStdout { yes, no };

/// Prints `report` (indented JSON) on stdout when `on_stdout` is yes and, when `path` is not empty, writes it
/// there. Returns false (after one line on stderr naming `program`) when the file cannot be written.
inline bool emit_json(const nlohmann::json& report, const std::string& path, const char* program,
                      ReportOnStdout on_stdout = ReportOnStdout::yes) {
  const std::string text = report.dump(2);
  if (on_stdout == ReportOnStdout::yes) std::printf("%s\n", text.c_str());
  if (path.empty()) return true;
  FILE* f = std::fopen(path.c_str(), "w");
  if (!f || std::fprintf(f, "%s\n", text.c_str()) < 0 || std::fclose(f) != 0) {
    std::fprintf(stderr, "%s: cannot write --json file '%s'\n", program, path.c_str());
    return false;
  }
  return true;
}

/// The main of an MPI benchmark. Starts MPI for the whole run (MpiSession), adds --json FILE to `app` and
/// parses the command line (--help and flag errors exit as CLI11 does), then calls `body(report)`, which runs
/// the benchmark, fills `report` (only rank 0's is used) and returns the exit code (0, or the benchmark's own
/// failure code). On rank 0 a non-null report is printed on stdout (unless `on_stdout` is no: the body
/// printed its own table) and written to --json FILE when given; a file that cannot be written exits 1. An
/// exception from the body (bad values that pass the flag checks are the same on every rank, so every rank
/// throws alike) prints "PROGRAM: message" on rank 0 and exits 2.
template <typename Body>
int run_main(int argc, char** argv, CLI::App& app, const char* program, Body&& body,
             ReportOnStdout on_stdout = ReportOnStdout::yes) {
  MpiSession mpi(&argc, &argv);
  std::string json_path;
  app.add_option("--json", json_path,
                 on_stdout == ReportOnStdout::yes ? "also write the JSON report to this file (rank 0)"
                                                  : "write the JSON report to this file (rank 0)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  try {
    nlohmann::json report;
    const int code = body(report);
    if (rank != 0 || report.is_null()) return code;
    return emit_json(report, json_path, program, on_stdout) ? code : 1;
  } catch (const std::exception& e) {
    if (rank == 0) std::fprintf(stderr, "%s: %s\n", program, e.what());
    return 2;
  }
}

}  // namespace mpt::bench
