// NCCL implementation of the Communicator (device buffers) with its watchdog, and the GPU choice of a rank.
//
// Every collective goes through State::enqueue: compute stream -> event -> communication stream -> NCCL ->
// completion event, with the collective registered for the watchdog thread before it is issued. The
// communicator is non-blocking (ncclConfig_t::blocking = 0), so each NCCL call is "settled": while it reports
// ncclInProgress, ncclCommGetAsyncError is polled until the operation is enqueued or has failed.
#include "mptrain/comm_nccl.hpp"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_max_keys.hpp"
#include "mptrain/cuda_raii.hpp"
#include "mptrain/error.hpp"

namespace mpt {

namespace {

using Clock = std::chrono::steady_clock;

/// NCCL's text for `rc` plus ncclGetLastError's detail, when there is one.
std::string nccl_text(ncclResult_t rc) {
  std::string text = ncclGetErrorString(rc);
  const char* last = ncclGetLastError(nullptr);
  if (last && *last) text += MPT_FORMAT(" ({})", last);
  return text;
}

}  // namespace

}  // namespace mpt

/// Evaluates an NCCL call once; anything but ncclSuccess throws mpt::LibraryError naming rank, host,
/// file:line, the call, ncclGetErrorString and ncclGetLastError. For calls on the non-blocking communicator,
/// which may return ncclInProgress, use MPT_NCCL_SETTLE instead.
#define MPT_NCCL_CHECK(call)                                                                                 \
  do {                                                                                                       \
    const ncclResult_t mpt_nccl_rc_ = (call);                                                                \
    if (mpt_nccl_rc_ != ncclSuccess)                                                                         \
      throw ::mpt::LibraryError(                                                                             \
          ::mpt::detail::library_error_message("NCCL", __FILE__, __LINE__, #call, nccl_text(mpt_nccl_rc_))); \
  } while (0)

/// An NCCL call on the non-blocking communicator of `state`: evaluated once, then settled (see the file
/// comment); throws like MPT_NCCL_CHECK.
#define MPT_NCCL_SETTLE(state, call) (state).settle((call), #call, __FILE__, __LINE__)

namespace mpt {

namespace {

// ---- RAII owners ------------------------------------------------------------------------------------------

using cuda::DeviceMemory;
using cuda::Event;
using cuda::log_cuda_failure;
using cuda::Stream;

/// Stream-ordered scratch (cudaMallocAsync on `stream`), freed in order on the same stream: the free waits
/// for the work enqueued before it, and no host sync is needed.
class StreamScratch {
 public:
  StreamScratch(size_t num_bytes, cudaStream_t stream) : stream_(stream) {
    MPT_CUDA_CHECK(cudaMallocAsync(&data_, num_bytes, stream_));
  }
  ~StreamScratch() {
    if (const cudaError_t rc = cudaFreeAsync(data_, stream_); rc != cudaSuccess)
      log_cuda_failure("cudaFreeAsync", rc);
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  std::byte* get() const { return static_cast<std::byte*>(data_); }

 private:
  void* data_ = nullptr;
  cudaStream_t stream_;
};

// ---- dtype and op mapping ---------------------------------------------------------------------------------

bool is_float(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::f16 || t == DType::bf16;
}

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::f32:
      return ncclFloat32;
    case DType::f16:
      return ncclFloat16;
    case DType::bf16:
      return ncclBfloat16;
    case DType::f64:
      return ncclFloat64;
    case DType::i32:
      return ncclInt32;
    case DType::i64:
      return ncclInt64;
    case DType::u8:
      return ncclUint8;
  }
  throw Error("unknown dtype");
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
      return ncclSum;
    case ReduceOp::avg:
      return ncclAvg;  // NCCL's PreMulSum for floating-point types: x * T(1/N), then sum
    case ReduceOp::max:
      return ncclMax;
  }
  throw Error("unknown reduce op");
}

/// The same dtype/op rules as MpiCommunicator, so the trainer sees one contract.
void check_reduction(const char* what, DType t, ReduceOp op) {
  MPT_CHECK(op != ReduceOp::avg || is_float(t), "{}: reduce op avg needs a floating-point dtype, got {}",
            what, dtype_name(t));
  MPT_CHECK(t != DType::u8, "{}: reductions of dtype u8 are not supported", what);
}

/// Checks that `count` elements of `t` (and of the max keys, which are up to 8 bytes) fit size_t bytes.
void check_count(const char* what, size_t count, DType t) {
  const size_t widest = std::max<size_t>(dtype_size(t), 8);
  MPT_CHECK(count <= SIZE_MAX / widest, "{}: {} elements of {} overflow a byte count", what, count,
            dtype_name(t));
}

/// "all_reduce of 2 f32": the collective as the watchdog names it.
std::string describe(const char* what, size_t count, DType t) {
  return MPT_FORMAT("{} of {} {}", what, count, dtype_name(t));
}

ncclDataType_t key_type(DType t) {
  return cuda::max_key_size(t) == 8 ? ncclUint64 : ncclUint32;
}

class NcclRequest final : public CommRequest {
 public:
  NcclRequest(std::shared_ptr<Event> done, cudaStream_t compute)
      : done_(std::move(done)), compute_(compute) {}
  ~NcclRequest() override {
    if (waited_) return;
    if (const cudaError_t rc = cudaStreamWaitEvent(compute_, done_->get(), 0); rc != cudaSuccess)
      log_cuda_failure("cudaStreamWaitEvent of an unfinished collective in its destructor", rc);
  }
  void wait() override {
    if (waited_) return;
    MPT_CUDA_CHECK(cudaStreamWaitEvent(compute_, done_->get(), 0));
    waited_ = true;
  }
  bool test() override {
    return cuda::query_completed(cudaEventQuery(done_->get()), "cudaEventQuery(collective done)");
  }

 private:
  std::shared_ptr<Event> done_;
  cudaStream_t compute_;
  bool waited_ = false;
};

}  // namespace

// ---- State: NCCL handle, streams, watchdog ----------------------------------------------------------------

struct NcclCommunicator::State {
  /// One enqueued collective, as the watchdog tracks it.
  struct Pending {
    uint64_t id = 0;
    std::string what;             // "all_reduce of 2 f32"
    std::shared_ptr<Event> done;  // recorded on the comm stream after the collective
    bool recorded = false;        // false while the collective is being enqueued
    Clock::time_point issued;
    double timeout_seconds = 0;  // 0: no deadline
  };

  MPI_Comm mpi = MPI_COMM_NULL;
  ncclComm_t comm = nullptr;
  bool comm_ready = false;  // initialisation finished successfully
  cudaStream_t compute = nullptr;
  int device = 0;
  std::string prefix;  // "mptrain: rank 3 (host)"
  Stream comm_stream;
  std::unique_ptr<Event> ready;  // recorded on the compute stream before each collective
  DeviceMemory barrier_word;

  std::mutex mutex;
  std::condition_variable wake;
  std::deque<Pending> pending;  // in issue order: they complete in that order on the one comm stream
  uint64_t next_id = 0;
  double timeout_seconds = 0;
  bool stopping = false;
  std::atomic<bool> fatal_started{false};
  std::thread watchdog;

  ~State();

  double current_timeout() {
    std::lock_guard lock(mutex);
    return timeout_seconds;
  }

  /// Waits out ncclInProgress of the call that returned `rc`; throws LibraryError on failure. During the
  /// initialisation the deadline is checked here; afterwards the watchdog tracks every collective.
  void settle(ncclResult_t rc, const char* call, const char* file, int line) {
    const auto start = Clock::now();
    const double deadline = comm_ready ? 0.0 : current_timeout();
    while (rc == ncclInProgress) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t q = ncclCommGetAsyncError(comm, &state);
      rc = q != ncclSuccess ? q : state;
      if (rc != ncclInProgress) break;
      if (deadline > 0 && std::chrono::duration<double>(Clock::now() - start).count() > deadline)
        fatal(MPT_FORMAT("NCCL {} was not enqueued within {} s", call, deadline));
      std::this_thread::yield();
    }
    if (rc != ncclSuccess)
      throw LibraryError(detail::library_error_message("NCCL", file, line, call, nccl_text(rc)));
  }

  /// Orders `issue(comm_stream)` after the compute stream's work, tracks it for the watchdog and returns its
  /// completion event.
  template <typename Issue>
  std::shared_ptr<Event> enqueue(std::string what, Issue&& issue) {
    MPT_CHECK(comm_ready && !fatal_started.load(), "NCCL communicator is not usable ({})", what);
    MPT_CUDA_CHECK(cudaEventRecord(ready->get(), compute));
    MPT_CUDA_CHECK(cudaStreamWaitEvent(comm_stream.get(), ready->get(), 0));
    auto done = std::make_shared<Event>(Event::create(/*timing=*/false));
    uint64_t id = 0;
    {
      std::lock_guard lock(mutex);
      id = next_id++;
      pending.push_back(Pending{id, std::move(what), done, false, Clock::now(), timeout_seconds});
    }
    try {
      issue(comm_stream.get());
      MPT_CUDA_CHECK(cudaEventRecord(done->get(), comm_stream.get()));
    } catch (...) {
      std::lock_guard lock(mutex);
      std::erase_if(pending, [id](const Pending& p) { return p.id == id; });
      throw;
    }
    std::lock_guard lock(mutex);
    for (auto& p : pending)
      if (p.id == id) p.recorded = true;
    return done;
  }

  void compute_waits(const Event& done) { MPT_CUDA_CHECK(cudaStreamWaitEvent(compute, done.get(), 0)); }

  /// Prints `message` as the one line, aborts NCCL (given at most 5 s: an abort can block on a wedged
  /// device) and ends the job. A second caller (the other thread) waits for the first to end the process.
  [[noreturn]] void fatal(const std::string& message) noexcept {
    if (fatal_started.exchange(true)) {
      for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
    }
    std::fprintf(stderr, "%s: %s; aborting\n", prefix.c_str(), message.c_str());
    std::fflush(stderr);
    if (comm) {
      auto aborted = std::make_shared<std::atomic<bool>>(false);
      try {
        std::thread([c = comm, aborted] {
          ncclCommAbort(c);
          aborted->store(true);
        }).detach();
        const auto until = Clock::now() + std::chrono::seconds(5);
        while (!aborted->load() && Clock::now() < until)
          std::this_thread::sleep_for(std::chrono::milliseconds(10));
      } catch (...) {
        // No thread for the abort: MPI_Abort ends the processes all the same.
      }
    }
    // MPI_Abort may be called from this thread only when MPI runs with MPI_THREAD_MULTIPLE (the main thread
    // may be inside MPI right now). Otherwise the process exits without MPI_Finalize, which mpirun and srun
    // answer by ending the whole job, just as MPI_Abort would.
    int finalized = 0, level = MPI_THREAD_SINGLE;
    MPI_Finalized(&finalized);
    if (!finalized && MPI_Query_thread(&level) == MPI_SUCCESS && level == MPI_THREAD_MULTIPLE)
      MPI_Abort(MPI_COMM_WORLD, 1);
    std::_Exit(1);
  }

  /// The watchdog thread: every 100 ms retires completed collectives, checks NCCL's asynchronous error
  /// state and the oldest pending collective's deadline.
  void watch() noexcept {
    if (const cudaError_t rc = cudaSetDevice(device); rc != cudaSuccess)
      log_cuda_failure("cudaSetDevice in the NCCL watchdog", rc);
    std::unique_lock lock(mutex);
    while (!stopping) {
      wake.wait_for(lock, std::chrono::milliseconds(100));
      if (stopping) break;
      std::string failure;
      while (!pending.empty() && pending.front().recorded) {
        const cudaError_t rc = cudaEventQuery(pending.front().done->get());
        if (rc == cudaSuccess) {
          pending.pop_front();
          continue;
        }
        if (rc == cudaErrorNotReady)
          (void)cudaGetLastError();  // not an error: keep it out of this thread's last error
        else
          failure = MPT_FORMAT("CUDA error in NCCL {}: {}", pending.front().what, cudaGetErrorString(rc));
        break;
      }
      if (failure.empty()) {
        ncclResult_t state = ncclSuccess;
        ncclResult_t rc = ncclCommGetAsyncError(comm, &state);
        if (rc == ncclSuccess) rc = state;
        if (rc != ncclSuccess && rc != ncclInProgress)
          failure = MPT_FORMAT("NCCL error during {}: {}",
                               pending.empty() ? std::string("no collective") : pending.front().what,
                               nccl_text(rc));
      }
      if (failure.empty() && !pending.empty()) {
        const Pending& p = pending.front();
        const double age = std::chrono::duration<double>(Clock::now() - p.issued).count();
        if (p.timeout_seconds > 0 && age > p.timeout_seconds)
          failure = MPT_FORMAT("NCCL {} did not complete within {} s", p.what, p.timeout_seconds);
      }
      if (!failure.empty()) {
        lock.unlock();
        fatal(failure);
      }
    }
  }
};

