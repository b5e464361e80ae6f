// MPI implementation of the Communicator (host buffers), with NCCL's rounding semantics for fp16/bf16.
//
// Each collective is first turned into a Plan (MPI datatype and op, the buffers MPI should see, the avg
// pre-multiplication done, and what to do after completion), then issued blocking or non-blocking. That
// keeps the blocking and non-blocking paths one piece of code.
#include "mptrain/comm_mpi.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>

#include "mptrain/error.hpp"

namespace mpt {

std::string_view reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
      return "sum";
    case ReduceOp::avg:
      return "avg";
    case ReduceOp::max:
      return "max";
  }
  return "?";
}

namespace {

// ---- custom reductions for 16-bit floats: compute in FP32, round once per combine ----------------------

/// b[i] = T(f(float(a[i]), float(b[i]))) for i < n, through the SIMD bulk converters in cache-sized chunks
/// (element-wise results identical to the scalar conversions). a == nullptr means f(b[i]) alone.
template <typename T, typename F>
void combine_in_float(const T* a, T* b, size_t n, F&& f) {
  constexpr size_t kChunk = 2048;
  float fa[kChunk], fb[kChunk];
  for (size_t start = 0; start < n; start += kChunk) {
    const size_t m = std::min(kChunk, n - start);
    if (a) convert(a + start, fa, m);
    convert(b + start, fb, m);
    for (size_t i = 0; i < m; ++i) fb[i] = f(fa[i], fb[i]);
    convert(fb, b + start, m);
  }
}

template <typename T>
void sum16(void* in, void* inout, int* len, MPI_Datatype*) {
  combine_in_float(static_cast<const T*>(in), static_cast<T*>(inout), static_cast<size_t>(*len),
                   [](float x, float y) { return x + y; });
}

/// Max where NaN wins over everything, for every float dtype alike (MPI_MAX on floats keeps or drops a NaN
/// depending on which rank holds it), so a max can never hide a NaN.
template <typename T>
void max_nan_wins(void* in, void* inout, int* len, MPI_Datatype*) {
  const auto* a = static_cast<const T*>(in);
  auto* b = static_cast<T*>(inout);
  for (int i = 0; i < *len; ++i) {
    const auto x = to_float(a[i]);
    const auto y = to_float(b[i]);
    if (std::isnan(x) || (!std::isnan(y) && x > y)) b[i] = a[i];
  }
}

struct CustomOps {
  MPI_Op half_sum, bf16_sum, half_max, bf16_max, f32_max, f64_max;
};

const CustomOps& custom_ops() {
  static CustomOps ops = [] {
    CustomOps o{};
    MPT_MPI_CHECK(MPI_Op_create(&sum16<half>, 1, &o.half_sum));
    MPT_MPI_CHECK(MPI_Op_create(&sum16<bf16>, 1, &o.bf16_sum));
    MPT_MPI_CHECK(MPI_Op_create(&max_nan_wins<half>, 1, &o.half_max));
    MPT_MPI_CHECK(MPI_Op_create(&max_nan_wins<bf16>, 1, &o.bf16_max));
    MPT_MPI_CHECK(MPI_Op_create(&max_nan_wins<float>, 1, &o.f32_max));
    MPT_MPI_CHECK(MPI_Op_create(&max_nan_wins<double>, 1, &o.f64_max));
    return o;
  }();
  return ops;
}

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::f32:
      return MPI_FLOAT;
    case DType::f64:
      return MPI_DOUBLE;
    case DType::f16:
      return MPI_UINT16_T;
    case DType::bf16:
      return MPI_UINT16_T;
    case DType::i32:
      return MPI_INT32_T;
    case DType::i64:
      return MPI_INT64_T;
    case DType::u8:
      return MPI_UINT8_T;
  }
  throw Error("unknown dtype");
}

bool is_float(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::f16 || t == DType::bf16;
}

MPI_Op mpi_op(DType t, ReduceOp op) {
  MPT_CHECK(op != ReduceOp::avg || is_float(t), "reduce op avg needs a floating-point dtype, got {}",
            dtype_name(t));
  MPT_CHECK(t != DType::u8, "reductions of dtype u8 are not supported");
  const bool is_max = op == ReduceOp::max;
  if (t == DType::f16) return is_max ? custom_ops().half_max : custom_ops().half_sum;
  if (t == DType::bf16) return is_max ? custom_ops().bf16_max : custom_ops().bf16_sum;
  if (is_max && t == DType::f32) return custom_ops().f32_max;
  if (is_max && t == DType::f64) return custom_ops().f64_max;
  return is_max ? MPI_MAX : MPI_SUM;
}

