// MpiCommunicator: the Communicator on host memory through MPI (Open MPI), and MpiSession, the RAII owner of
// MPI_Init/MPI_Finalize.
//
// fp16/bf16 reductions use custom commutative MPI_Ops that compute each combine in FP32 and round to the
// storage type once (NCCL's half add). avg pre-multiplies by the storage type's 1/N (NCCL's PreMulSum).
// MPI counts are int: a call with more than INT_MAX elements throws mpt::Error rather than truncating.
// The collective watchdog (set_timeout_seconds, or the constructor's timeout, which also guards the first
// collective) turns a frozen, dead or unreachable peer into MPI_Abort instead of a hang.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <vector>

#include "mptrain/comm.hpp"

namespace mpt {

/// Initialises MPI (MPI_THREAD_FUNNELED) on construction unless already initialised, finalises on destruction
/// if it initialised. One per process, created first in main().
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

 private:
  bool owns_ = false;
};

class MpiCommunicator final : public Communicator {
 public:
  /// Duplicates `comm` (so mptrain's traffic never mixes with the caller's) and sets MPI_ERRORS_RETURN on the
  /// duplicate so failures become mpt::LibraryError. Collective over `comm`. `timeout_seconds` > 0 arms the
  /// watchdog (set_timeout_seconds) already for the duplication, as MPI_Comm_idup polled under the deadline:
  /// for a new job that is the first collective, where Open MPI opens its TCP connections between the ranks
  /// and where it hangs when it picks an interface that does not connect them (a docker0 with the same
  /// address on every host). Its line says so and names the interface flag; then, after a second that lets
  /// every rank stuck there print its own line, MPI_Abort. Throws mpt::Error for a negative or non-finite
  /// timeout.
  explicit MpiCommunicator(MPI_Comm comm = MPI_COMM_WORLD, double timeout_seconds = 0);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "mpi"; }
  /// The duplicated MPI communicator (for MPI-only helpers such as tests).
  MPI_Comm handle() const { return comm_; }

  // The typed span overloads of the base stay visible next to the overrides.
  using Communicator::all_gather;
  using Communicator::all_reduce;
  using Communicator::broadcast;

  void all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) override;
  void reduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype, ReduceOp op) override;
  void all_gather(const void* send, void* recv, size_t send_count, DType dtype) override;
  void broadcast(void* buf, size_t count, DType dtype, int root) override;
  void barrier() override;
  /// The watchdog: with `seconds` > 0 every collective (blocking ones and CommRequest::wait/test alike) that
  /// has not completed `seconds` after it was issued prints one stderr line (rank, host, collective, element
  /// count and dtype, timeout) and calls MPI_Abort(…, 1); the blocking collectives then run as their
  /// non-blocking twins polled with MPI_Test. 0 (the default) = off: plain blocking MPI calls. Applies to
  /// collectives issued after the call. Throws mpt::Error for a negative or non-finite value.
  void set_timeout_seconds(double seconds) override;
  /// The watchdog timeout in seconds (0 = off).
  double timeout_seconds() const { return timeout_seconds_; }

  std::unique_ptr<CommRequest> iall_reduce(const void* send, void* recv, size_t count, DType dtype,
                                           ReduceOp op) override;
  std::unique_ptr<CommRequest> ireduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype,
                                               ReduceOp op) override;
  std::unique_ptr<CommRequest> iall_gather(const void* send, void* recv, size_t send_count,
                                           DType dtype) override;

 private:
  /// Waits for `request` (a collective `name` of `count` `dtype` elements issued at `issued`) under the
  /// watchdog.
  void complete(MPI_Request* request, const char* name, size_t count, DType dtype,
                std::chrono::steady_clock::time_point issued) const;

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  double timeout_seconds_ = 0;  // collective watchdog; 0 = off
};

}  // namespace mpt
