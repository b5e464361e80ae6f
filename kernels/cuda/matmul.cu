// CUDA linear layer (torch.nn.Linear) through cuBLASLt, the device twin of kernels/cpu/matmul.cpp, and the
// BlasContext that owns the cuBLASLt handle, its workspace and the cached matmul plans.
//
// cuBLASLt is column-major. A row-major matrix X[r,c] is, read column-major, X^T with leading dimension c,
// so the row-major product C = op(A) op(B) is issued as the column-major product C^T = op(B)^T op(A)^T:
// the operands swap places and keep their transpose flags. Every GEMM computes in FP32 (CUBLAS_COMPUTE_32F,
// which never uses TF32) and rounds each output once; the backward GEMMs run with beta = 1 so cuBLASLt adds
// into the existing gradient before that rounding (the CPU's g = round(g + result)). The forward bias is the
// CUBLASLT_EPILOGUE_BIAS epilogue (added in FP32 before the rounding). The bias gradient is a column-sum
// kernel rather than CUBLASLT_EPILOGUE_BGRADB, which overwrites its output instead of accumulating.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

#include "cuda/blas_context.cuh"
#include "cuda/dtype.cuh"
#include "mptrain/cuda_blas.hpp"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_kernels.hpp"
#include "mptrain/error.hpp"

namespace mpt::cuda {

namespace {

constexpr int kSumColumns = 32;  // columns per block of the bias-gradient sum (one warp wide)
constexpr int kSumLanes = 16;    // row lanes per block

/// Largest power of two (at most 256) dividing the address: what cuBLASLt's heuristic must assume.
unsigned alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  if (address == 0) return 256;
  return static_cast<unsigned>(std::min<uintptr_t>(address & (~address + 1), 256));
}

/// Destroys a cuBLASLt object, logging instead of throwing (used from destructors).
void report_destroy_failure(cublasStatus_t rc, const char* what) noexcept {
  if (rc != CUBLAS_STATUS_SUCCESS)
    std::fprintf(stderr, "mptrain: %s failed: %s\n", what, cublasLtGetStatusString(rc));
}

}  // namespace

cudaDataType_t blas_type(DType dtype, const char* op) {
  switch (dtype) {
    case DType::f32:
      return CUDA_R_32F;
    case DType::f16:
      return CUDA_R_16F;
    case DType::bf16:
      return CUDA_R_16BF;
    default:
      throw Error(MPT_FORMAT("{}: dtype {} is not a CUDA storage type (f32, f16, bf16)", op,
                             std::string(dtype_name(dtype))));
  }
}

// ---- GemmPlan ----

GemmPlan::~GemmPlan() {
  if (a != nullptr) report_destroy_failure(cublasLtMatrixLayoutDestroy(a), "cublasLtMatrixLayoutDestroy");
  if (b != nullptr) report_destroy_failure(cublasLtMatrixLayoutDestroy(b), "cublasLtMatrixLayoutDestroy");
  if (c != nullptr) report_destroy_failure(cublasLtMatrixLayoutDestroy(c), "cublasLtMatrixLayoutDestroy");
  if (desc != nullptr) report_destroy_failure(cublasLtMatmulDescDestroy(desc), "cublasLtMatmulDescDestroy");
}

GemmPlan::GemmPlan(GemmPlan&& other) noexcept {
  *this = std::move(other);
}

GemmPlan& GemmPlan::operator=(GemmPlan&& other) noexcept {
  std::swap(desc, other.desc);
  std::swap(a, other.a);
  std::swap(b, other.b);
  std::swap(c, other.c);
  std::swap(algo, other.algo);
  std::swap(workspace_bytes, other.workspace_bytes);
  return *this;
}

// ---- BlasContext::State ----

