// BlasContext's private state, shared by kernels/cuda/matmul.cu, attention.cu and attention_cudnn.cu: the
// cuBLASLt handle and its fixed workspace, a cache of matmul plans (descriptor, layouts, heuristic's
// algorithm) keyed by everything the heuristic looks at, a grow-only scratch buffer for the ops'
// intermediates, and the cuDNN SDPA state (handle and cached graphs), opaque here so that only
// attention_cudnn.cu needs the cuDNN frontend's headers.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "mptrain/cuda_blas.hpp"
#include "mptrain/dtype.hpp"

namespace mpt::cuda {

/// cuBLASLt type of a storage dtype (f32, f16, bf16); throws mpt::Error naming `op` for any other dtype.
cudaDataType_t blas_type(DType dtype, const char* op);

/// Calls f.template operator()<T>() with T the storage type of dtype (float, half, bf16); any other dtype
/// throws mpt::Error naming `op` and the dtype (through blas_type).
template <typename F>
void dispatch(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::f32:
      f.template operator()<float>();
      return;
    case DType::f16:
      f.template operator()<half>();
      return;
    case DType::bf16:
      f.template operator()<bf16>();
      return;
    default:
      (void)blas_type(dtype, op);  // throws, naming the dtype
  }
}

/// One cached cuBLASLt matmul: descriptors owned here (destroyed with the entry), the chosen algorithm and
/// the workspace it needs.
struct GemmPlan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace_bytes = 0;

  GemmPlan() = default;
  ~GemmPlan();
  GemmPlan(GemmPlan&& other) noexcept;
  GemmPlan& operator=(GemmPlan&& other) noexcept;
  GemmPlan(const GemmPlan&) = delete;
  GemmPlan& operator=(const GemmPlan&) = delete;
};

/// A row-major, optionally strided-batched GEMM: for every batch index i,
///   C_i[M,N] = alpha * op(A_i) @ op(B_i) + beta * C_i (+ bias[N] broadcast over rows when bias != null),
/// where op(A) = A[M,K] (lda >= K) or, with trans_a, A stored as [K,M] (lda >= M); likewise B: [K,N] or,
/// with trans_b, stored [N,K]. A and B have `ab_type`, C has `c_type`; the math is FP32
/// (CUBLAS_COMPUTE_32F, no TF32) and each C element is rounded once. X_i = X + i * stride_x elements.
struct GemmCall {
  bool trans_a = false, trans_b = false;
  int64_t M = 0, N = 0, K = 0;
  const void* A = nullptr;
  int64_t lda = 0, stride_a = 0;
  const void* B = nullptr;
  int64_t ldb = 0, stride_b = 0;
  void* C = nullptr;
  int64_t ldc = 0, stride_c = 0;
  int64_t batch = 1;
  cudaDataType_t ab_type = CUDA_R_32F, c_type = CUDA_R_32F;
  float alpha = 1.0f, beta = 0.0f;
  const void* bias = nullptr;  ///< [N] of c_type, only with batch == 1
};

/// cuDNN SDPA state, defined in kernels/cuda/attention_cudnn.cu: the cuDNN handle (created on first use) and
/// the graphs built per shape.
struct CudnnAttention;
/// Destroys a CudnnAttention (defined next to it); logs instead of throwing.
struct CudnnAttentionDeleter {
  void operator()(CudnnAttention* p) const noexcept;
};

struct BlasContext::State {
  static constexpr size_t kLtWorkspaceBytes = size_t{32} << 20;

  int device = 0;
  cublasLtHandle_t lt = nullptr;
  void* lt_workspace = nullptr;  ///< kLtWorkspaceBytes, for cuBLASLt only
  void* scratch = nullptr;       ///< grow-only; intermediates of one op at a time
  size_t scratch_bytes = 0;
  /// Key: transposes, M, N, K, lda, ldb, ldc, strides, batch, types, bias epilogue, alignments (A, B, C,
  /// bias).
  using Key = std::tuple<bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                         int64_t, int64_t, int, int, bool, unsigned, unsigned, unsigned, unsigned>;
  std::map<Key, GemmPlan> plans;
  /// Null until the cuDNN attention path is first asked about (attention_cudnn.cu creates it).
  std::unique_ptr<CudnnAttention, CudnnAttentionDeleter> cudnn;

  State();
  ~State();
  State(const State&) = delete;
  State& operator=(const State&) = delete;

  /// At least `num_bytes` of device scratch, valid until the next call. Growing waits for `stream` first (the
  /// old buffer may still be in use by work queued there) and never shrinks.
  void* scratch_for(size_t num_bytes, cudaStream_t stream);

  /// Enqueues `call` on `stream` (see GemmCall). Throws mpt::Error for bad sizes, LibraryError when cuBLASLt
  /// fails or has no algorithm for the problem.
  void gemm(const GemmCall& call, cudaStream_t stream);
};

}  // namespace mpt::cuda