/// dst[i] = T(src[i] * T(1/N)) in the storage type, as NCCL's PreMulSum does before summing.
void premultiply(const void* src, void* dst, size_t count, DType t, int world) {
  auto scale_as = [&]<typename T>() {
    const T* s = static_cast<const T*>(src);
    T* d = static_cast<T*>(dst);
    if constexpr (std::is_same_v<T, double>) {
      const double f = 1.0 / world;
      for (size_t i = 0; i < count; ++i) d[i] = s[i] * f;
    } else if constexpr (std::is_same_v<T, float>) {
      const float f = 1.0f / static_cast<float>(world);
      for (size_t i = 0; i < count; ++i) d[i] = s[i] * f;
    } else {
      const float f = to_float(from_float<T>(1.0f / static_cast<float>(world)));
      if (d != s) std::memcpy(d, s, count * sizeof(T));
      combine_in_float<T>(nullptr, d, count, [f](float, float y) { return y * f; });
    }
  };
  if (t == DType::f64)
    scale_as.template operator()<double>();
  else
    dispatch_float_dtype(t, scale_as);
}

int checked_count(size_t count, const char* what) {
  MPT_CHECK(count <= static_cast<size_t>(INT_MAX), "{}: {} elements exceed MPI's int count limit ({})", what,
            count, INT_MAX);
  return static_cast<int>(count);
}

/// One collective ready to be issued: the buffers and types MPI sees and the work left after completion.
struct Plan {
  const void* send = nullptr;  // MPI_IN_PLACE when in place
  void* recv = nullptr;
  int count = 0;
  MPI_Datatype type = MPI_DATATYPE_NULL;
  MPI_Op op = MPI_OP_NULL;
  std::vector<std::byte> scratch;  // owns pre-multiplied input when the caller's send is const
  std::function<void()> finish;    // run after completion (e.g. move the in-place reduce-scatter result)
};

Plan plan_all_reduce(const void* send, void* recv, size_t count, DType t, ReduceOp op, int world) {
  Plan p;
  p.count = checked_count(count, "all_reduce");
  p.type = mpi_type(t);
  p.op = mpi_op(t, op);
  p.recv = recv;
  // With one rank the average is the value itself (x * 1 is exact): no pre-multiplication pass.
  if (op == ReduceOp::avg && world > 1) {
    premultiply(send, recv, count, t, world);  // into recv: then reduce in place
    p.send = MPI_IN_PLACE;
  } else {
    p.send = send == recv ? MPI_IN_PLACE : send;
  }
  return p;
}

Plan plan_reduce_scatter(const void* send, void* recv, size_t recv_count, DType t, ReduceOp op, int rank,
                         int world) {
  Plan p;
  p.count = checked_count(recv_count, "reduce_scatter");
  (void)checked_count(recv_count * static_cast<size_t>(world), "reduce_scatter (total)");
  p.type = mpi_type(t);
  p.op = mpi_op(t, op);
  const bool premultiply_input = op == ReduceOp::avg && world > 1;  // x * 1 is exact: skip for one rank
  const size_t esize = dtype_size(t);
  const size_t slice_bytes = recv_count * esize;
  const size_t total = recv_count * static_cast<size_t>(world);
  auto* base = const_cast<std::byte*>(static_cast<const std::byte*>(send));
  const bool in_place = static_cast<std::byte*>(recv) == base + static_cast<size_t>(rank) * slice_bytes;
  if (in_place) {
    // MPI's in-place reduce-scatter reads the whole vector from recvbuf and leaves the result at its start;
    // NCCL's leaves it at slice r. The caller handed us writable memory (recv lies inside send), so we may
    // pre-multiply in place, and move the result to slice r afterwards.
    if (premultiply_input) premultiply(base, base, total, t, world);
    p.send = MPI_IN_PLACE;
    p.recv = base;
    if (rank != 0) p.finish = [base, recv, slice_bytes] { std::memmove(recv, base, slice_bytes); };
  } else {
    p.recv = recv;
    if (premultiply_input) {
      p.scratch.resize(total * esize);
      premultiply(send, p.scratch.data(), total, t, world);
      p.send = p.scratch.data();
    } else {
      p.send = send;
    }
  }
  return p;
}

