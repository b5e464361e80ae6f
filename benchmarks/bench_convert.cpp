// Throughput of the bulk float <-> half / bf16 converters (src/convert.cpp) at every SIMD level this CPU
// runs.
//
// Single-threaded on purpose: the converters themselves are single-threaded, and one core is what a data
// loader or checkpoint writer thread gets. Each case converts 1M elements (4 MiB of float plus 2 MiB of
// 16-bit data, so mostly last-level-cache resident on a server CPU). bytes_per_second counts bytes read plus
// bytes written, i.e. 6 bytes per element in either direction.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>

#include <fmt/format.h>
#include <vector>

#include <benchmark/benchmark.h>

#include "mptrain/dtype.hpp"

namespace {

constexpr size_t kNumElements = size_t{1} << 20;
constexpr int64_t kBytesPerElement = sizeof(float) + sizeof(uint16_t);

/// Training-like values: mostly normal magnitudes around 1 with a spread of exponents, no NaN or inf, so the
/// scalar path is timed on its common branches.
std::vector<float> sample_floats() {
  std::mt19937 rng(7);
  std::normal_distribution<float> value(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-12, 8);
  std::vector<float> x(kNumElements);
  for (float& v : x) v = std::ldexp(value(rng), exponent(rng));
  return x;
}

template <typename From, typename To>
void run_convert(benchmark::State& state, mpt::SimdLevel level, const std::vector<From>& src) {
  std::vector<To> dst(src.size());
  for (auto _ : state) {
    mpt::convert(src.data(), dst.data(), src.size(), level);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(src.size()) * kBytesPerElement);
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(src.size()));
}

template <typename Storage>
std::vector<Storage> narrowed(const std::vector<float>& x) {
  std::vector<Storage> out(x.size());
  mpt::convert(x.data(), out.data(), x.size(), mpt::SimdLevel::scalar);
  return out;
}

// Registered at start-up for the supported levels only, so an unsupported level is absent rather than an
// error row.
[[maybe_unused]] const bool kRegistered = [] {
  static const std::vector<float> floats = sample_floats();
  static const std::vector<mpt::half> halves = narrowed<mpt::half>(floats);
  static const std::vector<mpt::bf16> bf16s = narrowed<mpt::bf16>(floats);
  for (mpt::SimdLevel level : {mpt::SimdLevel::scalar, mpt::SimdLevel::avx2, mpt::SimdLevel::avx512}) {
    if (level > mpt::detected_simd_level()) continue;
    const std::string suffix = fmt::format("/{}", mpt::simd_level_name(level));
    benchmark::RegisterBenchmark(("convert/f32_to_f16" + suffix).c_str(), [level](benchmark::State& state) {
      run_convert<float, mpt::half>(state, level, floats);
    });
    benchmark::RegisterBenchmark(("convert/f16_to_f32" + suffix).c_str(), [level](benchmark::State& state) {
      run_convert<mpt::half, float>(state, level, halves);
    });
    benchmark::RegisterBenchmark(("convert/f32_to_bf16" + suffix).c_str(), [level](benchmark::State& state) {
      run_convert<float, mpt::bf16>(state, level, floats);
    });
    benchmark::RegisterBenchmark(("convert/bf16_to_f32" + suffix).c_str(), [level](benchmark::State& state) {
      run_convert<mpt::bf16, float>(state, level, bf16s);
    });
  }
  return true;
}();

}  // namespace
