// NcclCommunicator tests on device buffers, run under mpiexec -n 1 and -n 2 with one GPU per rank: the same
// semantic checks as test_comm_mpi (inputs derived from the rank so every expected result is exact, or
// bounded in units of the dtype's epsilon), plus the stream ordering, select_local_device and the watchdog,
// which is checked in a child job (a collective that never completes must end the job within the timeout plus
// a few seconds, with one line on stderr). Without a GPU everything skips ("no CUDA device") except the
// select_local_device checks, whose error on such a machine is part of the contract, and the child job of
// child_job_tests.cpp, which proves the watchdog tests can start theirs.
#include <cuda_runtime.h>
#include <mpi.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "child_job.hpp"
#include "comm_test_support.hpp"
#include "mptrain/comm_nccl.hpp"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_ops.hpp"
#include "mptrain/runtime.hpp"

namespace mpt {
namespace {

using test::epsilon_of;
using test::k_of;
using test::make;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

// Every rank needs its own GPU (the tests run on one node). All ranks of a node see the same count, so all
// skip together and no rank waits in a collective for a skipped one.
#define MPT_SKIP_WITHOUT_GPUS()                                                                   \
  do {                                                                                            \
    const int mpt_devices_ = ::mpt::cuda::device_count();                                         \
    if (mpt_devices_ == 0) GTEST_SKIP() << "no CUDA device";                                      \
    if (mpt_devices_ < world_size()) GTEST_SKIP() << "needs " << world_size() << " CUDA devices"; \
  } while (0)

// ---- one communicator and compute stream for the whole run (NCCL initialisation takes a while) ----------

struct Shared {
  cudaStream_t compute = nullptr;
  std::unique_ptr<NcclCommunicator> comm;
};

Shared& shared() {
  static Shared s;
  return s;
}

NcclCommunicator& comm() {
  Shared& s = shared();
  if (!s.comm) {
    MPT_CUDA_CHECK(cudaSetDevice(select_local_device(MPI_COMM_WORLD)));
    MPT_CUDA_CHECK(cudaStreamCreateWithFlags(&s.compute, cudaStreamNonBlocking));
    s.comm = std::make_unique<NcclCommunicator>(MPI_COMM_WORLD, s.compute);
    // A hang in a test then ends the job with the watchdog's line instead of a silent CTest timeout.
    s.comm->set_timeout_seconds(120);
  }
  return *s.comm;
}

cudaStream_t stream() {
  return shared().compute;
}

// Destroys the communicator before MPI_Finalize (after the last test).
class SharedTeardown : public testing::Environment {
 public:
  void TearDown() override {
    Shared& s = shared();
    s.comm.reset();
    if (s.compute) {
      EXPECT_EQ(cudaStreamDestroy(s.compute), cudaSuccess);
      s.compute = nullptr;
    }
  }
};
[[maybe_unused]] testing::Environment* const kSharedTeardown =
    testing::AddGlobalTestEnvironment(new SharedTeardown);

/// Device copy of a host vector; uploads and downloads run on the compute stream, so every check also
/// proves that the collective was ordered between them without any host sync.
template <typename T>
class DeviceVec {
 public:
  explicit DeviceVec(size_t n) : n_(n) {
    MPT_CUDA_CHECK(cudaMalloc(&data_, std::max<size_t>(n, 1) * sizeof(T)));
  }
  explicit DeviceVec(const std::vector<T>& host) : DeviceVec(host.size()) { upload(host); }
  ~DeviceVec() { cudaFree(data_); }
  DeviceVec(const DeviceVec&) = delete;
  DeviceVec& operator=(const DeviceVec&) = delete;
  void upload(const std::vector<T>& host) {
    MPT_CHECK(host.size() == n_, "upload of {} into {}", host.size(), n_);
    MPT_CUDA_CHECK(cudaMemcpyAsync(data_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice, stream()));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    MPT_CUDA_CHECK(cudaMemcpyAsync(host.data(), data_, n_ * sizeof(T), cudaMemcpyDeviceToHost, stream()));
    MPT_CUDA_CHECK(cudaStreamSynchronize(stream()));
    return host;
  }
  T* get() const { return data_; }
  size_t size() const { return n_; }

