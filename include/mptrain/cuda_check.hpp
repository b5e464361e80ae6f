// MPT_CUDA_CHECK, MPT_CUDA_LAUNCH_CHECK and MPT_CUBLAS_CHECK: evaluate a CUDA runtime or cuBLAS/cuBLASLt
// call once and throw mpt::LibraryError with rank, host, file:line, the call and the library's own text
// (cudaGetErrorString, cublasLtGetStatusString). Include only from CUDA-enabled code.
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
