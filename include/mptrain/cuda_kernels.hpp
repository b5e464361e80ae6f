// Launchers of the CUDA model-op kernels of the GPT-2 forward/backward: embeddings
// (kernels/cuda/embedding.cu), LayerNorm (layernorm.cu), GELU / residual / accumulation (elementwise.cu) and
// the fused softmax cross-entropy (crossentropy.cu). Device twins of the CPU ops in kernels/cpu/ with the
// Backend semantics of the same names (include/mptrain/backend.hpp): the same overwrite-vs-accumulate
// contract, FP32 compute and accumulation, one rounding on store.
//
// All pointers are device memory unless stated. Every launcher validates its sizes and pointers first
// (mpt::Error naming the argument), enqueues on `stream` and returns without synchronising; a failed launch
// throws mpt::LibraryError. Templates are instantiated for float, mpt::half and mpt::bf16 storage (the same
// bit layout as CUDA's __half and __nv_bfloat16). Indices are 64-bit throughout. Only built with
// MPTRAIN_WITH_CUDA.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "mptrain/dtype.hpp"

namespace mpt::cuda {

// ---- embedding.cu ----

/// out[B,T,C] = wte[tokens[b,t], :] + wpe[t, :] (FP32 add, one rounding). tokens: int32 [B,T] in [0, V),
/// checked by the caller (the model checks them on the host before upload); the kernel does not read them
/// against V because it does not know V.
template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, const T* wpe, int64_t B, int64_t T_,
                       int64_t C, cudaStream_t stream);

/// Bytes of device workspace embedding_backward needs for B*T positions (CUB radix-sort scratch plus three
/// int32 arrays of B*T). Queries CUB, so it needs a current CUDA device.
size_t embedding_backward_workspace_bytes(int64_t B, int64_t T_);

/// dwte[tokens[b,t], :] += dout[b,t,:]; dwpe[t, :] += sum over b of dout[b,t,:].
///
/// Deterministic, also when a token repeats: the positions are sorted by token on the device (CUB's stable
/// radix sort of (token, b*T+t) pairs, so every token's positions stay in increasing b*T+t order); one thread
/// block per (token group, 256-channel piece) sums the group's dout rows in that order in FP32 and adds the
/// sum to dwte with one rounding. No atomics: the result is bitwise the same on every run and equals the CPU
/// op's summation order. dwpe[t] sums over b in increasing order. `workspace` holds at least
/// embedding_backward_workspace_bytes(B, T_) bytes (256-byte aligned) and is clobbered.
template <typename T>
void embedding_backward(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, int64_t B, int64_t T_,
                        int64_t C, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ---- layernorm.cu ----

/// LayerNorm over the last dimension (torch.nn.LayerNorm, eps 1e-5, biased variance): out[rows,C], saves
/// mean[rows] and rstd[rows] = 1/sqrt(var + eps) in FP32. One warp per row; two passes over the row (mean,
/// then the mean of squared deviations) as the CPU op does.
template <typename T>
void layernorm_forward(T* out, float* mean, float* rstd, const T* inp, const T* weight, const T* bias,
                       int64_t rows, int64_t C, cudaStream_t stream);

/// residual[rows,C] = a + b (FP32 add, one rounding), then layernorm_forward of the stored residual, in one
/// kernel (one warp per row): bitwise residual_forward followed by layernorm_forward. residual may alias a or
/// b, not out.
template <typename T>
void residual_layernorm_forward(T* residual, T* out, float* mean, float* rstd, const T* a, const T* b,
                                const T* weight, const T* bias, int64_t rows, int64_t C, cudaStream_t stream);

/// Bytes of FP32 device workspace layernorm_backward needs (per-row-block partial sums of dweight/dbias).
size_t layernorm_backward_workspace_bytes(int64_t rows, int64_t C);

/// dinp[rows,C] +=, dweight[C] +=, dbias[C] += the LayerNorm gradients given dout and the saved statistics.
/// dinp: one warp per row (warp-shuffle reductions of the two row means of the input-gradient formula).
/// dweight/dbias: rows are cut into fixed blocks (the count depends only on `rows`); each block's FP32
/// partial sums, over its rows in order, go to their own slot of `workspace`; a second kernel adds the
/// partials in block order per channel and rounds once into the stored gradient. Deterministic; `workspace`
/// holds at least layernorm_backward_workspace_bytes(rows, C) bytes and is clobbered.
template <typename T>
void layernorm_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                        const float* mean, const float* rstd, int64_t rows, int64_t C, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);

// ---- elementwise.cu ----

/// out[n] = GELU(inp) with the tanh approximation (kernels/common/gelu.hpp). out may alias inp.
template <typename T>
void gelu_forward(T* out, const T* inp, int64_t n, cudaStream_t stream);

/// dinp[n] += dout * GELU'(inp) (kernels/common/gelu.hpp), FP32 compute, one rounding.
template <typename T>
void gelu_backward(T* dinp, const T* inp, const T* dout, int64_t n, cudaStream_t stream);

/// The GELU backward applied in place to an input gradient g just written by a GEMM (beta = 0) into
/// dpre[n]: dpre = round(0 + g * GELU'(pre)), bitwise gelu_backward into a zeroed buffer from g.
template <typename T>
void gelu_backward_inplace(T* dpre, const T* pre, int64_t n, cudaStream_t stream);

/// out[n] = a + b (FP32 add, one rounding). out may alias a or b.
template <typename T>
void residual_forward(T* out, const T* a, const T* b, int64_t n, cudaStream_t stream);

/// acc[n] += x (FP32 add, one rounding).
template <typename T>
void accumulate(T* acc, const T* x, int64_t n, cudaStream_t stream);

/// acc[n] (FP32) += float(x[n]): micro-batch gradients into the FP32 main_grad buffer. n may be 0.
template <typename T>
void accumulate_f32(float* acc, const T* x, int64_t n, cudaStream_t stream);

// ---- crossentropy.cu ----

/// Fused softmax cross-entropy over logits[rows,Vp] of which the first V columns are real, one thread block
/// per row: losses[r] (FP32) = -log softmax(logits[r, :V])[targets[r]] from an FP32 online softmax (running
/// max and rescaled sum per thread, combined across the block). When dlogits is non-null also overwrites
/// dlogits[r, j] = (softmax_j - [j == target]) * dloss * s for j < V and 0 for the padding j in [V, Vp),
/// where s = *dloss_scale (one device float, read by the kernel: no host copy) when dloss_scale is non-null
/// and 1 otherwise. dlogits may alias logits: a row is read completely before any of it is written.
/// targets: int32 [rows], device memory, in [0, V) (the caller checks them; a row whose target is outside
/// gets a NaN loss and NaN gradients rather than an out-of-bounds read).
template <typename T>
void crossentropy_forward_backward(T* dlogits, float* losses, const T* logits, const int32_t* targets,
                                   int64_t rows, int64_t V, int64_t Vp, float dloss, const float* dloss_scale,
                                   cudaStream_t stream);

}  // namespace mpt::cuda
