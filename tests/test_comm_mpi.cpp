// MpiCommunicator tests, run under mpiexec -n 1..4. Inputs are derived from the rank so every expected
// result is known exactly (partial sums exactly representable in the dtype), or bounded in units of the
// dtype's epsilon where the per-combine rounding of fp16/bf16 makes the result depend on the order.
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "comm_test_support.hpp"
#include "mptrain/comm_mpi.hpp"

namespace mpt {
namespace {

using test::epsilon_of;
using test::k_of;
using test::make;

template <typename T>
class CommTyped : public ::testing::Test {};
TYPED_TEST_SUITE(CommTyped, test::FloatTypes);

TYPED_TEST(CommTyped, AllReduceSumMaxExactBlockingAndNonBlocking) {
  using T = TypeParam;
  MpiCommunicator comm;
  const int n = comm.size();
  const int r = comm.rank();
  for (size_t count : {size_t{1}, size_t{7}, size_t{1031}}) {
    auto send = make<T>(count, [&](size_t i) { return (r + 1) * k_of(i); });
    std::vector<T> out(count), inplace = send, nb(count);
    comm.all_reduce(send.data(), out.data(), count, dtype_of<T>(), ReduceOp::sum);
    comm.all_reduce(inplace.data(), inplace.data(), count, dtype_of<T>(), ReduceOp::sum);
    comm.iall_reduce(send.data(), nb.data(), count, dtype_of<T>(), ReduceOp::sum)->wait();
    for (size_t i = 0; i < count; ++i) {
      const float expected = static_cast<float>(k_of(i) * n * (n + 1) / 2);
      ASSERT_EQ(to_float(out[i]), expected) << "count " << count << " index " << i;
      ASSERT_EQ(to_float(inplace[i]), expected) << "in place, index " << i;
      ASSERT_EQ(to_float(nb[i]), expected) << "non-blocking, index " << i;
    }
    std::vector<T> mx(count);
    comm.all_reduce(send.data(), mx.data(), count, dtype_of<T>(), ReduceOp::max);
    for (size_t i = 0; i < count; ++i) {
      const float expected = static_cast<float>(k_of(i) >= 0 ? n * k_of(i) : k_of(i));
      ASSERT_EQ(to_float(mx[i]), expected) << "max, index " << i;
    }
  }
}

TYPED_TEST(CommTyped, AverageIsPreMultipliedSum) {
  using T = TypeParam;
  MpiCommunicator comm;
  const int n = comm.size();
  const int r = comm.rank();
  const size_t count = 257;
  auto send = make<T>(count, [&](size_t i) { return (r + 1) * k_of(i) * 0.5; });
  std::vector<T> avg(count);
  comm.all_reduce(send.data(), avg.data(), count, dtype_of<T>(), ReduceOp::avg);
  const bool power_of_two = (n & (n - 1)) == 0;
  for (size_t i = 0; i < count; ++i) {
    const double exact = k_of(i) * 0.5 * (n + 1) / 2.0;  // mean of (r+1)*k/2 over r
    const double got = to_float(avg[i]);
    if (power_of_two) {
      ASSERT_EQ(got, exact) << "index " << i;  // 1/N and every partial sum are exact
    } else {
      // N roundings of x*fp(1/N) plus N-1 roundings of partial sums, each <= eps/2 relative to <= 4*|x|.
      const double bound = (2.0 * n) * epsilon_of<T>() * 4.0 * std::abs(k_of(i));
      ASSERT_LE(std::abs(got - exact), bound) << "index " << i;
    }
  }
}

TYPED_TEST(CommTyped, ReduceScatterInPlaceOutOfPlaceAndNonBlocking) {
  using T = TypeParam;
  MpiCommunicator comm;
  const int n = comm.size();
  const int r = comm.rank();
  for (size_t slice : {size_t{1}, size_t{5}, size_t{1003}}) {
    const size_t total = slice * static_cast<size_t>(n);
    auto send = make<T>(total, [&](size_t i) { return (r + 1) * k_of(i); });
    std::vector<T> out(slice);
    comm.reduce_scatter(send.data(), out.data(), slice, dtype_of<T>(), ReduceOp::sum);
    auto inplace = send;
    comm.reduce_scatter(inplace.data(), inplace.data() + r * slice, slice, dtype_of<T>(), ReduceOp::sum);
    auto inplace_nb = send;
    comm.ireduce_scatter(inplace_nb.data(), inplace_nb.data() + r * slice, slice, dtype_of<T>(),
                         ReduceOp::avg)
        ->wait();
    for (size_t j = 0; j < slice; ++j) {
      const size_t i = static_cast<size_t>(r) * slice + j;
      const float expected = static_cast<float>(k_of(i) * n * (n + 1) / 2);
      ASSERT_EQ(to_float(out[j]), expected) << "slice " << slice << " element " << j;
      ASSERT_EQ(to_float(inplace[r * slice + j]), expected) << "in place, element " << j;
      const double mean = k_of(i) * (n + 1) / 2.0;
      const double got = to_float(inplace_nb[r * slice + j]);
      ASSERT_LE(std::abs(got - mean), (2.0 * n) * epsilon_of<T>() * 8.0 * std::abs(k_of(i)))
          << "non-blocking avg, element " << j;
    }
  }
}

TYPED_TEST(CommTyped, AllGatherAndBroadcast) {
  using T = TypeParam;
  MpiCommunicator comm;
  const int n = comm.size();
  const int r = comm.rank();
  const size_t count = 33;
  auto mine = make<T>(count, [&](size_t i) { return r * 32 + static_cast<int>(i % 32); });  // exact in bf16
  std::vector<T> gathered(count * n), inplace(count * n), nb(count * n);
  comm.all_gather(std::span<const T>(mine), std::span<T>(gathered));
  std::copy(mine.begin(), mine.end(), inplace.begin() + r * count);
  comm.all_gather(inplace.data() + r * count, inplace.data(), count, dtype_of<T>());
  comm.iall_gather(mine.data(), nb.data(), count, dtype_of<T>())->wait();
  for (int q = 0; q < n; ++q)
    for (size_t i = 0; i < count; ++i) {
      const float expected = static_cast<float>(q * 32 + static_cast<int>(i % 32));
      ASSERT_EQ(to_float(gathered[q * count + i]), expected);
      ASSERT_EQ(to_float(inplace[q * count + i]), expected);
      ASSERT_EQ(to_float(nb[q * count + i]), expected);
    }
  const int root = n - 1;
  auto buf = make<T>(count, [&](size_t i) { return r == root ? static_cast<int>(i) - 7 : 999; });
  comm.broadcast(std::span<T>(buf), root);
  for (size_t i = 0; i < count; ++i) ASSERT_EQ(to_float(buf[i]), static_cast<float>(static_cast<int>(i) - 7));
  comm.barrier();
}

// NCCL-style fp16 average: every contribution is first multiplied by fp16(1/N), so four ranks holding 20000
// average to 20000 where a plain fp16 sum overflows (80000 > 65504).
TEST(CommHalf, AverageDoesNotOverflowWhereSumDoes) {
  MpiCommunicator comm;
  const int n = comm.size();
  std::vector<half> x(3, half(20000.0f)), avg(3), sum(3);
  comm.all_reduce(x.data(), avg.data(), 3, DType::f16, ReduceOp::avg);
  comm.all_reduce(x.data(), sum.data(), 3, DType::f16, ReduceOp::sum);
  for (int i = 0; i < 3; ++i) {
    if ((n & (n - 1)) == 0)
      EXPECT_EQ(to_float(avg[i]), 20000.0f);
    else
      EXPECT_NEAR(to_float(avg[i]), 20000.0f, 20000.0 * n * 2 * epsilon_of<half>());
    if (n >= 4)
      EXPECT_TRUE(std::isinf(to_float(sum[i])));
    else
      EXPECT_EQ(to_float(sum[i]), 20000.0f * static_cast<float>(n));
  }
}

// One combine rounds to fp16 once, ties to even: 1 + 2^-11 -> 1, 1 + 3*2^-11 -> 1 + 2^-9; and 40000 + 40000
// overflows to inf. With two ranks every element is exactly one combine.
TEST(CommHalf, OneCombineRoundsToNearestEven) {
  MpiCommunicator comm;
  if (comm.size() != 2) GTEST_SKIP() << "needs exactly 2 ranks (one combine per element)";
  const float small = comm.rank() == 0 ? 1.0f : std::ldexp(1.0f, -11);
  const float three = comm.rank() == 0 ? 1.0f : 3 * std::ldexp(1.0f, -11);
  std::vector<half> x = {half(small), half(three), half(40000.0f),
                         half(comm.rank() == 0 ? 65504.0f : -65504.0f)};
  comm.all_reduce(std::span<half>(x), ReduceOp::sum);
  EXPECT_EQ(to_float(x[0]), 1.0f);
  EXPECT_EQ(to_float(x[1]), 1.0f + std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isinf(to_float(x[2])) && to_float(x[2]) > 0);
  EXPECT_EQ(to_float(x[3]), 0.0f);
}

TEST(CommHalf, MaxPropagatesNaNAndInf) {
  MpiCommunicator comm;
  const int r = comm.rank();
  const int last = comm.size() - 1;
  std::vector<half> x = {half(r == last ? NAN : 1.0f), half(r == last ? INFINITY : -2.0f), half(float(-r))};
  comm.all_reduce(std::span<half>(x), ReduceOp::max);
  EXPECT_TRUE(std::isnan(to_float(x[0])));
  EXPECT_TRUE(std::isinf(to_float(x[1])));
  EXPECT_EQ(to_float(x[2]), 0.0f);
}

// NaN wins a max in every float dtype, whichever rank holds it.
TEST(CommMisc, MaxPropagatesNaNFromAnyRankInF32AndF64) {
  MpiCommunicator comm;
  for (int holder = 0; holder < comm.size(); ++holder) {
    std::vector<float> f = {comm.rank() == holder ? NAN : 1.0f + static_cast<float>(comm.rank())};
    std::vector<double> d = {comm.rank() == holder ? NAN : 1.0 + comm.rank()};
    comm.all_reduce(std::span<float>(f), ReduceOp::max);
    comm.all_reduce(std::span<double>(d), ReduceOp::max);
    EXPECT_TRUE(std::isnan(f[0])) << "NaN on rank " << holder;
    EXPECT_TRUE(std::isnan(d[0])) << "NaN on rank " << holder;
  }
}

TEST(CommMisc, IntegerAndDoubleCollectives) {
  MpiCommunicator comm;
  const int n = comm.size();
  std::vector<int64_t> v = {comm.rank(), 1};
  comm.all_reduce(std::span<int64_t>(v), ReduceOp::sum);
  EXPECT_EQ(v[0], static_cast<int64_t>(n) * (n - 1) / 2);
  EXPECT_EQ(v[1], n);
  std::vector<double> d = {0.1 * comm.rank()};
  std::vector<double> all(n);
  comm.all_gather(std::span<const double>(d), std::span<double>(all));
  for (int q = 0; q < n; ++q) EXPECT_EQ(all[q], 0.1 * q);
  EXPECT_THROW(comm.all_reduce(v.data(), v.data(), 2, DType::i64, ReduceOp::avg), Error);
}

// The collective watchdog turns every blocking collective into its non-blocking twin polled under a
// deadline: results must equal those of the plain blocking path, for every collective and both request
// completions (wait and a test() loop). The inputs are small integers so that every sum is exact: MPI's
// blocking and non-blocking algorithms may combine in different orders, which changes fp16 roundings of
// inexact sums (as NCCL's ring and tree do). A frozen rank (the watchdog firing) is tested end to end in
// tests/reliability/faults.py (watchdog_sigstop), since MPI_Abort ends the whole job.
TEST(CommWatchdog, SameResultsWithTheWatchdogOn) {
  MpiCommunicator plain, guarded;
  guarded.set_timeout_seconds(120.0);
  EXPECT_EQ(guarded.timeout_seconds(), 120.0);
  EXPECT_EQ(plain.timeout_seconds(), 0.0);
  const int n = plain.size();
  const int r = plain.rank();
  const size_t count = 1031;
  auto input = make<half>(count * static_cast<size_t>(n), [&](size_t i) { return (r + 1) * k_of(i); });
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::max}) {
    SCOPED_TRACE(std::string(reduce_op_name(op)));
    std::vector<half> a(input.size()), b(input.size());
    plain.all_reduce(input.data(), a.data(), input.size(), DType::f16, op);
    guarded.all_reduce(input.data(), b.data(), input.size(), DType::f16, op);
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(half))) << "all_reduce";
    std::vector<half> c(count), d(count);
    plain.reduce_scatter(input.data(), c.data(), count, DType::f16, op);
    guarded.reduce_scatter(input.data(), d.data(), count, DType::f16, op);
    EXPECT_EQ(0, std::memcmp(c.data(), d.data(), c.size() * sizeof(half))) << "reduce_scatter";
    std::vector<half> in_place = input;  // in place: rank r's slice is where the result lands
    guarded.reduce_scatter(in_place.data(), in_place.data() + static_cast<size_t>(r) * count, count,
                           DType::f16, op);
    EXPECT_EQ(0,
              std::memcmp(c.data(), in_place.data() + static_cast<size_t>(r) * count, count * sizeof(half)))
        << "in-place reduce_scatter";
    std::vector<half> e(count);
    auto request = guarded.ireduce_scatter(input.data(), e.data(), count, DType::f16, op);
    while (!request->test()) {
    }
    EXPECT_EQ(0, std::memcmp(c.data(), e.data(), c.size() * sizeof(half))) << "ireduce_scatter + test()";
    std::vector<half> f(input.size());
    guarded.iall_reduce(input.data(), f.data(), input.size(), DType::f16, op)->wait();
    EXPECT_EQ(0, std::memcmp(a.data(), f.data(), a.size() * sizeof(half))) << "iall_reduce + wait()";
  }
  std::vector<int64_t> mine = {r, 10 * r}, all(2 * static_cast<size_t>(n)), all_nb(all.size());
  guarded.all_gather(std::span<const int64_t>(mine), std::span<int64_t>(all));
  guarded.iall_gather(mine.data(), all_nb.data(), 2, DType::i64)->wait();
  for (int q = 0; q < n; ++q) {
    EXPECT_EQ(all[2 * static_cast<size_t>(q)], q);
    EXPECT_EQ(all[2 * static_cast<size_t>(q) + 1], 10 * q);
  }
  EXPECT_EQ(all, all_nb);
  std::vector<double> value = {r == n - 1 ? 2.5 : 0.0};
  guarded.broadcast(std::span<double>(value), n - 1);
  EXPECT_EQ(value[0], 2.5);
  guarded.barrier();
}