Plan plan_all_gather(const void* send, void* recv, size_t send_count, DType t, int rank, int world) {
  Plan p;
  p.count = checked_count(send_count, "all_gather");
  (void)checked_count(send_count * static_cast<size_t>(world), "all_gather (total)");
  p.type = mpi_type(t);
  const size_t slice_bytes = send_count * dtype_size(t);
  const bool in_place = static_cast<const std::byte*>(send) ==
                        static_cast<std::byte*>(recv) + static_cast<size_t>(rank) * slice_bytes;
  p.send = in_place ? MPI_IN_PLACE : send;
  p.recv = recv;
  return p;
}

// ---- collective watchdog ----------------------------------------------------------------------------------

using WatchdogClock = std::chrono::steady_clock;

/// What a collective is, for the watchdog's line: name, elements and dtype. `startup` marks the duplication
/// of the communicator, the first collective, which is where Open MPI opens its connections between ranks.
struct CollectiveInfo {
  const char* name = "";
  size_t count = 0;
  DType dtype = DType::u8;
  bool startup = false;
};

/// Ends the job: one line naming this rank, its host, the collective and the timeout, then MPI_Abort (which
/// makes mpirun kill every rank, the frozen one included). MPI_Abort goes to the local Open MPI daemon, not
/// over the ranks' own connections, so it works when those never came up.
[[noreturn]] void watchdog_abort(MPI_Comm comm, int rank, const CollectiveInfo& what, double timeout) {
  const std::string host = detail::host_name();
  if (what.startup) {
    std::fprintf(stderr,
                 "mptrain: rank %d on %s: start-up: the first collective (%s, where Open MPI connects the "
                 "ranks) did not complete within %g s (--collective-timeout); a rank did not start or cannot "
                 "be reached: if the hosts share an address on some interface (docker0, virbr0), name the "
                 "one that connects them (mpirun --mca btl_tcp_if_include IF; MPTRAIN_MPI_IFACE in "
                 "launch/multinode.sh), aborting the job\n",
                 rank, host.c_str(), what.name, timeout);
    std::fflush(stderr);
    // Every rank stuck in the first collective started waiting when MPI_Init's closing fence let them go,
    // within milliseconds of each other, so their deadlines pass together. A second before aborting lets
    // each of them print its line before mpirun kills it.
    std::this_thread::sleep_for(std::chrono::seconds(1));
  } else {
    std::fprintf(stderr,
                 "mptrain: rank %d on %s: collective %s of %zu %s elements did not complete within %g s "
                 "(--collective-timeout); a rank is frozen or gone, aborting the job\n",
                 rank, host.c_str(), what.name, what.count, std::string(dtype_name(what.dtype)).c_str(),
                 timeout);
    std::fflush(stderr);
  }
  MPI_Abort(comm, 1);
  std::_Exit(1);  // MPI_Abort does not return; never continue past a failed collective
}

/// Completes `request` like MPI_Wait, but with the watchdog: when `timeout` > 0 and the collective has not
/// completed `timeout` seconds after `issued`, aborts the job. Polls MPI_Test (which drives progress),
/// yielding the core between polls once the collective has taken longer than a millisecond.
void wait_with_deadline(MPI_Request* request, MPI_Comm comm, int rank, const CollectiveInfo& what,
                        double timeout, WatchdogClock::time_point issued) {
  if (timeout <= 0) {
    MPT_MPI_CHECK(MPI_Wait(request, MPI_STATUS_IGNORE));
    return;
  }
  const auto deadline =
      issued + std::chrono::duration_cast<WatchdogClock::duration>(std::chrono::duration<double>(timeout));
  const auto spin_until = WatchdogClock::now() + std::chrono::milliseconds(1);
  for (;;) {
    int flag = 0;
    MPT_MPI_CHECK(MPI_Test(request, &flag, MPI_STATUS_IGNORE));
    if (flag) return;
    const auto now = WatchdogClock::now();
    if (now >= deadline) watchdog_abort(comm, rank, what, timeout);
    if (now > spin_until) std::this_thread::yield();
  }
}

