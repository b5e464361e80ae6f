// CUDA device discovery for the backend and for tests that must skip without a GPU.
#include "mptrain/cuda_ops.hpp"

namespace mpt::cuda {

int device_count() {
  int n = 0;
  // No driver or no device both mean "no usable GPU" here; clear the sticky error state for later calls.
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace mpt::cuda