 private:
  T* data_ = nullptr;
  size_t n_ = 0;
};

template <typename T>
class NcclTyped : public ::testing::Test {};
TYPED_TEST_SUITE(NcclTyped, test::FloatTypes);

TYPED_TEST(NcclTyped, AllReduceSumMaxExactBlockingAndNonBlocking) {
  using T = TypeParam;
  MPT_SKIP_WITHOUT_GPUS();
  NcclCommunicator& c = comm();
  const int n = c.size();
  const int r = c.rank();
  for (size_t count : {size_t{1}, size_t{7}, size_t{1031}}) {
    const auto host = make<T>(count, [&](size_t i) { return (r + 1) * k_of(i); });
    DeviceVec<T> send(host), out(count), inplace(host), nb(count), mx(count);
    c.all_reduce(send.get(), out.get(), count, dtype_of<T>(), ReduceOp::sum);
    c.all_reduce(inplace.get(), inplace.get(), count, dtype_of<T>(), ReduceOp::sum);
    auto request = c.iall_reduce(send.get(), nb.get(), count, dtype_of<T>(), ReduceOp::sum);
    request->wait();
    c.all_reduce(send.get(), mx.get(), count, dtype_of<T>(), ReduceOp::max);
    const auto o = out.download(), ip = inplace.download(), b = nb.download(), m = mx.download();
    // The compute stream has passed wait() and was synchronised: the collective must have completed.
    EXPECT_TRUE(request->test());
    for (size_t i = 0; i < count; ++i) {
      const float expected = static_cast<float>(k_of(i) * n * (n + 1) / 2);
      ASSERT_EQ(to_float(o[i]), expected) << "count " << count << " index " << i;
      ASSERT_EQ(to_float(ip[i]), expected) << "in place, index " << i;
      ASSERT_EQ(to_float(b[i]), expected) << "non-blocking, index " << i;
      const float expected_max = static_cast<float>(k_of(i) >= 0 ? n * k_of(i) : k_of(i));
      ASSERT_EQ(to_float(m[i]), expected_max) << "max, index " << i;
    }
  }
}

TYPED_TEST(NcclTyped, AverageIsPreMultipliedSum) {
  using T = TypeParam;
  MPT_SKIP_WITHOUT_GPUS();
  NcclCommunicator& c = comm();
  const int n = c.size();
  const int r = c.rank();
  const size_t count = 257;
  DeviceVec<T> send(make<T>(count, [&](size_t i) { return (r + 1) * k_of(i) * 0.5; })), avg(count);
  c.all_reduce(send.get(), avg.get(), count, dtype_of<T>(), ReduceOp::avg);
  const auto got_all = avg.download();
  const bool power_of_two = (n & (n - 1)) == 0;
  for (size_t i = 0; i < count; ++i) {
    const double exact = k_of(i) * 0.5 * (n + 1) / 2.0;
    const double got = to_float(got_all[i]);
    if (power_of_two) {
      ASSERT_EQ(got, exact) << "index " << i;
    } else {
      const double bound = (2.0 * n) * epsilon_of<T>() * 4.0 * std::abs(k_of(i));
      ASSERT_LE(std::abs(got - exact), bound) << "index " << i;
    }
  }
}

TYPED_TEST(NcclTyped, ReduceScatterInPlaceOutOfPlaceAndNonBlocking) {
  using T = TypeParam;
  MPT_SKIP_WITHOUT_GPUS();
  NcclCommunicator& c = comm();
  const int n = c.size();
  const int r = c.rank();
  for (size_t slice : {size_t{1}, size_t{5}, size_t{1003}}) {
    const size_t total = slice * static_cast<size_t>(n);
    const auto host = make<T>(total, [&](size_t i) { return (r + 1) * k_of(i); });
    DeviceVec<T> send(host), out(slice), inplace(host), inplace_nb(host);
    c.reduce_scatter(send.get(), out.get(), slice, dtype_of<T>(), ReduceOp::sum);
    c.reduce_scatter(inplace.get(), inplace.get() + r * slice, slice, dtype_of<T>(), ReduceOp::sum);
    c.ireduce_scatter(inplace_nb.get(), inplace_nb.get() + r * slice, slice, dtype_of<T>(), ReduceOp::avg)
        ->wait();
    const auto o = out.download(), ip = inplace.download(), nb = inplace_nb.download();
    for (size_t j = 0; j < slice; ++j) {
      const size_t i = static_cast<size_t>(r) * slice + j;
      const float expected = static_cast<float>(k_of(i) * n * (n + 1) / 2);
      ASSERT_EQ(to_float(o[j]), expected) << "slice " << slice << " element " << j;
      ASSERT_EQ(to_float(ip[r * slice + j]), expected) << "in place, element " << j;
      const double mean = k_of(i) * (n + 1) / 2.0;
      ASSERT_LE(std::abs(to_float(nb[r * slice + j]) - mean),
                (2.0 * n) * epsilon_of<T>() * 8.0 * std::abs(k_of(i)))
          << "non-blocking avg, element " << j;
    }
  }
}

TYPED_TEST(NcclTyped, AllGatherAndBroadcast) {
  using T = TypeParam;
  MPT_SKIP_WITHOUT_GPUS();
  NcclCommunicator& c = comm();
  const int n = c.size();
  const int r = c.rank();
  const size_t count = 33;
  const auto mine_host = make<T>(count, [&](size_t i) { return r * 32 + static_cast<int>(i % 32); });
  std::vector<T> inplace_host(count * n, from_float<T>(-1.0f));
  std::copy(mine_host.begin(), mine_host.end(), inplace_host.begin() + r * count);
  DeviceVec<T> mine(mine_host), gathered(count * n), inplace(inplace_host), nb(count * n);
  c.all_gather(mine.get(), gathered.get(), count, dtype_of<T>());
  c.all_gather(inplace.get() + r * count, inplace.get(), count, dtype_of<T>());
  c.iall_gather(mine.get(), nb.get(), count, dtype_of<T>())->wait();
  const auto g = gathered.download(), ip = inplace.download(), b = nb.download();
  for (int q = 0; q < n; ++q)
    for (size_t i = 0; i < count; ++i) {
      const float expected = static_cast<float>(q * 32 + static_cast<int>(i % 32));
      ASSERT_EQ(to_float(g[q * count + i]), expected) << "rank " << q << " element " << i;
      ASSERT_EQ(to_float(ip[q * count + i]), expected) << "in place, rank " << q << " element " << i;
      ASSERT_EQ(to_float(b[q * count + i]), expected) << "non-blocking, rank " << q << " element " << i;
    }
  const int root = n - 1;
  DeviceVec<T> buf(make<T>(count, [&](size_t i) { return r == root ? static_cast<int>(i) - 7 : 999; }));
  c.broadcast(buf.get(), count, dtype_of<T>(), root);
  const auto h = buf.download();
  for (size_t i = 0; i < count; ++i) ASSERT_EQ(to_float(h[i]), static_cast<float>(static_cast<int>(i) - 7));
  c.barrier();
}

// NCCL's fp16 average multiplies by fp16(1/N) first: four ranks holding 20000 average to 20000 where the
// plain fp16 sum overflows.
TEST(NcclHalf, AverageDoesNotOverflowWhereSumDoes) {
  MPT_SKIP_WITHOUT_GPUS();
  NcclCommunicator& c = comm();
  const int n = c.size();
  DeviceVec<half> x(std::vector<half>(3, half(20000.0f))), avg(3), sum(3);
  c.all_reduce(x.get(), avg.get(), 3, DType::f16, ReduceOp::avg);
  c.all_reduce(x.get(), sum.get(), 3, DType::f16, ReduceOp::sum);
  const auto a = avg.download(), s = sum.download();
  for (int i = 0; i < 3; ++i) {
    if ((n & (n - 1)) == 0)
      EXPECT_EQ(to_float(a[i]), 20000.0f);
    else
      EXPECT_NEAR(to_float(a[i]), 20000.0f, 20000.0 * n * 2 * epsilon_of<half>());
    if (n >= 4)
      EXPECT_TRUE(std::isinf(to_float(s[i])));
    else
      EXPECT_EQ(to_float(s[i]), 20000.0f * static_cast<float>(n));
  }
}

// One combine rounds to fp16 once, ties to even; 40000 + 40000 overflows to inf.
TEST(NcclHalf, OneCombineRoundsToNearestEven) {
  MPT_SKIP_WITHOUT_GPUS();
  if (world_size() != 2) GTEST_SKIP() << "needs exactly 2 ranks (one combine per element)";
  NcclCommunicator& c = comm();
  const bool first = c.rank() == 0;
  DeviceVec<half> x(std::vector<half>{half(first ? 1.0f : std::ldexp(1.0f, -11)),
                                      half(first ? 1.0f : 3 * std::ldexp(1.0f, -11)), half(40000.0f),
                                      half(first ? 65504.0f : -65504.0f)});
  c.all_reduce(x.get(), x.get(), 4, DType::f16, ReduceOp::sum);
  const auto h = x.download();
  EXPECT_EQ(to_float(h[0]), 1.0f);
  EXPECT_EQ(to_float(h[1]), 1.0f + std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isinf(to_float(h[2])) && to_float(h[2]) > 0);
  EXPECT_EQ(to_float(h[3]), 0.0f);
}

// NaN wins a max in every float dtype, whichever rank holds it, in all-reduce and reduce-scatter; infinities,
// negative numbers and signed zeros keep their order.
TEST(NcclMax, NaNFromAnyRankWinsInEveryFloatDtype) {
  MPT_SKIP_WITHOUT_GPUS();
  NcclCommunicator& c = comm();
  const int n = c.size();
  const int r = c.rank();
  for (int holder = 0; holder < n; ++holder) {
    const bool mine = r == holder;
    DeviceVec<float> f(std::vector<float>{mine ? NAN : 1.0f + static_cast<float>(r),
                                          -3.0f - static_cast<float>(r), r == n - 1 ? -0.0f : -1.0f,
                                          mine ? -NAN : 2.0f});
    DeviceVec<double> d(std::vector<double>{mine ? NAN : 1.0 + r, -INFINITY});
    DeviceVec<half> h(
        std::vector<half>{half(mine ? NAN : 1.0f), half(mine ? INFINITY : -2.0f), half(float(-r))});
    DeviceVec<bf16> b(std::vector<bf16>{bf16(mine ? NAN : -1.0f), bf16(-5.0f - static_cast<float>(r))});
    c.all_reduce(f.get(), f.get(), 4, DType::f32, ReduceOp::max);
    c.all_reduce(d.get(), d.get(), 2, DType::f64, ReduceOp::max);
    c.all_reduce(h.get(), h.get(), 3, DType::f16, ReduceOp::max);
    c.all_reduce(b.get(), b.get(), 2, DType::bf16, ReduceOp::max);
    const auto fh = f.download();
    const auto dh = d.download();
    const auto hh = h.download();
    const auto bh = b.download();
    EXPECT_TRUE(std::isnan(fh[0])) << "NaN on rank " << holder;
    EXPECT_EQ(fh[1], -3.0f);
    EXPECT_EQ(fh[2], 0.0f);
    EXPECT_TRUE(std::signbit(fh[2])) << "max(-1, -0) is -0";
    EXPECT_TRUE(std::isnan(fh[3])) << "a negative NaN wins too";
    EXPECT_TRUE(std::isnan(dh[0]));
    EXPECT_TRUE(std::isinf(dh[1]) && dh[1] < 0);
    EXPECT_TRUE(std::isnan(to_float(hh[0])));
    EXPECT_TRUE(std::isinf(to_float(hh[1])) && to_float(hh[1]) > 0);
    EXPECT_EQ(to_float(hh[2]), 0.0f);
    EXPECT_TRUE(std::isnan(to_float(bh[0])));
    EXPECT_EQ(to_float(bh[1]), -5.0f);
  }
  // Reduce-scatter max, in place: NaN only in rank 0's copy of the last slice.
  const size_t slice = 3;
  std::vector<float> host(slice * n);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>(r) - static_cast<float>(i);
  if (r == 0) host[(n - 1) * slice + 1] = NAN;
  DeviceVec<float> v(host);
  c.reduce_scatter(v.get(), v.get() + r * slice, slice, DType::f32, ReduceOp::max);
  const auto got = v.download();
  for (size_t j = 0; j < slice; ++j) {
    const size_t i = r * slice + j;
    if (r == n - 1 && j == 1)
      EXPECT_TRUE(std::isnan(got[i]));
    else
      EXPECT_EQ(got[i], static_cast<float>(n - 1) - static_cast<float>(i)) << "element " << j;
  }
}

TEST(NcclMisc, IntegerAndDoubleCollectives) {
  MPT_SKIP_WITHOUT_GPUS();
  NcclCommunicator& c = comm();
  const int n = c.size();
  DeviceVec<int64_t> v(std::vector<int64_t>{c.rank(), 1});
  c.all_reduce(v.get(), v.get(), 2, DType::i64, ReduceOp::sum);
  DeviceVec<int32_t> m(std::vector<int32_t>{-c.rank(), c.rank()});
  c.all_reduce(m.get(), m.get(), 2, DType::i32, ReduceOp::max);
  DeviceVec<double> d(std::vector<double>{0.1 * c.rank()}), all(n);
  c.all_gather(d.get(), all.get(), 1, DType::f64);
  DeviceVec<uint8_t> bytes(std::vector<uint8_t>{static_cast<uint8_t>(200 + c.rank())}), all_bytes(n);
  c.all_gather(bytes.get(), all_bytes.get(), 1, DType::u8);
  const auto vh = v.download();
  const auto mh = m.download();
  const auto ah = all.download();
  const auto bh = all_bytes.download();
  EXPECT_EQ(vh[0], static_cast<int64_t>(n) * (n - 1) / 2);
  EXPECT_EQ(vh[1], n);
  EXPECT_EQ(mh[0], 0);
  EXPECT_EQ(mh[1], n - 1);
  for (int q = 0; q < n; ++q) {
    EXPECT_EQ(ah[q], 0.1 * q);
    EXPECT_EQ(bh[q], 200 + q);
  }
}

// Argument errors are found before anything is enqueued, identically on every rank.
TEST(NcclMisc, BadArgumentsThrowBeforeAnyCollective) {
  MPT_SKIP_WITHOUT_GPUS();
  NcclCommunicator& c = comm();
  DeviceVec<int64_t> v(2);
  DeviceVec<uint8_t> u(2);
  EXPECT_THROW(c.all_reduce(v.get(), v.get(), 2, DType::i64, ReduceOp::avg), Error);
  EXPECT_THROW(c.iall_reduce(v.get(), v.get(), 2, DType::i64, ReduceOp::avg), Error);
  EXPECT_THROW(c.all_reduce(u.get(), u.get(), 2, DType::u8, ReduceOp::sum), Error);
  EXPECT_THROW(c.all_reduce(nullptr, v.get(), 2, DType::i64, ReduceOp::sum), Error);
  EXPECT_THROW(c.broadcast(v.get(), 2, DType::i64, c.size()), Error);
  EXPECT_THROW(c.broadcast(v.get(), 2, DType::i64, -1), Error);
  // Element counts whose byte size overflows size_t (counts are elements, not bytes).
  EXPECT_THROW(c.all_reduce(v.get(), v.get(), SIZE_MAX / 4, DType::f32, ReduceOp::sum), Error);
  EXPECT_THROW(c.reduce_scatter(v.get(), v.get(), SIZE_MAX / 2, DType::i32, ReduceOp::sum), Error);
  EXPECT_THROW(c.all_gather(v.get(), v.get(), SIZE_MAX / 2, DType::u8), Error);
  EXPECT_THROW(c.set_timeout_seconds(-1), Error);
  EXPECT_THROW(c.set_timeout_seconds(NAN), Error);
  // Still usable afterwards.
  DeviceVec<int64_t> one(std::vector<int64_t>{1});
  c.all_reduce(one.get(), one.get(), 1, DType::i64, ReduceOp::sum);
  EXPECT_EQ(one.download()[0], c.size());
}

void CUDART_CB sleep_1s(void*) {
  std::this_thread::sleep_for(std::chrono::seconds(1));
}

// The collective must wait for work already on the compute stream, and later compute-stream work must see its
// result, with no host sync in between: the compute stream is held back by 1 s of host function before
// the input is written (1 s of host function), and the result is copied on the compute stream right after the
// call.
TEST(NcclStreams, CollectivesAreOrderedOnTheComputeStream) {
  MPT_SKIP_WITHOUT_GPUS();
  NcclCommunicator& c = comm();
  const int n = c.size();
  const size_t count = 4096;
  float* pinned = nullptr;
  MPT_CUDA_CHECK(cudaMallocHost(&pinned, count * sizeof(float)));
  for (size_t i = 0; i < count; ++i)
    pinned[i] = static_cast<float>(c.rank() + 1) * static_cast<float>(i % 64);
  DeviceVec<float> data(count), copy(count), gathered(count * n);
  for (const bool non_blocking : {false, true}) {
    data.upload(std::vector<float>(count, -1000.0f));  // what an unordered collective would read
    MPT_CUDA_CHECK(cudaStreamSynchronize(stream()));
    MPT_CUDA_CHECK(cudaLaunchHostFunc(stream(), sleep_1s, nullptr));
    MPT_CUDA_CHECK(
        cudaMemcpyAsync(data.get(), pinned, count * sizeof(float), cudaMemcpyHostToDevice, stream()));
    if (non_blocking) {
      auto request = c.iall_reduce(data.get(), data.get(), count, DType::f32, ReduceOp::sum);
      EXPECT_FALSE(request->test()) << "completed although the compute stream is still held back";
      request->wait();
    } else {
      c.all_reduce(data.get(), data.get(), count, DType::f32, ReduceOp::sum);
    }
    MPT_CUDA_CHECK(
        cudaMemcpyAsync(copy.get(), data.get(), count * sizeof(float), cudaMemcpyDeviceToDevice, stream()));
    c.all_gather(copy.get(), gathered.get(), count, DType::f32);
    const auto h = copy.download();
    const auto g = gathered.download();
    for (size_t i = 0; i < count; ++i) {
      const float expected = static_cast<float>(n * (n + 1) / 2) * static_cast<float>(i % 64);
      ASSERT_EQ(h[i], expected) << (non_blocking ? "non-blocking" : "blocking") << ", element " << i;
      for (int q = 0; q < n; ++q) ASSERT_EQ(g[q * count + i], expected) << "gathered from rank " << q;
    }
  }
  MPT_CUDA_CHECK(cudaFreeHost(pinned));
}

// ---- select_local_device ----------------------------------------------------------------------------------

TEST(SelectLocalDevice, NodeLocalRankModuloDevicesOrAClearError) {
  const int rank = world_rank();
  MPI_Comm node = MPI_COMM_NULL;
  ASSERT_EQ(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node),
            MPI_SUCCESS);
  int node_rank = 0, node_size = 1;
  MPI_Comm_rank(node, &node_rank);
  MPI_Comm_size(node, &node_size);
  MPI_Comm_free(&node);
  const int devices = cuda::device_count();
  if (devices == 0) {
    try {
      (void)select_local_device(MPI_COMM_WORLD);
      FAIL() << "no error without a CUDA device";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("no CUDA device"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("CUDA_VISIBLE_DEVICES"), std::string::npos) << e.what();
    }
  } else if (node_size > devices) {  // every rank sees the same devices here: two pick the same GPU
    try {
      (void)select_local_device(MPI_COMM_WORLD);
      FAIL() << node_size << " ranks share " << devices << " GPUs without an error";
    } catch (const InputError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(std::to_string(node_size) + " ranks"), std::string::npos) << what;
      EXPECT_NE(what.find("with " + std::to_string(devices) + " visible"), std::string::npos) << what;
      EXPECT_NE(what.find("CUDA_VISIBLE_DEVICES"), std::string::npos) << what;
    }
  } else {
    EXPECT_EQ(select_local_device(MPI_COMM_WORLD), node_rank % devices);
  }
}