BlasContext::State::State() {
  MPT_CUDA_CHECK(cudaGetDevice(&device));
  MPT_CUBLAS_CHECK(cublasLtCreate(&lt));
  const cudaError_t rc = cudaMalloc(&lt_workspace, kLtWorkspaceBytes);
  if (rc != cudaSuccess) {
    // The destructor does not run for a half-built object: release the handle here.
    report_destroy_failure(cublasLtDestroy(lt), "cublasLtDestroy");
    throw LibraryError(detail::library_error_message(
        "CUDA", __FILE__, __LINE__, "cudaMalloc(cuBLASLt workspace, 32 MiB)", cudaGetErrorString(rc)));
  }
}

BlasContext::State::~State() {
  plans.clear();
  // cudaFree waits for the device, so work still queued on the scratch and workspace finishes first.
  if (scratch != nullptr) {
    const cudaError_t rc = cudaFree(scratch);
    if (rc != cudaSuccess)
      std::fprintf(stderr, "mptrain: cudaFree(scratch) failed: %s\n", cudaGetErrorString(rc));
  }
  if (lt_workspace != nullptr) {
    const cudaError_t rc = cudaFree(lt_workspace);
    if (rc != cudaSuccess)
      std::fprintf(stderr, "mptrain: cudaFree(cuBLASLt workspace) failed: %s\n", cudaGetErrorString(rc));
  }
  if (lt != nullptr) report_destroy_failure(cublasLtDestroy(lt), "cublasLtDestroy");
}

void* BlasContext::State::scratch_for(size_t num_bytes, cudaStream_t stream) {
  if (num_bytes <= scratch_bytes) return scratch;
  MPT_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (scratch != nullptr) {
    MPT_CUDA_CHECK(cudaFree(scratch));
    scratch = nullptr;
    scratch_bytes = 0;
  }
  const cudaError_t rc = cudaMalloc(&scratch, num_bytes);
  if (rc != cudaSuccess) {
    (void)cudaGetLastError();  // so that the next launch check does not report this allocation failure
    scratch = nullptr;
    throw Error(MPT_FORMAT("BlasContext: cannot allocate {} bytes of device scratch: {}", num_bytes,
                           cudaGetErrorString(rc)));
  }
  scratch_bytes = num_bytes;
  return scratch;
}

