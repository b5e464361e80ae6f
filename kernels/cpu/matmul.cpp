// CPU linear layer (torch.nn.Linear): out = inp @ weight^T + bias and its backward. The FP32 GEMMs run on
// oneDNN's f32 matmul on an AVX-512 CPU (kernels/cpu/onednn_gemm.hpp; MPTRAIN_ONEDNN_F32=0 opts out), else
// on OpenBLAS SGEMM (DGEMM for double), cut into fixed blocks of C (gemm_split: from the shape alone), each
// block one single-threaded library call in our own OpenMP loop, so no result depends on the thread count
// (see docs/DESIGN.md for why the libraries' own threading is not used there). BF16 runs on oneDNN's native
// BF16 matmul where the CPU has AVX512_BF16 or AMX (FP32 accumulation, results into FP32 scratch, then the
// same single rounding as the FP32-copy path), on oneDNN's own threading.
//
// float and double run the GEMMs on the operands directly. FP16/BF16 follow the numerics contract
// (DESIGN.md): the operands are widened to FP32 in the caller's grow-only workspace with the SIMD bulk
// converters, the FP32 GEMM accumulates in FP32, and each result is rounded once to the storage type (for
// gradients: g = round(g + result), so FP16 results with |x| >= 65520 become inf exactly as on a GPU). The
// forward's bias is added by the GEMM itself (oneDNN's bias argument, or C prefilled with it and beta = 1 on
// OpenBLAS): one rounding of sum + bias. The bias gradient is a column sum in FP32 (FP64 for double) over
// fixed column chunks, each summed in row order, so it does not depend on the thread count.
//
// Fused GELU (the MLP's c_fc and c_proj): matmul_gelu_forward applies the GELU in the bias pass over each
// output row, and matmul_backward_gelu multiplies the input-gradient GEMM result by GELU' in one chunked pass
// that overwrites dpre. Both keep every rounding of the unfused sequence (output rounded to the storage type,
// GELU from the stored value; the FP16 input gradient rounded before the GELU' product, so |x| >= 65520 still
// becomes inf there), so the results are bitwise those of the separate ops, minus two passes over [rows, OC]
// forward and a zero-fill, a read-modify-write and a buffer of [rows, IC] backward.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <exception>
#include <type_traits>

#include <cblas.h>

#include "common/gelu.hpp"
#include "cpu/onednn_gemm.hpp"
#include "cpu/ops.hpp"
#include "cpu/vecmath.hpp"
#include "mptrain/error.hpp"

namespace mpt::cpu {

namespace {

constexpr int64_t kConvertChunk = int64_t{1} << 15;  // elements per thread task in bulk conversions
constexpr int64_t kBiasColumns = 64;                 // columns per task in the bias-gradient column sums
// Below this many elements an elementwise pass stays on the calling thread: waking the OpenMP team costs more
// than it saves, and on a loaded machine a descheduled worker stalls the whole join.
constexpr int64_t kParallelMinElements = int64_t{1} << 15;
/// blas_gemm's split of C outside a parallel region: at most this many blocks, of at least this many rows
/// (or columns), so each block's packing of the shared operand is amortised over enough work.
constexpr int64_t kGemmMaxBlocks = 8;
constexpr int64_t kGemmMinBlock = 64;

/// Widens n stored values to FP32 with the SIMD converters, in fixed chunks across threads.
template <typename T>
void widen(const T* src, float* dst, int64_t n) {
  const int64_t chunks = (n + kConvertChunk - 1) / kConvertChunk;
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kConvertChunk;
    convert(src + begin, dst + begin, static_cast<size_t>(std::min(kConvertChunk, n - begin)));
  }
}

/// g[i] = round(g[i] + r[i]) for n elements: the existing gradient is widened, the FP32 result added, and the
/// sum rounded once to T.
template <typename T>
void accumulate_rounded(T* g, const float* r, int64_t n) {
  constexpr int64_t kChunk = 2048;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk;
    const auto count = static_cast<size_t>(std::min(kChunk, n - begin));
    float sum[kChunk];
    convert(g + begin, sum, count);
    for (size_t i = 0; i < count; ++i) sum[i] += r[static_cast<size_t>(begin) + i];
    convert(sum, g + begin, count);
  }
}

