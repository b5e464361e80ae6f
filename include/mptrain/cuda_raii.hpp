// Move-only owners of the CUDA objects mptrain's host code holds (STYLE.md "Memory and types"): device
// allocations, streams and events. Destructors never throw; they log. Shared by the CUDA backend and the NCCL
// communicator. Include only from CUDA-enabled code.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdio>
#include <utility>

#include "mptrain/cuda_check.hpp"
#include "mptrain/error.hpp"

namespace mpt::cuda {

/// Logs a failed CUDA call where throwing is not allowed (destructors, noexcept paths): one stderr line.
inline void log_cuda_failure(const char* what, cudaError_t rc) noexcept {
  std::fprintf(stderr, "mptrain: %s failed: %s\n", what, cudaGetErrorString(rc));
}

/// Owns a cudaMalloc allocation of num_bytes() bytes on the current device (none when default-constructed or
/// of 0 bytes).
class DeviceMemory {
 public:
  DeviceMemory() = default;
  /// Allocates `num_bytes`. Throws mpt::Error naming the size when the device is out of memory.
  explicit DeviceMemory(size_t num_bytes) : num_bytes_(num_bytes) {
    if (num_bytes == 0) return;
    const cudaError_t rc = cudaMalloc(&data_, num_bytes);
    if (rc != cudaSuccess) {
      (void)cudaGetLastError();
      data_ = nullptr;
      num_bytes_ = 0;
      throw Error(
          MPT_FORMAT("cannot allocate {} bytes of device memory: {}", num_bytes, cudaGetErrorString(rc)));
    }
  }
  ~DeviceMemory() { reset(); }
  DeviceMemory(DeviceMemory&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), num_bytes_(std::exchange(other.num_bytes_, 0)) {}
  DeviceMemory& operator=(DeviceMemory&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      num_bytes_ = std::exchange(other.num_bytes_, 0);
    }
    return *this;
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;

  void* data() const { return data_; }
  size_t num_bytes() const { return num_bytes_; }
  /// Frees now (cudaFree synchronises the device with respect to this allocation); logs a failure.
  void reset() noexcept {
    if (data_) {
      const cudaError_t rc = cudaFree(data_);
      if (rc != cudaSuccess) log_cuda_failure("cudaFree", rc);
    }
    data_ = nullptr;
    num_bytes_ = 0;
  }

 private:
  void* data_ = nullptr;
  size_t num_bytes_ = 0;
};

/// Owns a non-blocking CUDA stream (no implicit synchronisation with the legacy default stream).
class Stream {
 public:
  Stream() = default;  ///< no stream
  /// Creates a stream on the current device; `highest_priority` schedules its kernels ahead of those of
  /// default-priority streams (the communication stream). Throws mpt::LibraryError on failure.
  static Stream create(bool highest_priority = false) {
    int least = 0, greatest = 0;
    if (highest_priority) MPT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    Stream s;
    MPT_CUDA_CHECK(
        cudaStreamCreateWithPriority(&s.stream_, cudaStreamNonBlocking, highest_priority ? greatest : 0));
    return s;
  }
  ~Stream() {
    if (!stream_) return;
    if (const cudaError_t rc = cudaStreamDestroy(stream_); rc != cudaSuccess)
      log_cuda_failure("cudaStreamDestroy", rc);
  }
  Stream(Stream&& other) noexcept : stream_(std::exchange(other.stream_, nullptr)) {}
  Stream& operator=(Stream&& other) noexcept {
    std::swap(stream_, other.stream_);
    return *this;
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

/// Owns a CUDA event.
class Event {
 public:
  Event() = default;  ///< no event
  /// Creates an event; `timing` false (cudaEventDisableTiming) makes recording and waiting cheapest, true
  /// allows cudaEventElapsedTime. Throws mpt::LibraryError on failure.
  static Event create(bool timing) {
    Event e;
    MPT_CUDA_CHECK(cudaEventCreateWithFlags(&e.event_, timing ? cudaEventDefault : cudaEventDisableTiming));
    return e;
  }
  ~Event() {
    if (!event_) return;
    if (const cudaError_t rc = cudaEventDestroy(event_); rc != cudaSuccess)
      log_cuda_failure("cudaEventDestroy", rc);
  }
  Event(Event&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
  Event& operator=(Event&& other) noexcept {
    std::swap(event_, other.event_);
    return *this;
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

}  // namespace mpt::cuda
