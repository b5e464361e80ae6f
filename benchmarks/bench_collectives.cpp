// bench_collectives: all-reduce, reduce-scatter and all-gather through mptrain's own Communicator (MPI on
// host memory here; the NCCL communicator on device memory through make_runtime), from --min-bytes
// to
// --max-bytes, fp16 and fp32, in the columns of nccl-tests:
//
//   size   bytes of the full vector (all-reduce: the buffer; reduce-scatter: the input, N x the output;
//          all-gather: the output, N x the input)            count: elements of that full vector
//   time   median over iterations of the MAX over ranks (microseconds), min and max beside it
//   algbw  size / time;  busbw = algbw x 2(n-1)/n for all-reduce, x (n-1)/n for reduce-scatter and all-gather
//          (the bytes each rank's link carries in a ring, nccl-tests' PERFORMANCE.md), so busbw compares with
//          the hardware bandwidth whatever n is
//   #wrong elements that differ from the exact result, summed over ranks and iterations
//
// Inputs derive from the rank and the index, v(r, i) = (r mod 4) + 1 + (i mod 13)/4, so every partial sum is
// exactly representable in fp16 for up to 64 ranks and each result is compared for exact equality. Every
// iteration's result is checked (outside the timed region). Sum is the operator (avg rounds 1/N for N not a
// power of two, which an exact check cannot allow).
//
//   mpiexec -n 2 build/benchmarks/bench_collectives --max-bytes 64M --json coll.json
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "bench_common.hpp"
#include "bench_stats.hpp"
#include "mptrain/dtype.hpp"