/// One single-threaded BLAS call (the caller is inside a parallel region, or runs alone).
template <typename S>
void blas_call(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, S alpha, const S* A, int64_t lda,
               const S* B, int64_t ldb, S beta, S* C, int64_t ldc) {
  const auto i = [](int64_t x) { return static_cast<int>(x); };
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = trans_b ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<S, float>)
    cblas_sgemm(CblasRowMajor, ta, tb, i(M), i(N), i(K), alpha, A, i(lda), B, i(ldb), beta, C, i(ldc));
  else
    cblas_dgemm(CblasRowMajor, ta, tb, i(M), i(N), i(K), alpha, A, i(lda), B, i(ldb), beta, C, i(ldc));
}

/// The fixed split of a GEMM outside a parallel region: C's rows (when M >= N, else its columns) cut into
/// `count` blocks of `size` (the last one shorter), from the shape alone: at most kGemmMaxBlocks, of at least
/// kGemmMinBlock rows (or columns), so each block's packing of the operand all blocks share is amortised.
struct GemmSplit {
  bool rows;
  int64_t size;
  int64_t count;
};
GemmSplit gemm_split(int64_t M, int64_t N) {
  const bool rows = M >= N;
  const int64_t extent = rows ? M : N;
  const int64_t per_block = (extent + kGemmMaxBlocks - 1) / kGemmMaxBlocks;
  const int64_t size = std::max(kGemmMinBlock, (per_block + 15) / 16 * 16);
  return {rows, size, (extent + size - 1) / size};
}

/// One block of C = op(A) op(B) as for_each_gemm_block cuts it: M x N of C at C, the matching rows of op(A)
/// (at A) and columns of op(B) (at B), with the whole GEMM's leading dimensions; `column` is the block's
/// first column of C (for a bias per column).
template <typename SA, typename SC>
struct GemmBlock {
  int64_t M, N;
  const SA* A;
  const SA* B;
  SC* C;
  int64_t column;
};