TEST(SelectLocalDevice, MalformedLocalRankIsAnInputErrorOnEveryRank) {
  const char* old = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  const std::string saved = old ? old : "";
  ASSERT_EQ(setenv("OMPI_COMM_WORLD_LOCAL_RANK", world_rank() == 0 ? "1x" : "0", 1), 0);
  try {
    (void)select_local_device(MPI_COMM_WORLD);
    ADD_FAILURE() << "a malformed OMPI_COMM_WORLD_LOCAL_RANK on rank 0 was accepted";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("OMPI_COMM_WORLD_LOCAL_RANK=1x"), std::string::npos) << e.what();
  }
  if (old)
    setenv("OMPI_COMM_WORLD_LOCAL_RANK", saved.c_str(), 1);
  else
    unsetenv("OMPI_COMM_WORLD_LOCAL_RANK");
}

// ---- watchdog ---------------------------------------------------------------------------------------------

constexpr double kChildTimeoutSeconds = 2;
constexpr int kChildSleepSeconds = 30;  // how long the stall lasts if the watchdog does nothing

std::atomic<bool> g_release_stall{false};

// Holds the stream for kChildSleepSeconds, or until the process exits (the atexit handler releases it, so
// an exit through exit() does not wait for this callback in the CUDA runtime's teardown).
void CUDART_CB stall_stream(void*) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(kChildSleepSeconds);
  while (!g_release_stall.load() && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
}