class MpiRequest final : public CommRequest {
 public:
  MpiRequest(Plan plan, MPI_Comm comm, int rank, CollectiveInfo what, double timeout)
      : plan_(std::move(plan)),
        comm_(comm),
        rank_(rank),
        what_(what),
        timeout_(timeout),
        issued_(WatchdogClock::now()) {}
  ~MpiRequest() override {
    if (done_) return;
    try {
      wait();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "mptrain: unfinished collective failed in its destructor: %s\n", e.what());
    }
  }
  const Plan& plan() const { return plan_; }
  MPI_Request* handle() { return &request_; }
  void wait() override {
    if (done_) return;
    wait_with_deadline(&request_, comm_, rank_, what_, timeout_, issued_);
    complete();
  }
  bool test() override {
    if (done_) return true;
    int flag = 0;
    MPT_MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
    if (flag)
      complete();
    else if (timeout_ > 0 && WatchdogClock::now() - issued_ >= std::chrono::duration<double>(timeout_))
      watchdog_abort(comm_, rank_, what_, timeout_);
    return done_;
  }

 private:
  void complete() {
    done_ = true;
    if (plan_.finish) plan_.finish();
  }
  Plan plan_;
  MPI_Comm comm_;
  int rank_;
  CollectiveInfo what_;
  double timeout_;
  WatchdogClock::time_point issued_;
  MPI_Request request_ = MPI_REQUEST_NULL;
  bool done_ = false;
};

void finish(const Plan& p) {
  if (p.finish) p.finish();
}

}  // namespace

// ---- MpiSession -------------------------------------------------------------------------------------------

MpiSession::MpiSession(int* argc, char*** argv) {
  int initialized = 0;
  MPT_MPI_CHECK(MPI_Initialized(&initialized));
  if (initialized) return;
  int provided = 0;
  MPT_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  owns_ = true;
}