/// Calls block(GemmBlock) for every block of gemm_split(M, N) of C = op(A) op(B) (op(X) = Xᵀ when tx):
/// spread over the OpenMP threads, or one after another on the calling thread inside an active parallel
/// region (attention's per-head GEMMs), so a GEMM is the same library calls on the same blocks whatever the
/// thread count and whether its caller's region is active (with 1 thread it is not). Each block must be
/// computed by single-threaded library calls, which is what OpenBLAS and oneDNN do inside a parallel region.
/// An exception a block throws (oneDNN rejecting a call) is rethrown after the loop.
template <typename SA, typename SC, typename Block>
void for_each_gemm_block(bool ta, bool tb, int64_t M, int64_t N, const SA* A, int64_t lda, const SA* B,
                         int64_t ldb, SC* C, int64_t ldc, Block&& block) {
  const GemmSplit split = gemm_split(M, N);
  const int64_t extent = split.rows ? M : N;
  const auto run = [&](int64_t b) {
    const int64_t begin = b * split.size;
    const int64_t n = std::min(split.size, extent - begin);
    if (split.rows)  // rows [begin, begin + n) of C and of op(A)
      block(GemmBlock<SA, SC>{n, N, ta ? A + begin : A + begin * lda, B, C + begin * ldc, 0});
    else  // columns [begin, begin + n) of C and of op(B)
      block(GemmBlock<SA, SC>{M, n, A, tb ? B + begin * ldb : B + begin, C + begin, begin});
  };
  if (omp_in_parallel()) {
    for (int64_t b = 0; b < split.count; ++b) run(b);
    return;
  }
  std::exception_ptr error;
  // Always a parallel region, even for one block: inside an active one the libraries run on the calling
  // thread, outside it they would use their own threading (with 1 thread the region is inactive, and so is
  // their threading).
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < split.count; ++b) {
    try {
      run(b);
    } catch (...) {
#pragma omp critical(mpt_gemm_block_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

/// Runs gemm() and adds its wall time to gemm_seconds() (mptrain/cpu_profile.hpp).
template <typename Gemm>
void timed_gemm(Gemm&& gemm) {
  const auto t0 = std::chrono::steady_clock::now();
  gemm();
  record_gemm_nanoseconds(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
}

/// Every row of c[rows,OC] = bias[OC]: the C of a beta = 1 GEMM, so the bias is added by the GEMM kernel
/// itself (C = A B + C) instead of in a pass of its own, and OpenBLAS skips the zero-fill it does for beta =
/// 0 (sgemm_beta, 4% of the FP32 step). Where the GEMM sums K in one block (K <= 320 or so in OpenBLAS's
/// AVX-512/AVX2 SGEMM, which covers K = C and K = 3C of the default model), each output is round(sum + bias),
/// bitwise the product-then-bias result; with K split into blocks the bias joins the first block's partial
/// sum, a different (equally deterministic, thread-count independent where the GEMM is) rounding.
template <typename S>
void prefill_bias(S* c, const S* bias, int64_t rows, int64_t OC, int64_t ldc) {
#pragma omp parallel for schedule(static) if (rows * OC >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) std::memcpy(c + r * ldc, bias, static_cast<size_t>(OC) * sizeof(S));
}

/// onednn_gemm over the fixed blocks of C (for_each_gemm_block), one single-threaded matmul per block: FP32
/// C[M,N] = op(A) op(B) + beta C (+ bias[N] on every row when bias is given), S float or bf16.
template <typename S>
void onednn_blocks(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* B,
                   int64_t ldb, float beta, float* C, int64_t ldc, const float* bias = nullptr) {
  timed_gemm([&] {
    for_each_gemm_block(ta, tb, M, N, A, lda, B, ldb, C, ldc, [&](const GemmBlock<S, float>& b) {
      onednn_gemm<S>(ta, tb, b.M, b.N, K, b.A, lda, b.B, ldb, beta, b.C, ldc,
                     bias != nullptr ? bias + b.column : nullptr);
    });
  });
}

/// onednn_gemm with beta = 0 on oneDNN's own threading, timed for gemm_seconds(): the native BF16 path (as in
/// the previous rounds; the fixed blocks are used only for FP32, see onednn_f32_preferred).
template <typename S>
void onednn_timed(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* B,
                  int64_t ldb, float* C, int64_t ldc) {
  timed_gemm([&] { onednn_gemm<S>(ta, tb, M, N, K, A, lda, B, ldb, 0.0f, C, ldc); });
}

/// The linear layer's GEMMs (C = op(A) op(B) + beta C, beta 0 or 1). FP32 runs on oneDNN's f32 matmul where
/// it is the faster library (onednn_f32_preferred), else, and FP64, on blas_gemm. oneDNN runs over the same
/// fixed blocks of C as blas_gemm, one single-threaded matmul per block, so the result does not depend on the
/// thread count: left to its own threading, oneDNN splits a weight gradient's long K over the threads and
/// sums the parts in a thread-count dependent order (MatmulDeterminism). oneDNN's sum post-op adds C to the
/// finished FP32 sum, so with beta = 1 each output is round(sum + C), as OpenBLAS gives for K in one block.
///
/// With `bias` ([N], forward only; beta must be 0) every row of C also gets + bias in the same single
/// rounding: oneDNN's bias argument, or on BLAS the bias rows as C with beta = 1 (prefill_bias).
template <typename S>
void gemm(CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int64_t M, int64_t N, int64_t K, const S* A,
          int64_t lda, const S* B, int64_t ldb, S beta, S* C, int64_t ldc, const S* bias = nullptr) {
  const bool ta = trans_a == CblasTrans, tb = trans_b == CblasTrans;
  if constexpr (std::is_same_v<S, float>) {
    if (M > 0 && N > 0 && K > 0 && onednn_f32_preferred()) {
      onednn_blocks(ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc, bias);
      return;
    }
  }
  if (bias != nullptr) {
    prefill_bias(C, bias, M, N, ldc);
    beta = S(1);
  }
  blas_gemm<S>(ta, tb, M, N, K, S(1), A, lda, B, ldb, beta, C, ldc);
}

/// dbias[j] = round(dbias[j] + sum over rows of x[r, j]), summed in opmath. Each task owns a fixed chunk of
/// columns and adds whole contiguous row segments into its accumulators, in row order.
template <typename T>
void add_column_sums(T* dbias, const opmath_t<T>* x, int64_t rows, int64_t cols) {
  using A = opmath_t<T>;
  const int64_t chunks = (cols + kBiasColumns - 1) / kBiasColumns;
#pragma omp parallel for schedule(static) if (chunks > 1 && rows * cols >= kParallelMinElements)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t j0 = c * kBiasColumns;
    const int64_t n = std::min(kBiasColumns, cols - j0);
    A acc[kBiasColumns] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const A* row = x + r * cols + j0;
      for (int64_t j = 0; j < n; ++j) acc[j] += row[j];
    }
    for (int64_t j = 0; j < n; ++j) dbias[j0 + j] = store<T>(load<T>(dbias[j0 + j]) + acc[j]);
  }
}

/// out[rows,OC] = round(out32[r, :] + bias32) to T: the bias added in FP32, then one rounding per output
/// (bias32 may be null). With gelu_out, also gelu_out = round(GELU(out)) from the stored (rounded) out, in
/// the same pass over the row while it is in cache (out32 is clobbered).
template <typename T>
void add_bias_and_round(T* out, float* out32, const float* bias32, int64_t rows, int64_t OC,
                        T* gelu_out = nullptr) {
#pragma omp parallel for schedule(static) if (rows * OC >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out32 + r * OC;
    if (bias32 != nullptr)
      for (int64_t j = 0; j < OC; ++j) o[j] += bias32[j];
    convert(o, out + r * OC, static_cast<size_t>(OC));
    if (gelu_out != nullptr) {
      convert(out + r * OC, o, static_cast<size_t>(OC));
      gelu_forward_f32(o, o, OC);
      convert(o, gelu_out + r * OC, static_cast<size_t>(OC));
    }
  }
}