// The child job of the watchdog tests (skipped unless started by them). Mode "stalled-stream": one rank whose
// compute stream is held by a host function, so its all-reduce cannot start. Mode "silent-peer": two ranks,
// rank 1 never joins rank 0's all-reduce. Either way the watchdog must end the job long before the stall
// ends.
TEST(NcclWatchdogChild, StalledCollective) {
  const char* mode_env = std::getenv("MPT_NCCL_WATCHDOG_CHILD");
  if (!mode_env) GTEST_SKIP() << "runs only as the child job of the NcclWatchdog tests";
  const std::string mode = mode_env;
  MPT_CUDA_CHECK(cudaSetDevice(select_local_device(MPI_COMM_WORLD)));
  cudaStream_t s = nullptr;
  MPT_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  NcclCommunicator c(MPI_COMM_WORLD, s);
  c.set_timeout_seconds(kChildTimeoutSeconds);
  float* buf = nullptr;
  MPT_CUDA_CHECK(cudaMalloc(&buf, 2 * sizeof(float)));
  MPT_CUDA_CHECK(cudaMemset(buf, 0, 2 * sizeof(float)));
  c.barrier();
  if (mode == "stalled-stream") {
    // Registered after CUDA's own handlers, so it runs before them.
    std::atexit([] { g_release_stall.store(true); });
    MPT_CUDA_CHECK(cudaLaunchHostFunc(s, stall_stream, nullptr));
  }
  std::fprintf(stderr, "watchdog child: rank %d issuing\n", c.rank());
  std::fflush(stderr);
  if (mode == "stalled-stream" || c.rank() == 0) {
    c.all_reduce(buf, buf, 2, DType::f32, ReduceOp::sum);
    MPT_CUDA_CHECK(cudaStreamSynchronize(s));
  } else {
    std::this_thread::sleep_for(std::chrono::seconds(kChildSleepSeconds));
  }
  ADD_FAILURE() << "the watchdog did not end the job";
}

