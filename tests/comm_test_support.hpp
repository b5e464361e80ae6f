// What the communicator tests share (test_comm_mpi.cpp on host memory, test_comm_nccl.cpp on device memory):
// rank-derived inputs whose collective results are known exactly, and the dtype epsilon for the bounds where
// the per-combine rounding of fp16/bf16 makes a result depend on the order of the combines. Also the base of
// the engine tests' observing communicators (ForwardingCommunicator).
#pragma once

#include <cmath>
#include <cstddef>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/comm.hpp"
#include "mptrain/dtype.hpp"

namespace mpt::test {

/// `n` initial weights for the engine tests: N(0, 0.02) from a fixed seed (std::mt19937 1234), the same on
/// every rank, so each rank's set_parameters agrees.
inline std::vector<float> initial_values(size_t n) {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

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

/// A Communicator that forwards every call to `inner`: tests derive from it and override only the calls they
/// observe (for example the non-blocking gradient collectives the engine issues per bucket).
class ForwardingCommunicator : public Communicator {
 public:
  explicit ForwardingCommunicator(Communicator& inner) : inner_(inner) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  std::string name() const override { return inner_.name(); }
  using Communicator::all_gather;
  using Communicator::all_reduce;
  using Communicator::broadcast;
  void all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) override {
    inner_.all_reduce(send, recv, count, dtype, op);
  }
  void reduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype, ReduceOp op) override {
    inner_.reduce_scatter(send, recv, recv_count, dtype, op);
  }
  void all_gather(const void* send, void* recv, size_t send_count, DType dtype) override {
    inner_.all_gather(send, recv, send_count, dtype);
  }
  void broadcast(void* buf, size_t count, DType dtype, int root) override {
    inner_.broadcast(buf, count, dtype, root);
  }
  void barrier() override { inner_.barrier(); }
  void set_timeout_seconds(double seconds) override { inner_.set_timeout_seconds(seconds); }
  std::unique_ptr<CommRequest> iall_reduce(const void* send, void* recv, size_t count, DType dtype,
                                           ReduceOp op) override {
    return inner_.iall_reduce(send, recv, count, dtype, op);
  }
  std::unique_ptr<CommRequest> ireduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype,
                                               ReduceOp op) override {
    return inner_.ireduce_scatter(send, recv, recv_count, dtype, op);
  }
  std::unique_ptr<CommRequest> iall_gather(const void* send, void* recv, size_t send_count,
                                           DType dtype) override {
    return inner_.iall_gather(send, recv, send_count, dtype);
  }

 private:
  Communicator& inner_;
};

}  // namespace mpt::test