/// The GELU backward on the dinp GEMM result r[n] (opmath; the epilogue of matmul_backward_gelu): dpre =
/// round(0 + round(0 + r) * GELU'(pre)), exactly the unfused sequence on zeroed buffers (matmul_backward
/// into g, gelu_backward into dpre), in fixed chunks. r may alias dpre (float and double storage).
template <typename T>
void gelu_backward_epilogue(T* dpre, const opmath_t<T>* r, const T* pre, int64_t n) {
  using F = opmath_t<T>;
  constexpr int64_t kChunk = 1024;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk;
    const int64_t count = std::min(kChunk, n - begin);
    F dy[kChunk], acc[kChunk];
    for (int64_t i = 0; i < count; ++i) dy[i] = F(0) + r[begin + i];
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t i = 0; i < count; ++i)
        dpre[begin + i] = F(0) + dy[i] * common::gelu_tanh_derivative(pre[begin + i]);
    } else if constexpr (std::is_same_v<T, float>) {
      std::fill_n(acc, count, 0.0f);
      gelu_backward_f32(acc, pre + begin, dy, count);
      std::copy_n(acc, count, dpre + begin);
    } else {
      T rounded[kChunk];
      float x[kChunk];
      convert(dy, rounded, static_cast<size_t>(count));  // g = round(0 + r)
      convert(rounded, dy, static_cast<size_t>(count));
      convert(pre + begin, x, static_cast<size_t>(count));
      std::fill_n(acc, count, 0.0f);
      gelu_backward_f32(acc, x, dy, count);
      convert(acc, dpre + begin, static_cast<size_t>(count));
    }
  }
}

/// Shapes must be non-negative and fit BLAS's int.
void check_sizes(const char* op, int64_t rows, int64_t IC, int64_t OC) {
  MPT_CHECK(rows >= 0 && rows <= INT_MAX, "{}: rows = {} is outside [0, INT_MAX] (BLAS takes int sizes)", op,
            rows);
  MPT_CHECK(IC >= 0 && IC <= INT_MAX, "{}: IC = {} is outside [0, INT_MAX] (BLAS takes int sizes)", op, IC);
  MPT_CHECK(OC >= 0 && OC <= INT_MAX, "{}: OC = {} is outside [0, INT_MAX] (BLAS takes int sizes)", op, OC);
}