NcclCommunicator::State::~State() {
  if (watchdog.joinable()) {
    {
      std::lock_guard lock(mutex);
      stopping = true;
    }
    wake.notify_all();
    watchdog.join();
  }
  if (comm) {
    ncclResult_t rc = ncclSuccess;
    if (comm_ready) {
      // Finalize flushes every issued collective; then destroy frees the rest without blocking.
      rc = ncclCommFinalize(comm);
      const auto start = Clock::now();
      while (rc == ncclInProgress) {
        ncclResult_t state = ncclSuccess;
        const ncclResult_t q = ncclCommGetAsyncError(comm, &state);
        rc = q != ncclSuccess ? q : state;
        if (rc == ncclInProgress && timeout_seconds > 0 &&
            std::chrono::duration<double>(Clock::now() - start).count() > timeout_seconds) {
          std::fprintf(stderr, "%s: ncclCommFinalize did not finish within %g s\n", prefix.c_str(),
                       timeout_seconds);
          break;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
    }
    if (comm_ready && rc == ncclSuccess) {
      if (const ncclResult_t d = ncclCommDestroy(comm); d != ncclSuccess && d != ncclInProgress)
        std::fprintf(stderr, "%s: ncclCommDestroy failed: %s\n", prefix.c_str(), nccl_text(d).c_str());
    } else {
      if (comm_ready)
        std::fprintf(stderr, "%s: ncclCommFinalize failed (%s); aborting the communicator\n", prefix.c_str(),
                     nccl_text(rc).c_str());
      if (const ncclResult_t a = ncclCommAbort(comm); a != ncclSuccess && a != ncclInProgress)
        std::fprintf(stderr, "%s: ncclCommAbort failed: %s\n", prefix.c_str(), nccl_text(a).c_str());
    }
  }
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (mpi != MPI_COMM_NULL && !finalized) MPI_Comm_free(&mpi);
}

// ---- NcclCommunicator -------------------------------------------------------------------------------------

NcclCommunicator::NcclCommunicator(MPI_Comm comm, cudaStream_t compute_stream, double timeout_seconds)
    : state_(std::make_unique<State>()) {
  MPT_CHECK(std::isfinite(timeout_seconds) && timeout_seconds >= 0,
            "NCCL communicator: timeout {} s must be finite and >= 0", timeout_seconds);
  State& s = *state_;
  s.timeout_seconds = timeout_seconds;
  s.compute = compute_stream;
  MPT_MPI_CHECK(MPI_Comm_dup(comm, &s.mpi));
  MPT_MPI_CHECK(MPI_Comm_set_errhandler(s.mpi, MPI_ERRORS_RETURN));
  MPT_MPI_CHECK(MPI_Comm_rank(s.mpi, &rank_));
  MPT_MPI_CHECK(MPI_Comm_size(s.mpi, &size_));
  MPT_CUDA_CHECK(cudaGetDevice(&device_));
  s.device = device_;
  s.prefix = MPT_FORMAT("mptrain: rank {} ({})", rank_, detail::host_name());

  // Rank 0 makes the id; its success travels first so no rank waits for an id that never comes.
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  int id_ok = 1;
  std::string id_error;
  if (rank_ == 0) {
    if (const ncclResult_t rc = ncclGetUniqueId(&id); rc != ncclSuccess) {
      id_ok = 0;
      id_error = nccl_text(rc);
    }
  }
  MPT_MPI_CHECK(MPI_Bcast(&id_ok, 1, MPI_INT, 0, s.mpi));
  if (!id_ok)
    throw LibraryError(
        MPT_FORMAT("NCCL: ncclGetUniqueId failed on rank 0{}", id_error.empty() ? "" : ": " + id_error));
  MPT_MPI_CHECK(MPI_Bcast(&id, static_cast<int>(sizeof(id)), MPI_BYTE, 0, s.mpi));

  s.comm_stream = Stream::create(/*highest_priority=*/true);
  s.ready = std::make_unique<Event>(Event::create(/*timing=*/false));
  s.barrier_word = DeviceMemory(sizeof(int32_t));
  MPT_CUDA_CHECK(cudaMemset(s.barrier_word.data(), 0, sizeof(int32_t)));

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  const ncclResult_t rc = ncclCommInitRankConfig(&s.comm, size_, id, rank_, &config);
  if (rc != ncclSuccess && rc != ncclInProgress)
    throw LibraryError(
        detail::library_error_message("NCCL", __FILE__, __LINE__, "ncclCommInitRankConfig", nccl_text(rc)));
  s.settle(rc, "ncclCommInitRankConfig", __FILE__, __LINE__);
  s.comm_ready = true;
  s.watchdog = std::thread([&s] { s.watch(); });
}

NcclCommunicator::~NcclCommunicator() = default;

void NcclCommunicator::set_timeout_seconds(double seconds) {
  MPT_CHECK(std::isfinite(seconds) && seconds >= 0, "collective timeout {} s must be finite and >= 0",
            seconds);
  std::lock_guard lock(state_->mutex);
  state_->timeout_seconds = seconds;
}

namespace {

/// The max of floating-point data as an unsigned max over order-preserving keys (mptrain/cuda_max_keys.hpp).
/// `in` holds `in_count` values; the NCCL collective `op` reduces the keys in place, leaving `out_count`
/// result keys at key offset `out_offset`, which become `out`.
template <typename NcclCall>
void keyed_max(const void* in, size_t in_count, void* out, size_t out_count, size_t out_offset, DType t,
               cudaStream_t stream, NcclCall&& op) {
  const size_t ks = cuda::max_key_size(t);
  StreamScratch keys(in_count * ks, stream);
  cuda::to_max_keys(keys.get(), in, in_count, t, stream);
  op(keys.get(), keys.get() + out_offset * ks, key_type(t));
  cuda::from_max_keys(out, keys.get() + out_offset * ks, out_count, t, stream);
}

}  // namespace

namespace {

std::shared_ptr<Event> issue_all_reduce(NcclCommunicator::State& s, const void* send, void* recv,
                                        size_t count, DType dtype, ReduceOp op) {
  check_reduction("all_reduce", dtype, op);
  check_count("all_reduce", count, dtype);
  MPT_CHECK(send && recv, "all_reduce: null buffer for {} elements", count);
  return s.enqueue(describe("all_reduce", count, dtype), [&](cudaStream_t stream) {
    if (op == ReduceOp::max && is_float(dtype)) {
      keyed_max(send, count, recv, count, 0, dtype, stream, [&](void* keys, void*, ncclDataType_t kt) {
        MPT_NCCL_SETTLE(s, ncclAllReduce(keys, keys, count, kt, ncclMax, s.comm, stream));
      });
    } else {
      MPT_NCCL_SETTLE(s, ncclAllReduce(send, recv, count, nccl_type(dtype), nccl_op(op), s.comm, stream));
    }
  });
}

std::shared_ptr<Event> issue_reduce_scatter(NcclCommunicator::State& s, int rank, int size, const void* send,
                                            void* recv, size_t recv_count, DType dtype, ReduceOp op) {
  check_reduction("reduce_scatter", dtype, op);
  MPT_CHECK(recv_count <= SIZE_MAX / static_cast<size_t>(size),
            "reduce_scatter: {} x {} elements overflow size_t", recv_count, size);
  const size_t total = recv_count * static_cast<size_t>(size);
  check_count("reduce_scatter", total, dtype);
  MPT_CHECK(send && recv, "reduce_scatter: null buffer for {} elements", total);
  return s.enqueue(describe("reduce_scatter", total, dtype), [&](cudaStream_t stream) {
    if (op == ReduceOp::max && is_float(dtype)) {
      keyed_max(send, total, recv, recv_count, static_cast<size_t>(rank) * recv_count, dtype, stream,
                [&](void* keys, void* my_keys, ncclDataType_t kt) {
                  MPT_NCCL_SETTLE(s,
                                  ncclReduceScatter(keys, my_keys, recv_count, kt, ncclMax, s.comm, stream));
                });
    } else {
      MPT_NCCL_SETTLE(
          s, ncclReduceScatter(send, recv, recv_count, nccl_type(dtype), nccl_op(op), s.comm, stream));
    }
  });
}

std::shared_ptr<Event> issue_all_gather(NcclCommunicator::State& s, int size, const void* send, void* recv,
                                        size_t send_count, DType dtype) {
  MPT_CHECK(send_count <= SIZE_MAX / static_cast<size_t>(size),
            "all_gather: {} x {} elements overflow size_t", send_count, size);
  const size_t total = send_count * static_cast<size_t>(size);
  check_count("all_gather", total, dtype);
  MPT_CHECK(send && recv, "all_gather: null buffer for {} elements", total);
  return s.enqueue(describe("all_gather", total, dtype), [&](cudaStream_t stream) {
    MPT_NCCL_SETTLE(s, ncclAllGather(send, recv, send_count, nccl_type(dtype), s.comm, stream));
  });
}

}  // namespace

void NcclCommunicator::all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) {
  if (count == 0) return check_reduction("all_reduce", dtype, op);
  state_->compute_waits(*issue_all_reduce(*state_, send, recv, count, dtype, op));
}

void NcclCommunicator::reduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype,
                                      ReduceOp op) {
  if (recv_count == 0) return check_reduction("reduce_scatter", dtype, op);
  state_->compute_waits(*issue_reduce_scatter(*state_, rank_, size_, send, recv, recv_count, dtype, op));
}

