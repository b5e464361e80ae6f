// Communicator: the collectives mptrain's step needs, on typed buffers, independent of the transport.
//
// Implemented by MpiCommunicator (host memory, Open MPI) and, for device memory, by the NCCL communicator.
// Semantics follow NCCL so the trainer is written once:
//  - counts are ELEMENTS of `dtype`, never bytes;
//  - sum of fp16/bf16 rounds to the storage type once per combine (compute in FP32, round), as NCCL does;
//  - avg multiplies every contribution by the storage type's 1/N before summing (NCCL's PreMulSum), so it is
//    exact only for N a power of two, and four ranks holding 20000 in fp16 average to 20000 (no overflow);
//  - reduce-scatter: rank r receives element range [r*recv_count, (r+1)*recv_count) of the reduced vector;
//    in-place when recv == send + r*recv_count (bytes of dtype), as with ncclReduceScatter;
//  - max over floating-point dtypes returns NaN wherever any rank holds NaN (whichever rank it is);
//  - all-gather: rank r's send_count elements land at recv + r*send_count; in-place when
//    send == recv + r*send_count.
// Every call is collective: all ranks must call it in the same order with the same counts and dtype.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>

#include "mptrain/dtype.hpp"

namespace mpt {

/// Reduction operator of all-reduce and reduce-scatter.
enum class ReduceOp : uint8_t { sum, avg, max };

/// Name of an operator ("sum", "avg", "max").
std::string_view reduce_op_name(ReduceOp op);

/// Handle of a non-blocking collective. The buffers passed to the call must stay alive and untouched until
/// wait() returns. Destroying an unfinished request waits for it (and logs, never throws, on failure).
class CommRequest {
 public:
  virtual ~CommRequest() = default;
  /// Blocks until the collective completed; throws mpt::LibraryError on failure.
  virtual void wait() = 0;
  /// True when completed (then wait() returns at once). Drives progress of the collective.
  virtual bool test() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  /// This process's rank in [0, size()).
  virtual int rank() const = 0;
  /// Number of ranks N.
  virtual int size() const = 0;
  /// Human-readable transport name ("mpi", "nccl").
  virtual std::string name() const = 0;

  /// recv[i] = op over ranks of send[i], i < count. In-place when send == recv. avg only for
  /// f32/f16/bf16/f64. Throws mpt::Error for an unsupported dtype/op pair, mpt::LibraryError when the
  /// transport fails.
  virtual void all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) = 0;
  /// Rank r receives reduced elements [r*recv_count, (r+1)*recv_count) of the N*recv_count-element `send`.
  virtual void reduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype, ReduceOp op) = 0;
  /// recv (N*send_count elements) = concatenation of every rank's `send` in rank order.
  virtual void all_gather(const void* send, void* recv, size_t send_count, DType dtype) = 0;
  /// Copies root's `buf` (count elements) to every rank.
  virtual void broadcast(void* buf, size_t count, DType dtype, int root) = 0;
  /// Returns when every rank has entered it.
  virtual void barrier() = 0;

  /// Collective watchdog (the --collective-timeout flag): a collective that has not completed `seconds` after
  /// it was issued ends the job: one line on stderr naming this rank and the collective, then MPI_Abort
  /// (NCCL: ncclCommAbort first), so a frozen or dead rank never hangs the others. 0 disables the watchdog.
  virtual void set_timeout_seconds(double seconds) = 0;

  /// Non-blocking all_reduce; same rules, completes at wait().
  virtual std::unique_ptr<CommRequest> iall_reduce(const void* send, void* recv, size_t count, DType dtype,
                                                   ReduceOp op) = 0;
  /// Non-blocking reduce_scatter; same rules, completes at wait().
  virtual std::unique_ptr<CommRequest> ireduce_scatter(const void* send, void* recv, size_t recv_count,
                                                       DType dtype, ReduceOp op) = 0;
  /// Non-blocking all_gather; same rules, completes at wait().
  virtual std::unique_ptr<CommRequest> iall_gather(const void* send, void* recv, size_t send_count,
                                                   DType dtype) = 0;

  // ---- typed conveniences (counts from the spans) ----

  /// In-place all-reduce of `buf`.
  template <typename T>
  void all_reduce(std::span<T> buf, ReduceOp op) {
    all_reduce(buf.data(), buf.data(), buf.size(), dtype_of<T>(), op);
  }
  /// all_gather of `send` into `recv`; recv.size() must be size() * send.size().
  template <typename T>
  void all_gather(std::span<const T> send, std::span<T> recv) {
    MPT_CHECK(recv.size() == send.size() * static_cast<size_t>(size()),
              "all_gather: recv has {} elements, expected {} x {}", recv.size(), size(), send.size());
    all_gather(send.data(), recv.data(), send.size(), dtype_of<T>());
  }
  /// Broadcast of `buf` from `root`.
  template <typename T>
  void broadcast(std::span<T> buf, int root) {
    broadcast(buf.data(), buf.size(), dtype_of<T>(), root);
  }
};

}  // namespace mpt
