// CUDA token + position embedding of GPT-2: the forward gather and a deterministic backward scatter.
//
// Backward determinism (the CPU op's scheme, kernels/cpu/embedding.cpp, moved to the device): CUB's stable
// radix sort orders the (token, b*T+t) pairs by token, so each token's positions form a run in increasing
// b*T+t order. One thread block per (sorted position, channel piece) starts work only when its position opens
// a run; it then sums the run's dout rows in order (FP32) and adds the sum to the wte row with one rounding.
// Every wte row is written by exactly one block and no atomics are used, so the result is bitwise
// reproducible and independent of how often a token repeats. llm.c buckets on the host instead; here the
// tokens already live on the device, so sorting there avoids a host round trip.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <limits>

#include "cuda/dtype.cuh"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_kernels.hpp"

namespace mpt::cuda {

namespace {

constexpr int kThreads = 256;
/// Channels per block of the wte backward (one thread per channel).
constexpr int64_t kPiece = kThreads;
/// Grid cap of the grid-stride kernels.
constexpr int64_t kMaxBlocks = 65536;

size_t align256(size_t bytes) {
  return (bytes + 255) / 256 * 256;
}

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

/// CUB's scratch for sorting n (int32, int32) pairs.
size_t sort_temp_bytes(int n) {
  size_t bytes = 0;
  MPT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), n));
  return bytes;
}

}  // namespace

template <typename T>
__global__ void embedding_forward_kernel(T* out, const int32_t* tokens, const T* wte, const T* wpe,
                                         int64_t T_, int64_t C, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads) {
    const int64_t bt = i / C;
    const int64_t c = i % C;
    const int64_t t = bt % T_;
    const int64_t token = tokens[bt];
    store_from_float(out, i, load_as_float(wte, token * C + c) + load_as_float(wpe, t * C + c));
  }
}

__global__ void iota_kernel(int32_t* values, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads)
    values[i] = static_cast<int32_t>(i);
}

/// Grid (sorted position, channel piece). Blocks whose position does not open a run of equal tokens return.
template <typename T>
__global__ void embedding_backward_wte_kernel(T* dwte, const T* dout, const int32_t* sorted_tokens,
                                              const int32_t* sorted_positions, int64_t n, int64_t C) {
  const int64_t k = blockIdx.x;
  const int32_t token = sorted_tokens[k];
  if (k > 0 && sorted_tokens[k - 1] == token) return;
  const int64_t c = blockIdx.y * kPiece + threadIdx.x;
  if (c >= C) return;
  float sum = 0.0f;
  for (int64_t j = k; j < n && sorted_tokens[j] == token; ++j)
    sum += load_as_float(dout, static_cast<int64_t>(sorted_positions[j]) * C + c);
  const int64_t at = static_cast<int64_t>(token) * C + c;
  store_from_float(dwte, at, load_as_float(dwte, at) + sum);
}

template <typename T>
__global__ void embedding_backward_wpe_kernel(T* dwpe, const T* dout, int64_t B, int64_t T_, int64_t C) {
  const int64_t n = T_ * C;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < n; i += int64_t{gridDim.x} * kThreads) {
    float sum = 0.0f;
    for (int64_t b = 0; b < B; ++b) sum += load_as_float(dout, b * n + i);
    store_from_float(dwpe, i, load_as_float(dwpe, i) + sum);
  }
}

template <typename T>
void embedding_forward(T* out, const int32_t* tokens, const T* wte, const T* wpe, int64_t B, int64_t T_,
                       int64_t C, cudaStream_t stream) {
  MPT_CHECK(B > 0, "cuda::embedding_forward: B must be positive, got {}", B);
  MPT_CHECK(T_ > 0, "cuda::embedding_forward: T must be positive, got {}", T_);
  MPT_CHECK(C > 0, "cuda::embedding_forward: C must be positive, got {}", C);
  MPT_CHECK(out != nullptr, "cuda::embedding_forward: out is null");
  MPT_CHECK(tokens != nullptr, "cuda::embedding_forward: tokens is null");
  MPT_CHECK(wte != nullptr, "cuda::embedding_forward: wte is null");
  MPT_CHECK(wpe != nullptr, "cuda::embedding_forward: wpe is null");
  const int64_t n = B * T_ * C;
  embedding_forward_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(out, tokens, wte, wpe, T_, C, n);
  MPT_CUDA_LAUNCH_CHECK();
}

