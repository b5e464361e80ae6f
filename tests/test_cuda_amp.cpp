// CUDA mixed-precision kernels (kernels/cuda/amp.cu, adamw.cu) against the CPU backend on the same inputs,
// with odd sizes. Every test skips with "no CUDA device" where there is none (CI, the build machines).
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_ops.hpp"

namespace mpt {
namespace {

#define MPT_REQUIRE_GPU() \
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

template <typename T>
struct DeviceArray {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceArray(const std::vector<T>& host) : n(host.size()) {
    MPT_CUDA_CHECK(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)));
    MPT_CUDA_CHECK(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceArray() { cudaFree(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  std::vector<T> to_host() const {
    std::vector<T> h(n);
    MPT_CUDA_CHECK(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

template <typename T>
class CudaAmp : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, half, bf16>;
TYPED_TEST_SUITE(CudaAmp, FloatTypes);

TYPED_TEST(CudaAmp, GradCheckMatchesCpu) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  auto cpu = make_cpu_backend();
  const size_t block = 37, n = block * 53 + 11;  // odd sizes; the last 11 elements are outside every range
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 100.0f);
  std::vector<T> g(n);
  for (T& x : g) x = from_float<T>(normal(rng));
  const std::vector<ElementRange> ranges = {{block * 3, block * 20}, {block * 30, block * 17}};
  std::vector<size_t> starts;
  for (const auto& r : ranges)
    for (size_t b = 0; b < r.num_elements; b += block) starts.push_back(r.offset + b);
  for (bool poison : {false, true}) {
    if (poison) g[block * 31 + 5] = from_float<T>(INFINITY);
    std::vector<double> expected(starts.size());
    const bool cpu_inf = cpu->grad_check(g.data(), dtype_of<T>(), ranges, block, expected);
    DeviceArray<T> d_g(g);
    DeviceArray<size_t> d_starts(starts);
    DeviceArray<double> d_sums(std::vector<double>(starts.size(), -1.0));
    DeviceArray<float> d_found(std::vector<float>{7.0f});  // the launcher must clear stale values
    cuda::grad_check(d_sums.ptr, d_found.ptr, d_g.ptr, d_starts.ptr, starts.size(), block, nullptr);
    MPT_CUDA_CHECK(cudaDeviceSynchronize());
    EXPECT_EQ(d_found.to_host()[0] != 0.0f, cpu_inf);
    EXPECT_EQ(cpu_inf, poison);
    if (!poison) {
      const auto sums = d_sums.to_host();
      for (size_t k = 0; k < sums.size(); ++k)
        ASSERT_NEAR(sums[k], expected[k], 1e-12 * expected[k]) << "block " << k;
    }
  }
}

TYPED_TEST(CudaAmp, AdamWAndCastMatchCpuAndSkipOnOverflow) {
  MPT_REQUIRE_GPU();
  using T = TypeParam;
  auto cpu = make_cpu_backend();
  const size_t shard = 1001, flat = 2003;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> p(shard), m(shard), v(shard);
  for (size_t i = 0; i < shard; ++i) {
    p[i] = normal(rng);
    m[i] = 0.01f * normal(rng);
    v[i] = 1e-4f * std::abs(normal(rng));
  }
  std::vector<T> g(flat), params(flat);
  for (T& x : g) x = from_float<T>(1000.0f * normal(rng));
  const std::vector<AdamWSegment> segments = {
      {0, 5, 400, true}, {400, 1200, 1, false}, {401, 1500, 500, true}};
  const float scale = 1024.0f, clip = 0.5f;
  const auto step = common::make_adamw_step(3e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 7, clip / scale);
  for (float found : {0.0f, 1.0f}) {
    DeviceArray<float> dp(p), dm(m), dv(v), d_found(std::vector<float>{found}),
        d_scale(std::vector<float>{scale}), d_clip(std::vector<float>{clip});
    DeviceArray<T> dg(g), dparams(params);
    DeviceArray<AdamWSegment> dseg(segments);
    cuda::adamw(dp.ptr, dm.ptr, dv.ptr, dg.ptr, dseg.ptr, segments.size(), 500, step, d_found.ptr,
                d_scale.ptr, d_clip.ptr, nullptr);
    cuda::cast_master(dparams.ptr, dp.ptr, dseg.ptr, segments.size(), 500, d_found.ptr, nullptr);
    MPT_CUDA_CHECK(cudaDeviceSynchronize());
    auto hp = p, hm = m, hv = v;
    auto hparams = params;
    if (found == 0.0f) {
      cpu->adamw(hp.data(), hm.data(), hv.data(), g.data(), dtype_of<T>(), segments, step);
      for (const auto& s : segments)
        for (size_t i = 0; i < s.num_elements; ++i)
          hparams[s.flat_offset + i] = from_float<T>(hp[s.shard_offset + i]);
    }
    const auto gp = dp.to_host(), gm = dm.to_host(), gv = dv.to_host();
    const auto gparams = dparams.to_host();
    for (size_t i = 0; i < shard; ++i) {
      ASSERT_NEAR(gp[i], hp[i], 1e-6f * (1.0f + std::abs(hp[i]))) << "master " << i << " found " << found;
      ASSERT_NEAR(gm[i], hm[i], 1e-6f * (1.0f + std::abs(hm[i]))) << "m " << i;
      ASSERT_NEAR(gv[i], hv[i], 1e-6f * (1.0f + std::abs(hv[i]))) << "v " << i;
    }
    for (size_t i = 0; i < flat; ++i)
      ASSERT_NEAR(to_float(gparams[i]), to_float(hparams[i]),
                  1e-2f * (1e-3f + std::abs(to_float(hparams[i]))))
          << "params " << i;
  }
}

}  // namespace
}  // namespace mpt