template <typename T>
constexpr bool kNativeBlas = std::is_same_v<T, float> || std::is_same_v<T, double>;

/// BF16 operands go straight to oneDNN's native BF16 matmul where the CPU has it (and K > 0, which oneDNN
/// requires); elsewhere they take the FP32-copy path.
template <typename T>
bool use_native_bf16(int64_t K) {
  if constexpr (std::is_same_v<T, bf16>)
    return K > 0 && onednn_native_bf16();
  else
    return false;
}

/// Grows `workspace` to at least n floats (never shrinks) and returns its data.
float* workspace_for(std::vector<float>& workspace, int64_t n) {
  if (workspace.size() < static_cast<size_t>(n)) workspace.resize(static_cast<size_t>(n));
  return workspace.data();
}

/// matmul_forward for BF16 storage on oneDNN's native BF16 matmul: FP32 result in the workspace, bias added
/// in FP32, one rounding per output.
void matmul_forward_native_bf16(bf16* out, const bf16* inp, const bf16* weight, const bf16* bias,
                                int64_t rows, int64_t IC, int64_t OC, std::vector<float>& workspace,
                                bf16* gelu_out) {
  float* out32 = workspace_for(workspace, rows * OC + OC);
  float* bias32 = out32 + rows * OC;
  if (bias != nullptr) convert(bias, bias32, static_cast<size_t>(OC));
  onednn_timed<bf16>(false, true, rows, OC, IC, inp, IC, weight, IC, out32, OC);
  add_bias_and_round(out, out32, bias != nullptr ? bias32 : nullptr, rows, OC, gelu_out);
}

/// matmul_backward for BF16 storage on oneDNN's native BF16 matmul: FP32 results in the workspace, then one
/// rounding per gradient element (dinp through the GELU backward when gelu_pre is given).
void matmul_backward_native_bf16(bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout, const bf16* inp,
                                 const bf16* weight, int64_t rows, int64_t IC, int64_t OC,
                                 std::vector<float>& workspace, const bf16* gelu_pre) {
  // dweight32 [OC,IC] | dinp32 [rows,IC] | dout32 [rows,OC] (the bias gradient's column sums only).
  float* dweight32 = workspace_for(workspace, OC * IC + rows * IC + (dbias != nullptr ? rows * OC : 0));
  float* dinp32 = dweight32 + OC * IC;
  // With the GELU epilogue the weight gradient goes first, so dinp may alias inp.
  const auto input_gradient = [&] {
    if (dinp == nullptr) return;
    onednn_timed<bf16>(false, false, rows, IC, OC, dout, OC, weight, IC, dinp32, IC);
    if (gelu_pre != nullptr)
      gelu_backward_epilogue(dinp, dinp32, gelu_pre, rows * IC);
    else
      accumulate_rounded(dinp, dinp32, rows * IC);
  };
  if (gelu_pre == nullptr) input_gradient();
  onednn_timed<bf16>(true, false, OC, IC, rows, dout, OC, inp, IC, dweight32, IC);
  accumulate_rounded(dweight, dweight32, OC * IC);
  if (gelu_pre != nullptr) input_gradient();
  if (dbias != nullptr) {
    float* dout32 = dinp32 + rows * IC;
    widen(dout, dout32, rows * OC);
    add_column_sums(dbias, dout32, rows, OC);
  }
}

}  // namespace

namespace {
std::atomic<int64_t> g_gemm_outside_ns{0};
std::atomic<int64_t> g_gemm_inside_ns{0};
}  // namespace

GemmSeconds gemm_seconds() {
  return {1e-9 * static_cast<double>(g_gemm_outside_ns.load(std::memory_order_relaxed)),
          1e-9 * static_cast<double>(g_gemm_inside_ns.load(std::memory_order_relaxed))};
}

void record_gemm_nanoseconds(int64_t nanoseconds) {
  (omp_in_parallel() ? g_gemm_inside_ns : g_gemm_outside_ns)
      .fetch_add(nanoseconds, std::memory_order_relaxed);
}