size_t embedding_backward_workspace_bytes(int64_t B, int64_t T_) {
  MPT_CHECK(B > 0 && T_ > 0, "cuda::embedding_backward_workspace_bytes: B ({}) and T ({}) must be positive",
            B, T_);
  MPT_CHECK(B * T_ <= std::numeric_limits<int32_t>::max(),
            "cuda::embedding_backward: B*T = {} positions exceed the int32 sort", B * T_);
  const auto n = static_cast<size_t>(B * T_);
  return 3 * align256(n * sizeof(int32_t)) + align256(sort_temp_bytes(static_cast<int>(n)));
}

template <typename T>
void embedding_backward(T* dwte, T* dwpe, const T* dout, const int32_t* tokens, int64_t B, int64_t T_,
                        int64_t C, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  MPT_CHECK(B > 0, "cuda::embedding_backward: B must be positive, got {}", B);
  MPT_CHECK(T_ > 0, "cuda::embedding_backward: T must be positive, got {}", T_);
  MPT_CHECK(C > 0, "cuda::embedding_backward: C must be positive, got {}", C);
  MPT_CHECK(dwte != nullptr, "cuda::embedding_backward: dwte is null");
  MPT_CHECK(dwpe != nullptr, "cuda::embedding_backward: dwpe is null");
  MPT_CHECK(dout != nullptr, "cuda::embedding_backward: dout is null");
  MPT_CHECK(tokens != nullptr, "cuda::embedding_backward: tokens is null");
  const size_t needed = embedding_backward_workspace_bytes(B, T_);
  MPT_CHECK(workspace != nullptr && workspace_bytes >= needed,
            "cuda::embedding_backward: workspace of {} bytes is smaller than the {} needed", workspace_bytes,
            needed);
  MPT_CHECK((C + kPiece - 1) / kPiece <= 65535,
            "cuda::embedding_backward: C = {} needs more than 65535 channel pieces", C);
  const int64_t n = B * T_;
  const size_t array_bytes = align256(static_cast<size_t>(n) * sizeof(int32_t));
  auto* base = static_cast<unsigned char*>(workspace);
  auto* positions = reinterpret_cast<int32_t*>(base);
  auto* sorted_tokens = reinterpret_cast<int32_t*>(base + array_bytes);
  auto* sorted_positions = reinterpret_cast<int32_t*>(base + 2 * array_bytes);
  void* sort_temp = base + 3 * array_bytes;
  size_t sort_bytes = workspace_bytes - 3 * array_bytes;

  iota_kernel<<<grid_for(n), kThreads, 0, stream>>>(positions, n);
  MPT_CUDA_LAUNCH_CHECK();
  MPT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_temp, sort_bytes, tokens, sorted_tokens, positions,
                                                 sorted_positions, static_cast<int>(n), 0,
                                                 static_cast<int>(sizeof(int32_t) * 8), stream));
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>((C + kPiece - 1) / kPiece));
  embedding_backward_wte_kernel<T>
      <<<grid, kThreads, 0, stream>>>(dwte, dout, sorted_tokens, sorted_positions, n, C);
  MPT_CUDA_LAUNCH_CHECK();
  embedding_backward_wpe_kernel<T><<<grid_for(T_ * C), kThreads, 0, stream>>>(dwpe, dout, B, T_, C);
  MPT_CUDA_LAUNCH_CHECK();
}

#define MPT_INSTANTIATE_EMBEDDING(T)                                                                      \
  template void embedding_forward<T>(T*, const int32_t*, const T*, const T*, int64_t, int64_t, int64_t,   \
                                     cudaStream_t);                                                       \
  template void embedding_backward<T>(T*, T*, const T*, const int32_t*, int64_t, int64_t, int64_t, void*, \
                                      size_t, cudaStream_t);

MPT_INSTANTIATE_EMBEDDING(float)
MPT_INSTANTIATE_EMBEDDING(half)
MPT_INSTANTIATE_EMBEDDING(bf16)

#undef MPT_INSTANTIATE_EMBEDDING

}  // namespace mpt::cuda