void BlasContext::State::gemm(const GemmCall& g, cudaStream_t stream) {
  MPT_CHECK(g.M >= 0 && g.N >= 0 && g.K >= 1, "gemm: bad sizes M = {}, N = {}, K = {}", g.M, g.N, g.K);
  MPT_CHECK(g.batch >= 1 && g.batch <= INT32_MAX, "gemm: batch count {} is outside [1, 2^31)", g.batch);
  MPT_CHECK(g.bias == nullptr || g.batch == 1, "gemm: a bias epilogue needs batch == 1");
  if (g.M == 0 || g.N == 0) return;
  MPT_CHECK(g.A != nullptr && g.B != nullptr && g.C != nullptr, "gemm: null operand");
  // Row-major [rows, cols] with leading dimension ld needs ld >= cols.
  MPT_CHECK(g.lda >= (g.trans_a ? g.M : g.K) && g.ldb >= (g.trans_b ? g.K : g.N) && g.ldc >= g.N,
            "gemm: leading dimension too small (lda {}, ldb {}, ldc {})", g.lda, g.ldb, g.ldc);

  const Key key{g.trans_a,
                g.trans_b,
                g.M,
                g.N,
                g.K,
                g.lda,
                g.ldb,
                g.ldc,
                g.stride_a,
                g.stride_b,
                g.stride_c,
                g.batch,
                g.ab_type,
                g.c_type,
                g.bias != nullptr,
                alignment_of(g.A),
                alignment_of(g.B),
                alignment_of(g.C),
                alignment_of(g.bias)};
  auto it = plans.find(key);
  if (it == plans.end()) {
    GemmPlan plan;
    // Column-major view: C^T[N,M] = op(B)^T[N,K] op(A)^T[K,M], so cuBLASLt's first operand is B.
    const cublasOperation_t op_first = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_second = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    MPT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    MPT_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
    MPT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second,
                                                    sizeof(op_second)));
    if (g.bias != nullptr) {
      const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
      const auto bias_type = static_cast<int32_t>(g.c_type);
      MPT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                                      sizeof(epilogue)));
      MPT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                                                      &bias_type, sizeof(bias_type)));
      // The heuristic reads the pointer's alignment; the pointer itself is set again on every call.
      MPT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias,
                                                      sizeof(g.bias)));
    }
    // Layouts describe the stored matrices (before op), column-major: a row-major [r, c] is [c, r].
    const auto u = [](int64_t x) { return static_cast<uint64_t>(x); };
    const uint64_t first_rows = u(g.trans_b ? g.K : g.N), first_cols = u(g.trans_b ? g.N : g.K);
    const uint64_t second_rows = u(g.trans_a ? g.M : g.K), second_cols = u(g.trans_a ? g.K : g.M);
    MPT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.a, g.ab_type, first_rows, first_cols, g.ldb));
    MPT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.b, g.ab_type, second_rows, second_cols, g.lda));
    MPT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.c, g.c_type, u(g.N), u(g.M), g.ldc));
    if (g.batch > 1) {
      const auto count = static_cast<int32_t>(g.batch);
      const std::pair<cublasLtMatrixLayout_t, int64_t> layouts[] = {
          {plan.a, g.stride_b}, {plan.b, g.stride_a}, {plan.c, g.stride_c}};
      for (const auto& [layout, stride] : layouts) {
        MPT_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                          sizeof(count)));
        MPT_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                          &stride, sizeof(stride)));
      }
    }

    cublasLtMatmulPreference_t pref = nullptr;
    MPT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    cublasStatus_t rc = CUBLAS_STATUS_SUCCESS;
    {
      const uint64_t max_workspace = kLtWorkspaceBytes;
      const uint32_t align_first = alignment_of(g.B), align_second = alignment_of(g.A),
                     align_c = alignment_of(g.C);
      rc = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &max_workspace, sizeof(max_workspace));
      if (rc == CUBLAS_STATUS_SUCCESS)
        rc = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                  &align_first, sizeof(align_first));
      if (rc == CUBLAS_STATUS_SUCCESS)
        rc = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                  &align_second, sizeof(align_second));
      if (rc == CUBLAS_STATUS_SUCCESS)
        rc = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                                  sizeof(align_c));
      if (rc == CUBLAS_STATUS_SUCCESS)
        rc = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c,
                                                  sizeof(align_c));
      if (rc == CUBLAS_STATUS_SUCCESS)
        rc = cublasLtMatmulAlgoGetHeuristic(lt, plan.desc, plan.a, plan.b, plan.c, plan.c, pref, 1, &result,
                                            &found);
    }
    report_destroy_failure(cublasLtMatmulPreferenceDestroy(pref), "cublasLtMatmulPreferenceDestroy");
    MPT_CUBLAS_CHECK(rc);
    if (found < 1 || result.state != CUBLAS_STATUS_SUCCESS)
      throw LibraryError(
          MPT_FORMAT("cuBLASLt has no algorithm for the GEMM M = {}, N = {}, K = {}, batch = {}, "
                     "trans_a = {}, trans_b = {}, lda = {}, ldb = {}, ldc = {}, types {}/{}, bias {}",
                     g.M, g.N, g.K, g.batch, g.trans_a, g.trans_b, g.lda, g.ldb, g.ldc,
                     static_cast<int>(g.ab_type), static_cast<int>(g.c_type), g.bias != nullptr));
    plan.algo = result.algo;
    plan.workspace_bytes = result.workspaceSize;
    it = plans.emplace(key, std::move(plan)).first;
  }
  GemmPlan& plan = it->second;
  if (g.bias != nullptr)
    MPT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias,
                                                    sizeof(g.bias)));
  MPT_CUBLAS_CHECK(cublasLtMatmul(lt, plan.desc, &g.alpha, g.B, plan.a, g.A, plan.b, &g.beta, g.C, plan.c,
                                  g.C, plan.c, &plan.algo, lt_workspace, plan.workspace_bytes, stream));
}

// ---- BlasContext ----