template <typename S>
void blas_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, S alpha, const S* A, int64_t lda,
               const S* B, int64_t ldb, S beta, S* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  timed_gemm([&] {
    if (K == 0) {
      if (beta == S(0))
        for (int64_t r = 0; r < M; ++r) std::fill(C + r * ldc, C + r * ldc + N, S(0));
    } else {
      // Fixed blocks of C, each a single-threaded BLAS call, over our threads (or on the calling thread
      // inside a parallel region): the blocks and each block's arithmetic follow from the shape alone, so the
      // result is the same for every thread count. OpenBLAS's own threaded SGEMM blocks K differently from
      // its single-threaded one at some K, and on the 2-core Zen 4 VM it ran at 100-130 instead of ~195
      // GFLOP/s in about a third of the processes (docs/DESIGN.md). A call on the whole C inside a parallel
      // region is not the blocks' result with every kernel either: with OpenBLAS's Haswell kernels (AVX2
      // CPUs) attention differed between 1 thread (inactive region: blocks) and 2 (one call).
      for_each_gemm_block(trans_a, trans_b, M, N, A, lda, B, ldb, C, ldc, [&](const GemmBlock<S, S>& b) {
        blas_call(trans_a, trans_b, b.M, b.N, K, alpha, b.A, lda, b.B, ldb, beta, b.C, ldc);
      });
    }
  });
}
template void blas_gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                               const float*, int64_t, float, float*, int64_t);
template void blas_gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                                const double*, int64_t, double, double*, int64_t);

template <typename S>
void linear_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda,
                 const S* B, int64_t ldb, S beta, S* C, int64_t ldc, const S* bias) {
  MPT_CHECK(beta == S(0) || beta == S(1), "linear_gemm: beta must be 0 or 1");
  MPT_CHECK(bias == nullptr || beta == S(0), "linear_gemm: a bias needs beta = 0");
  gemm<S>(trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, M, N, K, A, lda, B, ldb,
          beta, C, ldc, bias);
}
template void linear_gemm<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*,
                                 int64_t, float, float*, int64_t, const float*);
template void linear_gemm<double>(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t,
                                  const double*, int64_t, double, double*, int64_t, const double*);

