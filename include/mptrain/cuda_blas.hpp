// Launchers of the CUDA GEMM-based ops: the linear layer through cuBLASLt (kernels/cuda/matmul.cu) and causal
// attention (kernels/cuda/attention.cu), an unfused path (batched strided GEMMs + a softmax kernel) that is
// the reference, and a fused path through cuDNN's scaled-dot-product attention where cuDNN supports the
// shape. Device twins of kernels/cpu/matmul.cpp and kernels/cpu/attention.cpp with the same semantics as the
// Backend ops of the same name (include/mptrain/backend.hpp). Storage fp16, bf16 or fp32; every GEMM computes
// in FP32 (CUBLAS_COMPUTE_32F). All pointers are device memory; every launcher enqueues on `stream` and
// returns without synchronising. Only built with MPTRAIN_WITH_CUDA.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "mptrain/dtype.hpp"

namespace mpt::cuda {

/// How attention_forward/attention_backward compute.
enum class AttentionImpl : uint8_t {
  unfused,  ///< batched strided GEMMs + softmax kernel; saves the probabilities att[B,NH,T,T]
  cudnn,    ///< cuDNN SDPA (flash-attention style); saves only the per-row softmax statistics in `att`
};

/// Owns a cuBLASLt handle, a cuDNN handle (when used), cached descriptors/plans and a grow-only device
/// workspace for the ops below. Move-only; one per CUDA backend (per device and stream). Not thread-safe.
class BlasContext {
 public:
  /// Creates the handles on the current device. Throws mpt::LibraryError when cuBLASLt cannot start.
  BlasContext();
  ~BlasContext();
  BlasContext(BlasContext&&) noexcept;
  BlasContext& operator=(BlasContext&&) noexcept;
  BlasContext(const BlasContext&) = delete;
  BlasContext& operator=(const BlasContext&) = delete;

  /// Implementation private to kernels/cuda/.
  struct State;
  State& state() { return *state_; }

 private:
  std::unique_ptr<State> state_;
};

/// torch.nn.Linear: out[rows,OC] = inp[rows,IC] @ weight[OC,IC]^T + bias[OC] (bias may be null; fused as a
/// cuBLASLt epilogue). Overwrites out. Throws mpt::Error for bad sizes or a null pointer, LibraryError on a
/// cuBLASLt failure.
void matmul_forward(BlasContext& ctx, void* out, const void* inp, const void* weight, const void* bias,
                    int64_t rows, int64_t IC, int64_t OC, DType dtype, cudaStream_t stream);

/// Gradients of matmul_forward, accumulated (beta = 1): dinp[rows,IC] += dout @ weight (skipped when dinp is
/// null); dweight[OC,IC] += dout^T @ inp; dbias[OC] += column sums of dout (skipped when null; FP32
/// accumulation, one rounding on store).
void matmul_backward(BlasContext& ctx, void* dinp, void* dweight, void* dbias, const void* dout,
                     const void* inp, const void* weight, int64_t rows, int64_t IC, int64_t OC, DType dtype,
                     cudaStream_t stream);

/// The backward of a linear layer whose input is inp = GELU(pre) (Backend::matmul_backward_gelu): dweight +=,
/// dbias += as matmul_backward (first, so dpre may alias inp), then dpre[rows,IC] = dout @ weight (beta = 0,
/// one rounding) and cuda::gelu_backward_inplace on it: bitwise matmul_backward into a zeroed buffer followed
/// by gelu_backward into a zeroed dpre.
void matmul_backward_gelu(BlasContext& ctx, void* dpre, void* dweight, void* dbias, const void* dout,
                          const void* inp, const void* weight, const void* pre, int64_t rows, int64_t IC,
                          int64_t OC, DType dtype, cudaStream_t stream);

/// Bytes that attention_forward saves in `att` for `impl`: B*NH*T*T elements of dtype (unfused) or the
/// softmax statistics B*NH*T FP32 (cudnn).
size_t attention_saved_bytes(AttentionImpl impl, int64_t B, int64_t T, int64_t NH, DType dtype);

/// True when `impl` can run this shape and dtype on the context's device. unfused: any storage dtype.
/// cudnn: built with MPTRAIN_WITH_CUDNN, dtype f16 or bf16, hs = C/NH a multiple of 8 and at most 128, and
/// cuDNN's SDPA accepts both the forward and the backward graph for (B, T, NH, hs, dtype) on this device;
/// the first call for a shape builds those graphs (milliseconds to seconds) and caches them with the answer,
/// later calls are a map lookup. When false and `why_not` is not null, *why_not receives the reason (for
/// cudnn, cuDNN's own message where it refused). Throws mpt::Error for a bad shape (C not a multiple of NH).
bool attention_supported(BlasContext& ctx, AttentionImpl impl, int64_t B, int64_t T, int64_t C, int64_t NH,
                         DType dtype, std::string* why_not = nullptr);

/// Causal multi-head self-attention (GPT-2; scale 1/sqrt(C/NH)). qkv[B,T,3C] holds q, k, v (each [NH, hs] per
/// position, hs = C/NH); out[B,T,C] overwritten; `att` receives what backward needs (attention_saved_bytes).
/// cudnn additionally needs qkv, out and att 16-byte aligned. Throws mpt::Error when `impl` is not supported
/// for the shape (with the reason) or a pointer is null or misaligned, LibraryError when cuDNN fails.
void attention_forward(BlasContext& ctx, AttentionImpl impl, void* out, void* att, const void* qkv, int64_t B,
                       int64_t T, int64_t C, int64_t NH, DType dtype, cudaStream_t stream);

/// dqkv[B,T,3C] += gradient of attention_forward given dout[B,T,C], what forward saved in att and forward's
/// output out[B,T,C] (read by cudnn only), with the same impl as forward. cudnn computes dq, dk, dv into
/// device scratch (rounded to the storage type there) and adds them into dqkv in FP32 with one more rounding;
/// all pointers 16-byte aligned. Throws as attention_forward.
void attention_backward(BlasContext& ctx, AttentionImpl impl, void* dqkv, const void* dout, const void* qkv,
                        const void* att, const void* out, int64_t B, int64_t T, int64_t C, int64_t NH,
                        DType dtype, cudaStream_t stream);

}  // namespace mpt::cuda