void NcclCommunicator::all_gather(const void* send, void* recv, size_t send_count, DType dtype) {
  if (send_count == 0) return;
  state_->compute_waits(*issue_all_gather(*state_, size_, send, recv, send_count, dtype));
}

void NcclCommunicator::broadcast(void* buf, size_t count, DType dtype, int root) {
  MPT_CHECK(root >= 0 && root < size_, "broadcast: root {} outside [0, {})", root, size_);
  if (count == 0) return;
  check_count("broadcast", count, dtype);
  MPT_CHECK(buf, "broadcast: null buffer for {} elements", count);
  State& s = *state_;
  auto done = s.enqueue(describe("broadcast", count, dtype), [&](cudaStream_t stream) {
    MPT_NCCL_SETTLE(s, ncclBroadcast(buf, buf, count, nccl_type(dtype), root, s.comm, stream));
  });
  s.compute_waits(*done);
}

cudaStream_t NcclCommunicator::comm_stream() const {
  return state_->comm_stream.get();
}

void NcclCommunicator::barrier() {
  State& s = *state_;
  auto done = s.enqueue("barrier (all_reduce of 1 i32)", [&](cudaStream_t stream) {
    void* word = s.barrier_word.data();
    MPT_NCCL_SETTLE(s, ncclAllReduce(word, word, 1, ncclInt32, ncclSum, s.comm, stream));
  });
  // The host waits here; a rank that never arrives is the watchdog's to report.
  MPT_CUDA_CHECK(cudaEventSynchronize(done->get()));
}