namespace {

/// matmul_forward, and with gelu_out also the GELU of the stored output in the same pass over the rows.
template <typename T>
void matmul_forward_impl(T* out, const T* inp, const T* weight, const T* bias, int64_t rows, int64_t IC,
                         int64_t OC, std::vector<float>& workspace, T* gelu_out) {
  if constexpr (kNativeBlas<T>) {
    gemm<T>(CblasNoTrans, CblasTrans, rows, OC, IC, inp, IC, weight, IC, T(0), out, OC, bias);
    if (gelu_out != nullptr) {
#pragma omp parallel for schedule(static) if (rows * OC >= kParallelMinElements)
      for (int64_t r = 0; r < rows; ++r) {
        const T* o = out + r * OC;
        T* g = gelu_out + r * OC;
        if constexpr (std::is_same_v<T, float>)
          gelu_forward_f32(g, o, OC);
        else
          for (int64_t j = 0; j < OC; ++j) g[j] = common::gelu_tanh(o[j]);
      }
    }
  } else if (use_native_bf16<T>(IC)) {
    if constexpr (std::is_same_v<T, bf16>)
      matmul_forward_native_bf16(out, inp, weight, bias, rows, IC, OC, workspace, gelu_out);
  } else {
    float* inp32 = workspace_for(workspace, rows * IC + OC * IC + rows * OC + OC);
    float* weight32 = inp32 + rows * IC;
    float* out32 = weight32 + OC * IC;
    float* bias32 = out32 + rows * OC;
    widen(inp, inp32, rows * IC);
    widen(weight, weight32, OC * IC);
    // Bias added in FP32 by the GEMM, then one rounding per output.
    if (bias != nullptr) convert(bias, bias32, static_cast<size_t>(OC));
    gemm<float>(CblasNoTrans, CblasTrans, rows, OC, IC, inp32, IC, weight32, IC, 0.0f, out32, OC,
                bias != nullptr ? bias32 : nullptr);
    add_bias_and_round(out, out32, nullptr, rows, OC, gelu_out);
  }
}

/// matmul_backward; with gelu_pre, dinp is overwritten with the GELU backward of the dinp GEMM result, and
/// the weight gradient is computed first, so dinp may alias inp (the two results do not depend on the order).
template <typename T>
void matmul_backward_impl(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                          int64_t rows, int64_t IC, int64_t OC, std::vector<float>& workspace,
                          const T* gelu_pre) {
  const bool gelu = gelu_pre != nullptr;
  if constexpr (kNativeBlas<T>) {
    // beta = 1: BLAS adds into the existing gradients; beta = 0 for the GELU epilogue, which reads the
    // product alone and overwrites dinp.
    const auto input_gradient = [&] {
      if (dinp == nullptr) return;
      gemm<T>(CblasNoTrans, CblasNoTrans, rows, IC, OC, dout, OC, weight, IC, T(gelu ? 0 : 1), dinp, IC);
      if (gelu) gelu_backward_epilogue(dinp, dinp, gelu_pre, rows * IC);
    };
    if (!gelu) input_gradient();
    gemm<T>(CblasTrans, CblasNoTrans, OC, IC, rows, dout, OC, inp, IC, T(1), dweight, IC);
    if (gelu) input_gradient();
    if (dbias != nullptr) add_column_sums(dbias, dout, rows, OC);
  } else if (use_native_bf16<T>(IC)) {
    if constexpr (std::is_same_v<T, bf16>)
      matmul_backward_native_bf16(dinp, dweight, dbias, dout, inp, weight, rows, IC, OC, workspace, gelu_pre);
  } else {
    // dout32 [rows,OC] | weight32 [OC,IC], also the FP32 dweight | scratch [rows,IC]: the FP32 dinp and the
    // FP32 inp, one after the other.
    float* dout32 = workspace_for(workspace, rows * OC + OC * IC + rows * IC);
    float* weight32 = dout32 + rows * OC;
    float* scratch = weight32 + OC * IC;
    widen(dout, dout32, rows * OC);
    const auto input_gradient = [&] {
      if (dinp == nullptr) return;
      widen(weight, weight32, OC * IC);
      gemm<float>(CblasNoTrans, CblasNoTrans, rows, IC, OC, dout32, OC, weight32, IC, 0.0f, scratch, IC);
      if (gelu)
        gelu_backward_epilogue(dinp, scratch, gelu_pre, rows * IC);
      else
        accumulate_rounded(dinp, scratch, rows * IC);
    };
    if (!gelu) input_gradient();
    widen(inp, scratch, rows * IC);
    gemm<float>(CblasTrans, CblasNoTrans, OC, IC, rows, dout32, OC, scratch, IC, 0.0f, weight32, IC);
    accumulate_rounded(dweight, weight32, OC * IC);
    if (gelu) input_gradient();
    if (dbias != nullptr) add_column_sums(dbias, dout32, rows, OC);
  }
}

}  // namespace

template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, const T* bias, int64_t rows, int64_t IC,
                    int64_t OC, std::vector<float>& workspace) {
  check_sizes("matmul_forward", rows, IC, OC);
  if (rows == 0 || OC == 0) return;
  MPT_CHECK(out != nullptr, "matmul_forward: out is null");
  MPT_CHECK(inp != nullptr, "matmul_forward: inp is null");
  MPT_CHECK(weight != nullptr, "matmul_forward: weight is null");
  matmul_forward_impl<T>(out, inp, weight, bias, rows, IC, OC, workspace, nullptr);
}

template <typename T>
void matmul_gelu_forward(T* pre, T* out, const T* inp, const T* weight, const T* bias, int64_t rows,
                         int64_t IC, int64_t OC, std::vector<float>& workspace) {
  check_sizes("matmul_gelu_forward", rows, IC, OC);
  if (rows == 0 || OC == 0) return;
  MPT_CHECK(pre != nullptr, "matmul_gelu_forward: pre is null");
  MPT_CHECK(out != nullptr, "matmul_gelu_forward: out is null");
  MPT_CHECK(out != pre, "matmul_gelu_forward: out must not alias pre (the backward reads pre)");
  MPT_CHECK(inp != nullptr, "matmul_gelu_forward: inp is null");
  MPT_CHECK(weight != nullptr, "matmul_gelu_forward: weight is null");
  matmul_forward_impl<T>(pre, inp, weight, bias, rows, IC, OC, workspace, out);
}

