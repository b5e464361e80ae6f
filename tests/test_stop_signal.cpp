// The graceful-stop signals (mptrain/stop_signal.hpp): blocked in every thread started after
// block_stop_signals(), taken by the sigwait thread, and harmless to oneDNN GEMMs running on OpenMP threads
// while they arrive by the thousand. Before this design a SIGUSR1 handled on a thread inside oneDNN's f32
// GEMM kernel (gemm:jit, which points the stack pointer into a heap buffer) corrupted the heap.
#include <gtest/gtest.h>
#include <omp.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "cpu/onednn_gemm.hpp"
#include "mptrain/stop_signal.hpp"

namespace {

// As main() does, before any thread of this process exists (static initialisation, before gtest's main and
// the first OpenMP region): every thread started later inherits the block.
const bool g_blocked = (mpt::block_stop_signals(), true);

bool sigusr1_blocked_here() {
  sigset_t current;
  pthread_sigmask(SIG_BLOCK, nullptr, &current);
  return sigismember(&current, SIGUSR1) == 1;
}

TEST(StopSignal, EveryThreadStartedAfterTheBlockInheritsIt) {
  ASSERT_TRUE(g_blocked);
  EXPECT_TRUE(sigusr1_blocked_here());
  bool in_thread = false;
  std::thread([&] { in_thread = sigusr1_blocked_here(); }).join();
  EXPECT_TRUE(in_thread);
  std::vector<int> in_omp(4, 0);
#pragma omp parallel num_threads(4)
  in_omp[static_cast<size_t>(omp_get_thread_num())] = sigusr1_blocked_here() ? 1 : 0;
  for (size_t t = 0; t < in_omp.size(); ++t) EXPECT_EQ(in_omp[t], 1) << "OpenMP thread " << t;
}

TEST(StopSignal, SigusrOneToTheProcessIsRecorded) {
  mpt::watch_stop_signals();
  mpt::watch_stop_signals();  // idempotent: one waiting thread
  ASSERT_EQ(kill(getpid(), SIGUSR1), 0);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (mpt::stop_signal() == 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(mpt::stop_signal(), SIGUSR1);
  EXPECT_STREQ(mpt::stop_signal_name(mpt::stop_signal()), "SIGUSR1");
  EXPECT_STREQ(mpt::stop_signal_name(SIGTERM), "SIGTERM");
  EXPECT_STREQ(mpt::stop_signal_name(SIGINT), "signal");
}

/// One GEMM of the step through oneDNN: C[M,N] = op(A) op(B), op(X) = Xᵀ when trans_x, A and B with the
/// leading dimensions the linear layer gives them (a row block of a transposed A has lda > M).
struct Gemm {
  bool trans_a, trans_b;
  int64_t M, N, K, lda, ldb;
  std::vector<float> a, b, reference;
  void run(std::vector<float>& c) const {
    mpt::cpu::onednn_gemm<float>(trans_a, trans_b, M, N, K, a.data(), lda, b.data(), ldb, 0.0f, c.data(), N);
  }
};

Gemm make_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb) {
  Gemm g{trans_a,
         trans_b,
         M,
         N,
         K,
         lda,
         ldb,
         std::vector<float>(static_cast<size_t>((trans_a ? K : M) * lda)),
         std::vector<float>(static_cast<size_t>((trans_b ? N : K) * ldb)),
         std::vector<float>(static_cast<size_t>(M * N))};
  uint32_t x = 12345;
  const auto next = [&x] {
    x = x * 1664525u + 1013904223u;
    return static_cast<float>(x >> 8) / 16777216.0f - 0.5f;
  };
  for (float& v : g.a) v = next();
  for (float& v : g.b) v = next();
    // Inside a parallel region, as the storm's GEMMs run: oneDNN on the calling thread alone (its own
    // threading may sum K in another order, e.g. its AVX2 kernels).
#pragma omp parallel num_threads(2)
#pragma omp single
  g.run(g.reference);
  return g;
}

// A SIGUSR1 storm at the process while 2 OpenMP threads run oneDNN GEMMs, with the shapes and strides of the
// fault test that crashed, on which oneDNN picks its gemm:jit kernels: a weight-gradient row block (64 of
// 128 rows, A transposed, lda 128) and an A Bᵀ product 128 x 64 x 32 (lda, ldb 96, as in the packed QKV); and
// one of its brgemm kernels (256 x 384 x 128). Every result stays bitwise the reference, and the process
// lives. With a handler on the compute threads instead (no block), this aborted with a corrupted heap.
TEST(StopSignal, StormOfSignalsLeavesOnednnGemmsIntact) {
  mpt::watch_stop_signals();
  const std::vector<Gemm> gemms = {make_gemm(true, false, 64, 32, 128, 128, 32),
                                   make_gemm(false, true, 128, 64, 32, 96, 96),
                                   make_gemm(false, false, 256, 384, 128, 128, 384)};
  std::atomic<bool> done{false};
  std::atomic<long> sent{0};
  std::thread sender([&] {
    while (!done.load()) {
      if (kill(getpid(), SIGUSR1) == 0) sent.fetch_add(1);
    }
  });
  std::atomic<long> wrong{0}, runs{0};
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
#pragma omp parallel num_threads(2)
  {
    std::vector<float> c;
    while (std::chrono::steady_clock::now() < until) {
      for (const Gemm& g : gemms) {
        c.assign(g.reference.size(), 0.0f);
        g.run(c);
        runs.fetch_add(1);
        if (std::memcmp(c.data(), g.reference.data(), c.size() * sizeof(float)) != 0) wrong.fetch_add(1);
      }
    }
  }
  done = true;
  sender.join();
  std::printf("%ld GEMMs on 2 threads under %ld SIGUSR1s\n", runs.load(), sent.load());
  EXPECT_GT(sent.load(), 1000);
  EXPECT_GT(runs.load(), 100);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(mpt::stop_signal(), SIGUSR1);
}

}  // namespace