BlasContext::BlasContext() : state_(std::make_unique<State>()) {}
BlasContext::~BlasContext() = default;
BlasContext::BlasContext(BlasContext&&) noexcept = default;
BlasContext& BlasContext::operator=(BlasContext&&) noexcept = default;

// ---- kernels ----

/// out[r, j] = bias[j] (or 0 without bias) for the IC == 0 forward, where the GEMM has nothing to add.
template <typename T>
__global__ void broadcast_bias_kernel(T* out, const T* bias, int64_t rows, int64_t OC) {
  const int64_t n = rows * OC;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    store_from_float(out, i, bias != nullptr ? load_as_float(bias, i % OC) : 0.0f);
}

/// dbias[j] = round(dbias[j] + sum over r of dout[r, j]) in FP32. Each block owns kSumColumns columns; row
/// lane y adds rows y, y + kSumLanes, ... in order, and the lanes' partials are added in lane order, so the
/// result is the same on every run.
template <typename T>
__global__ void bias_grad_kernel(T* dbias, const T* dout, int64_t rows, int64_t OC) {
  __shared__ float partial[kSumLanes][kSumColumns + 1];
  const int64_t j = blockIdx.x * int64_t{kSumColumns} + threadIdx.x;
  float acc = 0.0f;
  if (j < OC)
    for (int64_t r = threadIdx.y; r < rows; r += kSumLanes) acc += load_as_float(dout, r * OC + j);
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < OC) {
    float sum = 0.0f;
    for (int lane = 0; lane < kSumLanes; ++lane) sum += partial[lane][threadIdx.x];
    store_from_float(dbias, j, load_as_float(dbias, j) + sum);
  }
}

// ---- launchers ----

namespace {

void check_matmul_sizes(const char* op, int64_t rows, int64_t IC, int64_t OC) {
  MPT_CHECK(rows >= 0 && IC >= 0 && OC >= 0, "{}: negative size (rows = {}, IC = {}, OC = {})", op, rows, IC,
            OC);
}

template <typename T>
void launch_broadcast_bias(void* out, const void* bias, int64_t rows, int64_t OC, cudaStream_t stream) {
  const int64_t n = rows * OC;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65535));
  broadcast_bias_kernel<T>
      <<<blocks, 256, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(bias), rows, OC);
  MPT_CUDA_LAUNCH_CHECK();
}

template <typename T>
void launch_bias_grad(void* dbias, const void* dout, int64_t rows, int64_t OC, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((OC + kSumColumns - 1) / kSumColumns);
  bias_grad_kernel<T><<<blocks, dim3(kSumColumns, kSumLanes), 0, stream>>>(
      static_cast<T*>(dbias), static_cast<const T*>(dout), rows, OC);
  MPT_CUDA_LAUNCH_CHECK();
}

/// dinp[rows, IC] = beta * dinp + dout[rows, OC] @ weight[OC, IC] (the input gradient of y = x W^T + b).
void input_grad_gemm(BlasContext& ctx, void* dinp, const void* dout, const void* weight, int64_t rows,
                     int64_t IC, int64_t OC, cudaDataType_t type, float beta, cudaStream_t stream) {
  GemmCall g;
  g.M = rows;
  g.N = IC;
  g.K = OC;
  g.A = dout;
  g.lda = OC;
  g.B = weight;
  g.ldb = IC;
  g.C = dinp;
  g.ldc = IC;
  g.ab_type = g.c_type = type;
  g.beta = beta;
  ctx.state().gemm(g, stream);
}

}  // namespace

