// CPU linear layer (torch.nn.Linear): out = inp @ weight^T + bias and its backward, on OpenBLAS, and for BF16
// on oneDNN's native BF16 matmul where the CPU has AVX512_BF16 or AMX (kernels/cpu/onednn_gemm.hpp: FP32
// accumulation, results into FP32 scratch, then the same bias add and single rounding as the FP32-copy path).
//
// float and double call SGEMM/DGEMM on the operands directly. FP16/BF16 follow the numerics contract
// (DESIGN.md): the operands are widened to FP32 in the caller's grow-only workspace with the SIMD bulk
// converters, SGEMM accumulates in FP32, and each result is rounded once to the storage type (for gradients:
// g = round(g + result), so FP16 results with |x| >= 65520 become inf exactly as on a GPU). The bias gradient
// is a column sum in FP32 (FP64 for double) over fixed column chunks, each summed in row order, so it does
// not depend on the thread count.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <type_traits>

#include <cblas.h>

#include "cpu/onednn_gemm.hpp"
#include "cpu/ops.hpp"
#include "mptrain/error.hpp"

namespace mpt::cpu {

namespace {

constexpr int64_t kConvertChunk = int64_t{1} << 15;  // elements per thread task in bulk conversions
constexpr int64_t kBiasColumns = 64;                 // columns per task in the bias-gradient column sums
// Below this many elements an elementwise pass stays on the calling thread: waking the OpenMP team costs more
// than it saves, and on a loaded machine a descheduled worker stalls the whole join.
constexpr int64_t kParallelMinElements = int64_t{1} << 15;

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

template <typename S>
void gemm(CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int64_t M, int64_t N, int64_t K, const S* A,
          int64_t lda, const S* B, int64_t ldb, S beta, S* C, int64_t ldc) {
  blas_gemm<S>(trans_a == CblasTrans, trans_b == CblasTrans, M, N, K, S(1), A, lda, B, ldb, beta, C, ldc);
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
/// (bias32 may be null).
template <typename T>
void add_bias_and_round(T* out, float* out32, const float* bias32, int64_t rows, int64_t OC) {
#pragma omp parallel for schedule(static) if (rows * OC >= kParallelMinElements)
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out32 + r * OC;
    if (bias32 != nullptr)
      for (int64_t j = 0; j < OC; ++j) o[j] += bias32[j];
    convert(o, out + r * OC, static_cast<size_t>(OC));
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
                                int64_t rows, int64_t IC, int64_t OC, std::vector<float>& workspace) {
  float* out32 = workspace_for(workspace, rows * OC + OC);
  float* bias32 = out32 + rows * OC;
  if (bias != nullptr) convert(bias, bias32, static_cast<size_t>(OC));
  onednn_gemm<bf16>(false, true, rows, OC, IC, inp, IC, weight, IC, 0.0f, out32, OC);
  add_bias_and_round(out, out32, bias != nullptr ? bias32 : nullptr, rows, OC);
}

/// matmul_backward for BF16 storage on oneDNN's native BF16 matmul: FP32 results in the workspace, then one
/// rounding per gradient element.
void matmul_backward_native_bf16(bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout, const bf16* inp,
                                 const bf16* weight, int64_t rows, int64_t IC, int64_t OC,
                                 std::vector<float>& workspace) {
  // dweight32 [OC,IC] | dinp32 [rows,IC] | dout32 [rows,OC] (the bias gradient's column sums only).
  float* dweight32 = workspace_for(workspace, OC * IC + rows * IC + (dbias != nullptr ? rows * OC : 0));
  float* dinp32 = dweight32 + OC * IC;
  if (dinp != nullptr) {
    onednn_gemm<bf16>(false, false, rows, IC, OC, dout, OC, weight, IC, 0.0f, dinp32, IC);
    accumulate_rounded(dinp, dinp32, rows * IC);
  }
  onednn_gemm<bf16>(true, false, OC, IC, rows, dout, OC, inp, IC, 0.0f, dweight32, IC);
  accumulate_rounded(dweight, dweight32, OC * IC);
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
  const auto t0 = std::chrono::steady_clock::now();
  if (K == 0) {
    if (beta == S(0))
      for (int64_t r = 0; r < M; ++r) std::fill(C + r * ldc, C + r * ldc + N, S(0));
    return;
  }
  const auto i = [](int64_t x) { return static_cast<int>(x); };
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = trans_b ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<S, float>)
    cblas_sgemm(CblasRowMajor, ta, tb, i(M), i(N), i(K), alpha, A, i(lda), B, i(ldb), beta, C, i(ldc));
  else
    cblas_dgemm(CblasRowMajor, ta, tb, i(M), i(N), i(K), alpha, A, i(lda), B, i(ldb), beta, C, i(ldc));
  record_gemm_nanoseconds(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
}
template void blas_gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                               const float*, int64_t, float, float*, int64_t);
template void blas_gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                                const double*, int64_t, double, double*, int64_t);

template <typename T>
void matmul_forward(T* out, const T* inp, const T* weight, const T* bias, int64_t rows, int64_t IC,
                    int64_t OC, std::vector<float>& workspace) {
  check_sizes("matmul_forward", rows, IC, OC);
  if (rows == 0 || OC == 0) return;
  MPT_CHECK(out != nullptr, "matmul_forward: out is null");
  MPT_CHECK(inp != nullptr, "matmul_forward: inp is null");
  MPT_CHECK(weight != nullptr, "matmul_forward: weight is null");

  if constexpr (kNativeBlas<T>) {
    gemm<T>(CblasNoTrans, CblasTrans, rows, OC, IC, inp, IC, weight, IC, T(0), out, OC);
    if (bias != nullptr) {
#pragma omp parallel for schedule(static) if (rows * OC >= kParallelMinElements)
      for (int64_t r = 0; r < rows; ++r) {
        T* o = out + r * OC;
        for (int64_t j = 0; j < OC; ++j) o[j] += bias[j];
      }
    }
  } else if (use_native_bf16<T>(IC)) {
    if constexpr (std::is_same_v<T, bf16>)
      matmul_forward_native_bf16(out, inp, weight, bias, rows, IC, OC, workspace);
  } else {
    float* inp32 = workspace_for(workspace, rows * IC + OC * IC + rows * OC + OC);
    float* weight32 = inp32 + rows * IC;
    float* out32 = weight32 + OC * IC;
    float* bias32 = out32 + rows * OC;
    widen(inp, inp32, rows * IC);
    widen(weight, weight32, OC * IC);
    if (bias != nullptr) convert(bias, bias32, static_cast<size_t>(OC));
    gemm<float>(CblasNoTrans, CblasTrans, rows, OC, IC, inp32, IC, weight32, IC, 0.0f, out32, OC);
    // Bias added in FP32, then one rounding per output.
    add_bias_and_round(out, out32, bias != nullptr ? bias32 : nullptr, rows, OC);
  }
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

  if constexpr (kNativeBlas<T>) {
    // beta = 1: BLAS adds into the existing gradients.
    if (dinp != nullptr)
      gemm<T>(CblasNoTrans, CblasNoTrans, rows, IC, OC, dout, OC, weight, IC, T(1), dinp, IC);
    gemm<T>(CblasTrans, CblasNoTrans, OC, IC, rows, dout, OC, inp, IC, T(1), dweight, IC);
    if (dbias != nullptr) add_column_sums(dbias, dout, rows, OC);
  } else if (use_native_bf16<T>(IC)) {
    if constexpr (std::is_same_v<T, bf16>)
      matmul_backward_native_bf16(dinp, dweight, dbias, dout, inp, weight, rows, IC, OC, workspace);
  } else {
    // dout32 [rows,OC] | weight32 [OC,IC], reused for the FP32 dweight | scratch [rows,IC]: the FP32 dinp,
    // then the FP32 inp.
    float* dout32 = workspace_for(workspace, rows * OC + OC * IC + rows * IC);
    float* weight32 = dout32 + rows * OC;
    float* scratch = weight32 + OC * IC;
    widen(dout, dout32, rows * OC);
    if (dinp != nullptr) {
      widen(weight, weight32, OC * IC);
      gemm<float>(CblasNoTrans, CblasNoTrans, rows, IC, OC, dout32, OC, weight32, IC, 0.0f, scratch, IC);
      accumulate_rounded(dinp, scratch, rows * IC);
    }
    widen(inp, scratch, rows * IC);
    gemm<float>(CblasTrans, CblasNoTrans, OC, IC, rows, dout32, OC, scratch, IC, 0.0f, weight32, IC);
    accumulate_rounded(dweight, weight32, OC * IC);
    if (dbias != nullptr) add_column_sums(dbias, dout32, rows, OC);
  }
}

#define MPT_INSTANTIATE_MATMUL(T)                                                                       \
  template void matmul_forward<T>(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t,          \
                                  std::vector<float>&);                                                 \
  template void matmul_backward<T>(T*, T*, T*, const T*, const T*, const T*, int64_t, int64_t, int64_t, \
                                   std::vector<float>&);
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
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f,
                c.data(), n);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * n * static_cast<double>(elements) / seconds);
  }
  return best;
}

}  // namespace mpt::cpu
