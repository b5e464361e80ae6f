// What the communicator tests share (test_comm_mpi.cpp on host memory, test_comm_nccl.cpp on device memory):
// rank-derived inputs whose collective results are known exactly, and the dtype epsilon for the bounds where
// the per-combine rounding of fp16/bf16 makes a result depend on the order of the combines.
#pragma once

#include <cmath>
#include <cstddef>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/dtype.hpp"

namespace mpt::test {

/// The storage types every collective is checked in.
using FloatTypes = ::testing::Types<float, half, bf16>;

/// v[i] = value_of_index(i) rounded to T, i < n.
template <typename T>
std::vector<T> make(size_t n, auto&& value_of_index) {
  std::vector<T> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = from_float<T>(static_cast<float>(value_of_index(i)));
  return v;
}

/// Small integers in [-8, 8]: rank r holds (r + 1) * k_of(i), so sums over <= 4 ranks (<= 80 in magnitude)
/// are exact in every dtype.
inline int k_of(size_t i) {
  return static_cast<int>(i % 17) - 8;
}

/// Machine epsilon of T (2^-10 for fp16, 2^-7 for bf16, 2^-23 for fp32).
template <typename T>
double epsilon_of() {
  if constexpr (std::is_same_v<T, half>)
    return std::ldexp(1.0, -10);
  else if constexpr (std::is_same_v<T, bf16>)
    return std::ldexp(1.0, -7);
  else
    return std::ldexp(1.0, -23);
}

}  // namespace mpt::test
