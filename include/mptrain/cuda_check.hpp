// MPT_CUDA_CHECK, MPT_CUDA_LAUNCH_CHECK, MPT_CUBLAS_CHECK, MPT_CUDNN_CHECK and MPT_CUDNN_FE_CHECK: evaluate a
// CUDA runtime, cuBLAS/cuBLASLt, cuDNN or cuDNN-frontend call once and throw mpt::LibraryError with rank,
// host, file:line, the call and the library's own text (cudaGetErrorString, cublasLtGetStatusString,
// cudnnGetErrorString, the frontend's error message). Include only from CUDA-enabled code.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "mptrain/error.hpp"

#define MPT_CUDA_CHECK(call)                                                                             \
  do {                                                                                                   \
    const cudaError_t mpt_cuda_rc_ = (call);                                                             \
    if (mpt_cuda_rc_ != cudaSuccess)                                                                     \
      throw ::mpt::LibraryError(::mpt::detail::library_error_message("CUDA", __FILE__, __LINE__, #call,  \
                                                                     cudaGetErrorString(mpt_cuda_rc_))); \
  } while (0)

/// After every kernel launch: reports a bad launch configuration at once (not at the next sync).
#define MPT_CUDA_LAUNCH_CHECK() MPT_CUDA_CHECK(cudaGetLastError())

/// For cuBLAS and cuBLASLt calls (both return cublasStatus_t).
#define MPT_CUBLAS_CHECK(call)                                                            \
  do {                                                                                    \
    const cublasStatus_t mpt_cublas_rc_ = (call);                                         \
    if (mpt_cublas_rc_ != CUBLAS_STATUS_SUCCESS)                                          \
      throw ::mpt::LibraryError(::mpt::detail::library_error_message(                     \
          "cuBLAS", __FILE__, __LINE__, #call, cublasLtGetStatusString(mpt_cublas_rc_))); \
  } while (0)

/// For cuDNN calls (cudnnStatus_t). The caller includes <cudnn.h>; this header does not, so that it builds
/// where cuDNN is not installed.
#define MPT_CUDNN_CHECK(call)                                                                              \
  do {                                                                                                     \
    const cudnnStatus_t mpt_cudnn_rc_ = (call);                                                            \
    if (mpt_cudnn_rc_ != CUDNN_STATUS_SUCCESS)                                                             \
      throw ::mpt::LibraryError(::mpt::detail::library_error_message("cuDNN", __FILE__, __LINE__, #call,   \
                                                                     cudnnGetErrorString(mpt_cudnn_rc_))); \
  } while (0)

/// For cuDNN frontend calls returning cudnn_frontend::error_t (is_good() / get_message()). The caller
/// includes the frontend.
#define MPT_CUDNN_FE_CHECK(call)                                                         \
  do {                                                                                   \
    auto mpt_cudnn_fe_rc_ = (call);                                                      \
    if (!mpt_cudnn_fe_rc_.is_good())                                                     \
      throw ::mpt::LibraryError(::mpt::detail::library_error_message(                    \
          "cuDNN frontend", __FILE__, __LINE__, #call, mpt_cudnn_fe_rc_.get_message())); \
  } while (0)

namespace mpt::cuda {

/// The answer of a completion query, `rc` from cudaEventQuery or cudaStreamQuery on this thread: true for
/// cudaSuccess; false for cudaErrorNotReady, which the runtime also leaves as this thread's last error, so it
/// is cleared here (cudaGetLastError, as PyTorch's stream and event queries do) and the next
/// MPT_CUDA_LAUNCH_CHECK does not report "device not ready" for a launch that went well. Throws
/// mpt::LibraryError naming `call` for any other code.
inline bool query_completed(cudaError_t rc, const char* call) {
  if (rc == cudaErrorNotReady) {
    (void)cudaGetLastError();
    return false;
  }
  if (rc != cudaSuccess)
    throw LibraryError(
        detail::library_error_message("CUDA", __FILE__, __LINE__, call, cudaGetErrorString(rc)));
  return true;
}

}  // namespace mpt::cuda
