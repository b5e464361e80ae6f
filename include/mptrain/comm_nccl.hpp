// NcclCommunicator: the Communicator on device memory through NCCL (the rank's GPU is chosen by
// select_local_device in mptrain/runtime.hpp). Only built with MPTRAIN_WITH_CUDA.
//
// Stream model (docs/DESIGN.md, "The two interfaces"): the communicator owns one communication stream
// (non-blocking, highest priority). Every collective records an event on the caller's compute stream, makes
// the communication stream wait on it, enqueues the NCCL operation there and records a completion event.
// Nothing blocks the host:
//  - the blocking calls (all_reduce, reduce_scatter, all_gather, broadcast) make the compute stream wait on
//    the completion event and return at once: the result is ready for any later work on the compute stream
//    (and for Backend::copy_to_host, which synchronises the compute stream);
//  - the i* calls return a CommRequest whose wait() makes the compute stream wait on the completion event
//    (it does not block the host) and whose test() asks whether the collective has finished on the device;
//  - barrier() is the one host-visible call: it returns when every rank has entered it.
// So each bucket's reduce-scatter starts as soon as the compute stream reaches the point where it was issued,
// and overlaps the compute work issued after it.
//
// The communicator is non-blocking in NCCL's sense (ncclConfig_t::blocking = 0): NCCL calls may return
// ncclInProgress, and the communicator polls ncclCommGetAsyncError until the operation is enqueued.
//
// Watchdog (set_timeout_seconds): a thread tracks every enqueued collective. When one has not completed
// `seconds` after it was issued, or NCCL reports an asynchronous error, it prints one line to stderr
// ("mptrain: rank 3 (host): NCCL all_reduce of 2 f32 did not complete within 30 s; aborting"), calls
// ncclCommAbort (given at most 5 s) and MPI_Abort(MPI_COMM_WORLD, 1), so a dead or frozen rank never hangs
// the others.
#pragma once

#include <cuda_runtime_api.h>
#include <mpi.h>

#include <memory>
#include <string>

#include "mptrain/comm.hpp"

namespace mpt {

class NcclCommunicator final : public Communicator {
 public:
  /// Creates the NCCL communicator over the ranks of `comm` on the current CUDA device (cudaSetDevice
  /// first; every rank a different device): ncclGetUniqueId on rank 0, MPI_Bcast of the id, then
  /// ncclCommInitRankConfig (non-blocking). `compute_stream` is the stream the caller's work runs on
  /// (Backend::native_stream()); it must outlive the communicator. `timeout_seconds` > 0 arms the watchdog
  /// already for the initialisation (0: none; see set_timeout_seconds). Collective over `comm`. Throws
  /// mpt::LibraryError when MPI, CUDA or NCCL fails.
  NcclCommunicator(MPI_Comm comm, cudaStream_t compute_stream, double timeout_seconds = 0);
  /// Stops the watchdog, then ncclCommFinalize (waits for every issued collective) and ncclCommDestroy;
  /// logs failures to stderr, never throws.
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return "nccl"; }
  /// The CUDA device the communicator was created on.
  int device() const { return device_; }
  /// The communication stream the collectives run on (for timing them with events, as the overlap test and
  /// the benchmarks do). Valid for the communicator's lifetime.
  cudaStream_t comm_stream() const;

  using Communicator::all_gather;
  using Communicator::all_reduce;
  using Communicator::broadcast;

  // The collectives follow comm.hpp (counts in elements; NCCL's own semantics for fp16/bf16 sum and avg).
  // Buffers are device memory of this communicator's device. Ordered after the work already on the compute
  // stream; the compute stream waits for the result (see the file comment). max over f32/f16/bf16/f64
  // returns NaN wherever any rank holds NaN (computed as an unsigned max over order-preserving keys, since
  // NCCL's own float max drops NaN). Reductions of u8 are rejected (as MpiCommunicator does); avg needs a
  // floating-point dtype. Throws mpt::Error for bad arguments (unsupported dtype/op, null buffer, element
  // counts whose byte size overflows size_t), mpt::LibraryError when CUDA or NCCL fails.

  void all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) override;
  void reduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype, ReduceOp op) override;
  void all_gather(const void* send, void* recv, size_t send_count, DType dtype) override;
  void broadcast(void* buf, size_t count, DType dtype, int root) override;
  /// Host-visible: a one-element all-reduce after the compute stream's work, then waits for it on the host.
  void barrier() override;
  /// Arms (seconds > 0) or disables (0) the watchdog for collectives issued from now on. Throws mpt::Error
  /// for a negative or non-finite value.
  void set_timeout_seconds(double seconds) override;

  /// As all_reduce; wait() orders the compute stream after the result (no host block), test() queries it.
  std::unique_ptr<CommRequest> iall_reduce(const void* send, void* recv, size_t count, DType dtype,
                                           ReduceOp op) override;
  std::unique_ptr<CommRequest> ireduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype,
                                               ReduceOp op) override;
  std::unique_ptr<CommRequest> iall_gather(const void* send, void* recv, size_t send_count,
                                           DType dtype) override;

  /// Opaque state (NCCL handle, streams, events, watchdog thread); defined in src/comm_nccl.cpp.
  struct State;

 private:
  std::unique_ptr<State> state_;
  int rank_ = 0;
  int size_ = 1;
  int device_ = 0;
};

}  // namespace mpt