// A timeout given to the constructor guards the duplication itself (MPI_Comm_idup polled under the deadline):
// the result is a communicator congruent with the parent but distinct from it, with the watchdog armed. Its
// firing (a rank that never reaches the first collective) is tested end to end in
// tests/reliability/faults.py (startup_watchdog) and tests/multihost (decoy_interface).
TEST(CommWatchdog, TheConstructorsTimeoutGuardsTheDuplication) {
  MpiCommunicator guarded(MPI_COMM_WORLD, 120.0);
  EXPECT_EQ(guarded.timeout_seconds(), 120.0);
  int relation = MPI_UNEQUAL;
  ASSERT_EQ(MPI_Comm_compare(guarded.handle(), MPI_COMM_WORLD, &relation), MPI_SUCCESS);
  EXPECT_EQ(relation, MPI_CONGRUENT);
  int world_rank = -1, world_size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  EXPECT_EQ(guarded.rank(), world_rank);
  EXPECT_EQ(guarded.size(), world_size);
  std::vector<int64_t> v = {guarded.rank() + 1};
  guarded.all_reduce(std::span<int64_t>(v), ReduceOp::sum);
  EXPECT_EQ(v[0], static_cast<int64_t>(world_size) * (world_size + 1) / 2);
  EXPECT_THROW(MpiCommunicator(MPI_COMM_WORLD, -1.0), Error);
  EXPECT_THROW(MpiCommunicator(MPI_COMM_WORLD, NAN), Error);
}

TEST(CommWatchdog, RejectsANegativeOrNonFiniteTimeout) {
  MpiCommunicator comm;
  EXPECT_THROW(comm.set_timeout_seconds(-1.0), Error);
  EXPECT_THROW(comm.set_timeout_seconds(NAN), Error);
  EXPECT_THROW(comm.set_timeout_seconds(INFINITY), Error);
  comm.set_timeout_seconds(0.0);  // off
  EXPECT_EQ(comm.timeout_seconds(), 0.0);
}

}  // namespace
}  // namespace mpt