struct ChildRun {
  std::string output;
  double issue_to_line_seconds = -1;  // from the child's "issuing" line to the watchdog's line
  double issue_to_exit_seconds = -1;
  bool exited = false;
  int status = 0;
};

/// Starts `ranks` ranks of this executable (only the child test) in `mode` under a fresh job of the launcher
/// found at run time (tests/child_job.hpp), reads their merged output with timestamps, and kills the job if
/// it outlives 90 s.
ChildRun run_child(const std::string& launcher, const std::string& mode, int ranks) {
  using Clock = std::chrono::steady_clock;
  std::optional<Clock::time_point> issued, line_seen;
  const test::ChildJobResult job =
      test::run_child_job(launcher, ranks, "NcclWatchdogChild.*", "MPT_NCCL_WATCHDOG_CHILD=" + mode, 90,
                          [&](const std::string& line) {
                            if (!issued && line.find("watchdog child: rank 0 issuing") != std::string::npos)
                              issued = Clock::now();
                            if (!line_seen && line.find("did not complete within") != std::string::npos)
                              line_seen = Clock::now();
                          });
  ChildRun run;
  run.output = job.output;
  run.exited = job.exited;
  run.status = job.status;
  if (issued && line_seen)
    run.issue_to_line_seconds = std::chrono::duration<double>(*line_seen - *issued).count();
  if (issued && run.exited)
    run.issue_to_exit_seconds = std::chrono::duration<double>(Clock::now() - *issued).count();
  return run;
}

