// The fused attention path through cuDNN's scaled-dot-product attention (kernels/cuda/attention_cudnn.cu),
// called by the dispatch in kernels/cuda/attention.cu. Shapes follow include/mptrain/cuda_blas.hpp with
// hs = C/NH; the caller has checked B, T, C, NH and the pointers for null. State lives in the context's
// BlasContext::State::cudnn (created on first use). Without MPTRAIN_WITH_CUDNN every shape is unsupported.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "cuda/blas_context.cuh"
#include "mptrain/dtype.hpp"

namespace mpt::cuda {

/// attention_supported(cudnn): dtype f16/bf16, hs % 8 == 0, hs <= 128, and cuDNN builds and supports both the
/// forward and the backward graph for (B, T, NH, hs, dtype). Builds and caches those graphs (and a refusal)
/// on first use. On false, *why_not (when not null) gets the reason. Never throws for an unsupported shape;
/// throws mpt::Error only where memory runs out.
bool cudnn_attention_supported(BlasContext::State& state, int64_t B, int64_t T, int64_t NH, int64_t hs,
                               DType dtype, std::string* why_not);

/// out[B,T,C] = causal softmax(q k^T / sqrt(hs)) v, read in place from qkv[B,T,3C]; stats[B,NH,T] (FP32)
/// receives each query row's softmax log-sum-exp (natural log, of the scaled scores) for the backward.
/// Enqueued on `stream`. Throws mpt::Error when the shape is unsupported or a pointer is not 16-byte
/// aligned, LibraryError when cuDNN fails.
void cudnn_attention_forward(BlasContext::State& state, void* out, float* stats, const void* qkv, int64_t B,
                             int64_t T, int64_t NH, int64_t hs, DType dtype, cudaStream_t stream);

/// dqkv[B,T,3C] += (dq, dk, dv) of cudnn_attention_forward given dout[B,T,C], the forward's stats and its
/// output out[B,T,C]. cuDNN writes the gradients into context scratch in the storage type; they are added
/// into dqkv in FP32 and rounded once. Enqueued on `stream`. Throws as cudnn_attention_forward.
void cudnn_attention_backward(BlasContext::State& state, void* dqkv, const void* dout, const void* qkv,
                              const float* stats, const void* out, int64_t B, int64_t T, int64_t NH,
                              int64_t hs, DType dtype, cudaStream_t stream);

/// Whether this build has the cuDNN path (MPTRAIN_WITH_CUDNN).
bool cudnn_attention_built();

/// Validates the forward and backward graph descriptions that the path would build for (B, T, NH, hs, dtype)
/// against the frontend's SDPA support rules for compute capability `sm_version` (90 for Hopper), without a
/// device or a cuDNN handle, with the same deterministic-then-default fallback. Returns "" when both are
/// accepted, else the reason. For tests on machines without a GPU: it checks the descriptions, not the
/// plans or the numbers. Throws mpt::Error for sm_version <= 0.
std::string cudnn_attention_validate_offline(int64_t B, int64_t T, int64_t NH, int64_t hs, DType dtype,
                                             int sm_version);

}  // namespace mpt::cuda