template <typename T>
void matmul_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                     int64_t rows, int64_t IC, int64_t OC, std::vector<float>& workspace) {
  check_sizes("matmul_backward", rows, IC, OC);
  if (rows == 0 || OC == 0) return;
  MPT_CHECK(dweight != nullptr, "matmul_backward: dweight is null");
  MPT_CHECK(dout != nullptr, "matmul_backward: dout is null");
  MPT_CHECK(inp != nullptr, "matmul_backward: inp is null");
  MPT_CHECK(dinp == nullptr || weight != nullptr, "matmul_backward: weight is null but dinp is requested");
  matmul_backward_impl<T>(dinp, dweight, dbias, dout, inp, weight, rows, IC, OC, workspace, nullptr);
}

template <typename T>
void matmul_backward_gelu(T* dpre, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                          const T* pre, int64_t rows, int64_t IC, int64_t OC, std::vector<float>& workspace) {
  check_sizes("matmul_backward_gelu", rows, IC, OC);
  if (rows == 0 || OC == 0) return;
  MPT_CHECK(dpre != nullptr, "matmul_backward_gelu: dpre is null");
  MPT_CHECK(dweight != nullptr, "matmul_backward_gelu: dweight is null");
  MPT_CHECK(dout != nullptr, "matmul_backward_gelu: dout is null");
  MPT_CHECK(inp != nullptr, "matmul_backward_gelu: inp is null");
  MPT_CHECK(weight != nullptr, "matmul_backward_gelu: weight is null");
  MPT_CHECK(pre != nullptr, "matmul_backward_gelu: pre is null");
  MPT_CHECK(dpre != pre, "matmul_backward_gelu: dpre must not alias pre");
  matmul_backward_impl<T>(dpre, dweight, dbias, dout, inp, weight, rows, IC, OC, workspace, pre);
}

#define MPT_INSTANTIATE_MATMUL(T)                                                                       \
  template void matmul_forward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t,          \
                                  std::vector<float>&);                                                 \
  template void matmul_backward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, \
                                   std::vector<float>&);                                                \
  template void matmul_gelu_forward<T>(T*, T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, \
                                       std::vector<float>&);                                            \
  template void matmul_backward_gelu<T>(T*, T*, T*, const T*, const T*, const T*, const T*, int64_t,    \
                                        int64_t, int64_t, std::vector<float>&);
MPT_INSTANTIATE_MATMUL(float)
MPT_INSTANTIATE_MATMUL(half)
MPT_INSTANTIATE_MATMUL(bf16)
MPT_INSTANTIATE_MATMUL(double)
#undef MPT_INSTANTIATE_MATMUL

double measure_sgemm_flops(int n, int repeats) {
  MPT_CHECK(n >= 1 && repeats >= 1, "measure_sgemm_flops: n and repeats must be >= 1");
  const auto elements = static_cast<size_t>(n) * static_cast<size_t>(n);
  std::vector<float> a(elements, 0.5f), b(elements, 0.25f), c(elements, 0.0f);
  double best = 0.0;
  // The fastest way to run it on all threads: OpenBLAS's own threaded SGEMM, blas_gemm's fixed blocks of
  // single-threaded calls, and oneDNN's f32 matmul with its own threading where the model uses oneDNN (at
  // this square shape each block repacks all of B, so the model's blocked way is the slower one).
  for (int r = 0; r < repeats; ++r) {
    for (const int way : {0, 1, 2}) {
      if (way == 2 && !onednn_f32_preferred()) continue;
      const auto t0 = std::chrono::steady_clock::now();
      if (way == 0)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f,
                    c.data(), n);
      else if (way == 1)
        blas_gemm<float>(false, false, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
      else
        onednn_gemm<float>(false, false, n, n, n, a.data(), n, b.data(), n, 0.0f, c.data(), n);
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, 2.0 * n * static_cast<double>(elements) / seconds);
    }
  }
  return best;
}

}  // namespace mpt::cpu