std::unique_ptr<CommRequest> NcclCommunicator::iall_reduce(const void* send, void* recv, size_t count,
                                                           DType dtype, ReduceOp op) {
  check_reduction("iall_reduce", dtype, op);
  MPT_CHECK(count > 0, "iall_reduce: empty collectives have no request; count must be > 0");
  return std::make_unique<NcclRequest>(issue_all_reduce(*state_, send, recv, count, dtype, op),
                                       state_->compute);
}

std::unique_ptr<CommRequest> NcclCommunicator::ireduce_scatter(const void* send, void* recv,
                                                               size_t recv_count, DType dtype, ReduceOp op) {
  MPT_CHECK(recv_count > 0, "ireduce_scatter: empty collectives have no request; recv_count must be > 0");
  return std::make_unique<NcclRequest>(
      issue_reduce_scatter(*state_, rank_, size_, send, recv, recv_count, dtype, op), state_->compute);
}

std::unique_ptr<CommRequest> NcclCommunicator::iall_gather(const void* send, void* recv, size_t send_count,
                                                           DType dtype) {
  MPT_CHECK(send_count > 0, "iall_gather: empty collectives have no request; send_count must be > 0");
  return std::make_unique<NcclRequest>(issue_all_gather(*state_, size_, send, recv, send_count, dtype),
                                       state_->compute);
}

}  // namespace mpt
