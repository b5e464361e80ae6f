// What the CUDA tests share: the skip where the process sees no CUDA device (CI and the build machines), and
// a device copy of a host vector.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_ops.hpp"

/// Skips the current test with "no CUDA device" when this process sees none.
#define MPT_REQUIRE_GPU() \
  if (::mpt::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device"

namespace mpt::test {

/// Device copy of a host vector, placed `offset` elements past a cudaMalloc'd (256-byte aligned) base, so
/// offset 1 gives pointers aligned to one element only. Synchronous copies (default stream).
template <typename T>
struct DeviceArray {
  void* base = nullptr;
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceArray(const std::vector<T>& host, size_t offset = 0) : n(host.size()) {
    MPT_CUDA_CHECK(cudaMalloc(&base, (n + offset + 1) * sizeof(T)));
    ptr = static_cast<T*>(base) + offset;
    MPT_CUDA_CHECK(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceArray() { cudaFree(base); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  /// The n elements back on the host.
  std::vector<T> to_host() const {
    std::vector<T> h(n);
    MPT_CUDA_CHECK(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

}  // namespace mpt::test
