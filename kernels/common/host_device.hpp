// MPT_HD marks element math that both backends share: __host__ __device__ under nvcc, plain inline in C++.
#pragma once

#if defined(__CUDACC__)
#define MPT_HD __host__ __device__ __forceinline__
#else
#define MPT_HD inline
#endif