namespace {

using Clock = std::chrono::steady_clock;

enum class Op { all_reduce, reduce_scatter, all_gather };

const char* op_name(Op op) {
  return op == Op::all_reduce ? "all_reduce" : op == Op::reduce_scatter ? "reduce_scatter" : "all_gather";
}

/// nccl-tests' bus-bandwidth factor for n ranks.
double bus_factor(Op op, int n) {
  const double f = static_cast<double>(n - 1) / static_cast<double>(n);
  return op == Op::all_reduce ? 2.0 * f : f;
}

/// Rank r's input element i (exact in fp16 and in every partial sum of up to 64 ranks).
double input_value(int r, size_t i) {
  return static_cast<double>(r % 4 + 1) + 0.25 * static_cast<double>(i % 13);
}

/// Parses "1024", "64K", "256M", "1G" (binary units) into bytes.
size_t parse_bytes(const std::string& s) {
  MPT_INPUT_CHECK(!s.empty(), "empty size");
  size_t pos = 0;
  const unsigned long long v = std::stoull(s, &pos);
  size_t mult = 1;
  if (pos < s.size()) {
    const char u = static_cast<char>(std::toupper(static_cast<unsigned char>(s[pos])));
    mult = u == 'K' ? size_t{1} << 10 : u == 'M' ? size_t{1} << 20 : u == 'G' ? size_t{1} << 30 : 0;
    MPT_INPUT_CHECK(mult != 0 && pos + 1 == s.size(), "size '{}': expected a number with K, M or G", s);
  }
  return static_cast<size_t>(v) * mult;
}

template <typename T>
std::vector<T> make_input(int rank, size_t offset, size_t count) {
  std::vector<T> v(count);
  for (size_t i = 0; i < count; ++i)
    v[i] = mpt::from_float<T>(static_cast<float>(input_value(rank, offset + i)));
  return v;
}

struct Row {
  Op op;
  std::string type;
  size_t bytes, count;
  mpt::bench::Stats seconds;
  double algbw, busbw;
  int64_t wrong;
};

/// Runs one (op, dtype, size) point: warm-up + timed iterations, every result checked.
template <typename T>
Row run_point(Op op, size_t total_count, int warmup, int iters, mpt::Communicator& comm,
              mpt::Communicator& host_comm, mpt::Backend& backend) {
  const int n = comm.size(), r = comm.rank();
  const size_t part = total_count / static_cast<size_t>(n);  // per-rank count of RS output / AG input
  const size_t send_count = op == Op::all_gather ? part : total_count;
  const size_t recv_count = op == Op::reduce_scatter ? part : total_count;
  mpt::Buffer send = backend.allocate(send_count * sizeof(T));
  mpt::Buffer recv = backend.allocate(recv_count * sizeof(T));
  const std::vector<T> input = make_input<T>(r, op == Op::all_gather ? r * part : 0, send_count);
  backend.copy_from_host(send.data(), input.data(), send_count * sizeof(T));
  // The exact result this rank must receive.
  std::vector<T> expected(recv_count);
  for (size_t i = 0; i < recv_count; ++i) {
    double v = 0;
    if (op == Op::all_gather) {
      v = input_value(static_cast<int>(i / part), i);
    } else {
      const size_t global = op == Op::reduce_scatter ? r * part + i : i;
      for (int q = 0; q < n; ++q) v += input_value(q, global);
    }
    expected[i] = mpt::from_float<T>(static_cast<float>(v));
  }
  std::vector<T> result(recv_count);
  std::vector<double> times;
  int64_t wrong = 0;
  const mpt::DType dt = mpt::dtype_of<T>();
  for (int it = 0; it < warmup + iters; ++it) {
    backend.fill_zero(recv.data(), recv_count * sizeof(T));
    backend.synchronize();
    host_comm.barrier();
    const auto t0 = Clock::now();
    if (op == Op::all_reduce)
      comm.all_reduce(send.data(), recv.data(), total_count, dt, mpt::ReduceOp::sum);
    else if (op == Op::reduce_scatter)
      comm.reduce_scatter(send.data(), recv.data(), part, dt, mpt::ReduceOp::sum);
    else
      comm.all_gather(send.data(), recv.data(), part, dt);
    backend.synchronize();
    double t = std::chrono::duration<double>(Clock::now() - t0).count();
    host_comm.all_reduce(std::span<double>(&t, 1), mpt::ReduceOp::max);
    backend.copy_to_host(result.data(), recv.data(), recv_count * sizeof(T));
    for (size_t i = 0; i < recv_count; ++i)
      wrong += std::memcmp(&result[i], &expected[i], sizeof(T)) != 0 ? 1 : 0;
    if (it >= warmup) times.push_back(t);
  }
  host_comm.all_reduce(std::span<int64_t>(&wrong, 1), mpt::ReduceOp::sum);
  const mpt::bench::Stats s = mpt::bench::stats(times);
  const double bytes = static_cast<double>(total_count * sizeof(T));
  const double algbw = bytes / s.median;
  return {op,
          std::string(mpt::dtype_name(dt)),
          total_count * sizeof(T),
          total_count,
          s,
          algbw,
          algbw * bus_factor(op, n),
          wrong};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "All-reduce, reduce-scatter and all-gather through mptrain's Communicator: time, algbw, busbw, #wrong "
      "(nccl-tests columns; the table on stdout, the JSON with --json)"};
  std::string device = "cpu", min_bytes_s = "1K", max_bytes_s = "256M", json_path;
  std::vector<std::string> types = {"fp16", "fp32"};
  std::vector<std::string> ops = {"all_reduce", "reduce_scatter", "all_gather"};
  int step_factor = 2, warmup = 2, iters = 5;
  app.add_option("--device", device, "memory the buffers live in")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--min-bytes", min_bytes_s, "smallest message (bytes; K, M, G suffixes)")
      ->capture_default_str();
  app.add_option("--max-bytes", max_bytes_s, "largest message (bytes; K, M, G suffixes)")
      ->capture_default_str();
  app.add_option("--step-factor", step_factor, "size multiplier between points")
      ->check(CLI::Range(2, 16))
      ->capture_default_str();
  app.add_option("--types", types, "dtypes (fp16, fp32, bf16; comma separated)")
      ->delimiter(',')
      ->check(CLI::IsMember({"fp16", "fp32", "bf16"}))
      ->capture_default_str();
  app.add_option("--ops", ops, "collectives (comma separated)")
      ->delimiter(',')
      ->check(CLI::IsMember({"all_reduce", "reduce_scatter", "all_gather"}))
      ->capture_default_str();
  mpt::bench::add_timing_flags(app, warmup, iters, "iterations per point");
  return mpt::bench::run_main(
      argc, argv, app, "bench_collectives",
      [&](nlohmann::json& report) {
        const size_t min_bytes = parse_bytes(min_bytes_s), max_bytes = parse_bytes(max_bytes_s);
        MPT_INPUT_CHECK(min_bytes >= 1 && min_bytes <= max_bytes,
                        "--min-bytes {} must be in [1, --max-bytes {}]", min_bytes, max_bytes);
        mpt::MpiCommunicator host_comm;
        mpt::Runtime runtime = mpt::bench::make_bench_runtime(device);
        auto& backend = runtime.backend;
        auto& comm = runtime.grad_comm;
        const int n = comm->size();
        report["benchmark"] = "collectives";
        report["comm"] = comm->name();
        report["backend"] = backend->name();
        report["ranks"] = n;
        report["machine"] = mpt::bench::machine_json(n, 1);
        report["reduce_op"] = "sum";
        report["time"] = "median over iterations of the max over ranks; min and max beside it";
        report["busbw_factor"] = {
            {"all_reduce", "2(n-1)/n"}, {"reduce_scatter", "(n-1)/n"}, {"all_gather", "(n-1)/n"}};
        report["size_definition"] = "bytes of the full vector (reduce-scatter input, all-gather output)";
        report["iterations"] = iters;
        if (comm->rank() == 0) {
          std::printf(
              "# %s, %d ranks; busbw = algbw x 2(n-1)/n (all_reduce), x (n-1)/n (reduce_scatter, "
              "all_gather) = x %.3f, x %.3f\n",
              comm->name().c_str(), n, bus_factor(Op::all_reduce, n), bus_factor(Op::all_gather, n));
          std::printf("%-15s %12s %12s %6s %11s %11s %11s %9s %9s %7s\n", "op", "size(B)", "count", "type",
                      "time(us)", "min(us)", "max(us)", "algbw", "busbw", "#wrong");
          std::printf("%-15s %12s %12s %6s %11s %11s %11s %9s %9s %7s\n", "", "", "(elements)", "", "", "",
                      "", "(GB/s)", "(GB/s)", "");
        }
        int64_t total_wrong = 0;
        for (const std::string& op_s : ops) {
          const Op op = op_s == "all_reduce"       ? Op::all_reduce
                        : op_s == "reduce_scatter" ? Op::reduce_scatter
                                                   : Op::all_gather;
          for (const std::string& type : types) {
            const mpt::DType dt = type == "fp16"   ? mpt::DType::f16
                                  : type == "bf16" ? mpt::DType::bf16
                                                   : mpt::DType::f32;
            const size_t esize = mpt::dtype_size(dt);
            for (size_t bytes = min_bytes; bytes <= max_bytes; bytes *= static_cast<size_t>(step_factor)) {
              // The full vector must split evenly over the ranks: round the count down to a multiple of n.
              const size_t count = bytes / esize / static_cast<size_t>(n) * static_cast<size_t>(n);
              if (count == 0) continue;
              const Row row = mpt::dispatch_float_dtype(dt, [&]<typename T>() {
                return run_point<T>(op, count, warmup, iters, *comm, host_comm, *backend);
              });
              total_wrong += row.wrong;
              if (comm->rank() != 0) continue;
              std::printf("%-15s %12zu %12zu %6s %11.1f %11.1f %11.1f %9.3f %9.3f %7lld\n", op_name(op),
                          row.bytes, row.count, row.type.c_str(), 1e6 * row.seconds.median,
                          1e6 * row.seconds.min, 1e6 * row.seconds.max, row.algbw / 1e9, row.busbw / 1e9,
                          static_cast<long long>(row.wrong));
              std::fflush(stdout);
              report["results"].push_back(
                  {{"op", op_name(op)},
                   {"size_bytes", row.bytes},
                   {"count", row.count},
                   {"type", row.type},
                   {"time_seconds",
                    {{"median", row.seconds.median}, {"min", row.seconds.min}, {"max", row.seconds.max}}},
                   {"algbw_gb_per_s", row.algbw / 1e9},
                   {"busbw_gb_per_s", row.busbw / 1e9},
                   {"wrong", row.wrong}});
            }
          }
        }
        report["total_wrong"] = total_wrong;
        if (comm->rank() == 0) {
          std::printf("# total #wrong: %lld\n", static_cast<long long>(total_wrong));
        }
        return total_wrong == 0 ? 0 : 3;
      },
      mpt::bench::ReportOnStdout::no);
}