void matmul_forward(BlasContext& ctx, void* out, const void* inp, const void* weight, const void* bias,
                    int64_t rows, int64_t IC, int64_t OC, DType dtype, cudaStream_t stream) {
  check_matmul_sizes("cuda::matmul_forward", rows, IC, OC);
  const cudaDataType_t type = blas_type(dtype, "cuda::matmul_forward");
  if (rows == 0 || OC == 0) return;
  MPT_CHECK(out != nullptr, "cuda::matmul_forward: out is null");
  if (IC == 0) {
    dispatch(dtype, "cuda::matmul_forward",
             [&]<typename T>() { launch_broadcast_bias<T>(out, bias, rows, OC, stream); });
    return;
  }
  MPT_CHECK(inp != nullptr, "cuda::matmul_forward: inp is null");
  MPT_CHECK(weight != nullptr, "cuda::matmul_forward: weight is null");
  GemmCall g;
  g.trans_b = true;  // weight is stored [OC, IC]
  g.M = rows;
  g.N = OC;
  g.K = IC;
  g.A = inp;
  g.lda = IC;
  g.B = weight;
  g.ldb = IC;
  g.C = out;
  g.ldc = OC;
  g.ab_type = g.c_type = type;
  g.bias = bias;
  ctx.state().gemm(g, stream);
}

void matmul_backward_gelu(BlasContext& ctx, void* dpre, void* dweight, void* dbias, const void* dout,
                          const void* inp, const void* weight, const void* pre, int64_t rows, int64_t IC,
                          int64_t OC, DType dtype, cudaStream_t stream) {
  check_matmul_sizes("cuda::matmul_backward_gelu", rows, IC, OC);
  const cudaDataType_t type = blas_type(dtype, "cuda::matmul_backward_gelu");
  if (rows == 0 || OC == 0) return;
  MPT_CHECK(dpre != nullptr, "cuda::matmul_backward_gelu: dpre is null");
  MPT_CHECK(weight != nullptr, "cuda::matmul_backward_gelu: weight is null");
  MPT_CHECK(pre != nullptr, "cuda::matmul_backward_gelu: pre is null");
  MPT_CHECK(dpre != pre, "cuda::matmul_backward_gelu: dpre must not alias pre");
  // The weight and bias gradients first: dpre may alias inp.
  matmul_backward(ctx, nullptr, dweight, dbias, dout, inp, weight, rows, IC, OC, dtype, stream);
  if (IC == 0) return;
  // dpre = dout @ weight (beta = 0: overwritten), then GELU' in place.
  input_grad_gemm(ctx, dpre, dout, weight, rows, IC, OC, type, 0.0f, stream);
  dispatch(dtype, "cuda::matmul_backward_gelu", [&]<typename T>() {
    gelu_backward_inplace(static_cast<T*>(dpre), static_cast<const T*>(pre), rows * IC, stream);
  });
}

void matmul_backward(BlasContext& ctx, void* dinp, void* dweight, void* dbias, const void* dout,
                     const void* inp, const void* weight, int64_t rows, int64_t IC, int64_t OC, DType dtype,
                     cudaStream_t stream) {
  check_matmul_sizes("cuda::matmul_backward", rows, IC, OC);
  const cudaDataType_t type = blas_type(dtype, "cuda::matmul_backward");
  if (rows == 0 || OC == 0) return;
  MPT_CHECK(dweight != nullptr, "cuda::matmul_backward: dweight is null");
  MPT_CHECK(dout != nullptr, "cuda::matmul_backward: dout is null");
  MPT_CHECK(inp != nullptr, "cuda::matmul_backward: inp is null");
  MPT_CHECK(dinp == nullptr || weight != nullptr,
            "cuda::matmul_backward: weight is null but dinp is requested");
  if (IC > 0) {
    if (dinp != nullptr) {
      input_grad_gemm(ctx, dinp, dout, weight, rows, IC, OC, type, 1.0f, stream);  // dinp += dout @ weight
    }
    // dweight[OC, IC] += dout^T @ inp, with dout stored [rows, OC]
    GemmCall g;
    g.trans_a = true;
    g.M = OC;
    g.N = IC;
    g.K = rows;
    g.A = dout;
    g.lda = OC;
    g.B = inp;
    g.ldb = IC;
    g.C = dweight;
    g.ldc = IC;
    g.ab_type = g.c_type = type;
    g.beta = 1.0f;
    ctx.state().gemm(g, stream);
  }
  if (dbias != nullptr)
    dispatch(dtype, "cuda::matmul_backward",
             [&]<typename T>() { launch_bias_grad<T>(dbias, dout, rows, OC, stream); });
}

}  // namespace mpt::cuda