void expect_watchdog_abort(const ChildRun& run) {
  EXPECT_NE(run.output.find("mptrain: rank 0 ("), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("): NCCL all_reduce of 2 f32 did not complete within 2 s; aborting"),
            std::string::npos)
      << run.output;
  size_t lines = 0;
  for (size_t at = 0; (at = run.output.find("did not complete within", at)) != std::string::npos; ++at)
    ++lines;
  EXPECT_EQ(lines, 1u) << "exactly one watchdog line\n" << run.output;
  // The watchdog looks every 100 ms: its line comes between the timeout and a little after.
  EXPECT_GE(run.issue_to_line_seconds, kChildTimeoutSeconds - 0.1) << run.output;
  EXPECT_LE(run.issue_to_line_seconds, kChildTimeoutSeconds + 3) << run.output;
  ASSERT_TRUE(run.exited) << "the job was still running after 90 s\n" << run.output;
  EXPECT_FALSE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << "the job exited cleanly\n"
                                                                      << run.output;
  // Abort (at most 5 s) and MPI's teardown: far less than the 30 s stall the job would otherwise take.
  EXPECT_LT(run.issue_to_exit_seconds, kChildTimeoutSeconds + 15) << run.output;
  EXPECT_EQ(run.output.find("the watchdog did not end the job"), std::string::npos) << run.output;
}

TEST(NcclWatchdog, AbortsACollectiveStalledBehindTheComputeStream) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  if (world_size() != 1) GTEST_SKIP() << "starts its own job; runs under mpiexec -n 1";
  std::string why_not;
  const std::string launcher = test::child_launcher(&why_not);
  if (launcher.empty()) GTEST_SKIP() << why_not;
  expect_watchdog_abort(run_child(launcher, "stalled-stream", 1));
}

TEST(NcclWatchdog, AbortsWhenOneRankNeverJoins) {
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  if (cuda::device_count() < 2) GTEST_SKIP() << "needs 2 CUDA devices";
  if (world_size() != 1) GTEST_SKIP() << "starts its own job; runs under mpiexec -n 1";
  std::string why_not;
  const std::string launcher = test::child_launcher(&why_not);
  if (launcher.empty()) GTEST_SKIP() << why_not;
  expect_watchdog_abort(run_child(launcher, "silent-peer", 2));
}

}  // namespace
}  // namespace mpt