MpiSession::~MpiSession() {
  if (!owns_) return;
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

// ---- MpiCommunicator --------------------------------------------------------------------------------------

MpiCommunicator::MpiCommunicator(MPI_Comm comm, double timeout_seconds) {
  set_timeout_seconds(timeout_seconds);
  if (timeout_seconds_ > 0) {
    int rank = 0;
    MPT_MPI_CHECK(MPI_Comm_rank(comm, &rank));
    const auto issued = std::chrono::steady_clock::now();
    MPI_Request r = MPI_REQUEST_NULL;
    MPT_MPI_CHECK(MPI_Comm_idup(comm, &comm_, &r));
    wait_with_deadline(&r, comm, rank, CollectiveInfo{"MPI_Comm_idup", 0, DType::u8, true}, timeout_seconds_,
                       issued);
  } else {
    MPT_MPI_CHECK(MPI_Comm_dup(comm, &comm_));
  }
  MPT_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  MPT_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MPT_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  (void)custom_ops();
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
}

// With the watchdog on, every blocking collective is its non-blocking twin completed under the deadline;
// off, the plain blocking call (MPI's own algorithms, no polling).
void MpiCommunicator::complete(MPI_Request* request, const char* name, size_t count, DType dtype,
                               std::chrono::steady_clock::time_point issued) const {
  wait_with_deadline(request, comm_, rank_, CollectiveInfo{name, count, dtype}, timeout_seconds_, issued);
}

void MpiCommunicator::set_timeout_seconds(double seconds) {
  MPT_CHECK(std::isfinite(seconds) && seconds >= 0, "collective timeout must be finite and >= 0, got {}",
            seconds);
  timeout_seconds_ = seconds;
}

void MpiCommunicator::all_reduce(const void* send, void* recv, size_t count, DType dtype, ReduceOp op) {
  Plan p = plan_all_reduce(send, recv, count, dtype, op, size_);
  if (timeout_seconds_ > 0) {
    const auto issued = std::chrono::steady_clock::now();
    MPI_Request r = MPI_REQUEST_NULL;
    MPT_MPI_CHECK(MPI_Iallreduce(p.send, p.recv, p.count, p.type, p.op, comm_, &r));
    complete(&r, "all_reduce", count, dtype, issued);
  } else {
    MPT_MPI_CHECK(MPI_Allreduce(p.send, p.recv, p.count, p.type, p.op, comm_));
  }
  finish(p);
}

void MpiCommunicator::reduce_scatter(const void* send, void* recv, size_t recv_count, DType dtype,
                                     ReduceOp op) {
  Plan p = plan_reduce_scatter(send, recv, recv_count, dtype, op, rank_, size_);
  if (timeout_seconds_ > 0) {
    const auto issued = std::chrono::steady_clock::now();
    MPI_Request r = MPI_REQUEST_NULL;
    MPT_MPI_CHECK(MPI_Ireduce_scatter_block(p.send, p.recv, p.count, p.type, p.op, comm_, &r));
    complete(&r, "reduce_scatter", recv_count, dtype, issued);
  } else {
    MPT_MPI_CHECK(MPI_Reduce_scatter_block(p.send, p.recv, p.count, p.type, p.op, comm_));
  }
  finish(p);
}

void MpiCommunicator::all_gather(const void* send, void* recv, size_t send_count, DType dtype) {
  Plan p = plan_all_gather(send, recv, send_count, dtype, rank_, size_);
  if (timeout_seconds_ > 0) {
    const auto issued = std::chrono::steady_clock::now();
    MPI_Request r = MPI_REQUEST_NULL;
    MPT_MPI_CHECK(MPI_Iallgather(p.send, p.count, p.type, p.recv, p.count, p.type, comm_, &r));
    complete(&r, "all_gather", send_count, dtype, issued);
  } else {
    MPT_MPI_CHECK(MPI_Allgather(p.send, p.count, p.type, p.recv, p.count, p.type, comm_));
  }
}

void MpiCommunicator::broadcast(void* buf, size_t count, DType dtype, int root) {
  MPT_CHECK(root >= 0 && root < size_, "broadcast: root {} outside [0, {})", root, size_);
  const int n = checked_count(count, "broadcast");
  if (timeout_seconds_ > 0) {
    const auto issued = std::chrono::steady_clock::now();
    MPI_Request r = MPI_REQUEST_NULL;
    MPT_MPI_CHECK(MPI_Ibcast(buf, n, mpi_type(dtype), root, comm_, &r));
    complete(&r, "broadcast", count, dtype, issued);
  } else {
    MPT_MPI_CHECK(MPI_Bcast(buf, n, mpi_type(dtype), root, comm_));
  }
}

void MpiCommunicator::barrier() {
  if (timeout_seconds_ > 0) {
    const auto issued = std::chrono::steady_clock::now();
    MPI_Request r = MPI_REQUEST_NULL;
    MPT_MPI_CHECK(MPI_Ibarrier(comm_, &r));
    complete(&r, "barrier", 0, DType::u8, issued);
  } else {
    MPT_MPI_CHECK(MPI_Barrier(comm_));
  }
}

// The plan moves into the request before the collective starts, so its scratch outlives the collective.
std::unique_ptr<CommRequest> MpiCommunicator::iall_reduce(const void* send, void* recv, size_t count,
                                                          DType dtype, ReduceOp op) {
  auto r = std::make_unique<MpiRequest>(plan_all_reduce(send, recv, count, dtype, op, size_), comm_, rank_,
                                        CollectiveInfo{"iall_reduce", count, dtype}, timeout_seconds_);
  const Plan& p = r->plan();
  MPT_MPI_CHECK(MPI_Iallreduce(p.send, p.recv, p.count, p.type, p.op, comm_, r->handle()));
  return r;
}

std::unique_ptr<CommRequest> MpiCommunicator::ireduce_scatter(const void* send, void* recv, size_t recv_count,
                                                              DType dtype, ReduceOp op) {
  auto r = std::make_unique<MpiRequest>(plan_reduce_scatter(send, recv, recv_count, dtype, op, rank_, size_),
                                        comm_, rank_, CollectiveInfo{"ireduce_scatter", recv_count, dtype},
                                        timeout_seconds_);
  const Plan& p = r->plan();
  MPT_MPI_CHECK(MPI_Ireduce_scatter_block(p.send, p.recv, p.count, p.type, p.op, comm_, r->handle()));
  return r;
}

std::unique_ptr<CommRequest> MpiCommunicator::iall_gather(const void* send, void* recv, size_t send_count,
                                                          DType dtype) {
  auto r =
      std::make_unique<MpiRequest>(plan_all_gather(send, recv, send_count, dtype, rank_, size_), comm_, rank_,
                                   CollectiveInfo{"iall_gather", send_count, dtype}, timeout_seconds_);
  const Plan& p = r->plan();
  MPT_MPI_CHECK(MPI_Iallgather(p.send, p.count, p.type, p.recv, p.count, p.type, comm_, r->handle()));
  return r;
}

}  // namespace mpt
