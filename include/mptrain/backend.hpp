// Backend: where buffers live and the ops that run on them, implemented by the CPU backend (kernels/cpu/) and
// the CUDA backend (kernels/cuda/). The trainer and the engine are written once against it.
//
// This part holds memory management and the optimizer-side ops of the mixed-precision step (DESIGN.md phases
// 4, 6 and 7); the model's forward/backward ops join it with the model. Pointers passed to ops are in the
// backend's memory (host for CPU, device for CUDA). Ops run on the backend's stream, in order; the CPU
// backend runs them synchronously.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>

#include "common/adamw.hpp"
#include "mptrain/dtype.hpp"

namespace mpt {

class Backend;

/// Move-only owner of one allocation of a Backend. Freed (and uncounted) on destruction; never throws.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend* owner, void* data, size_t num_bytes) : owner_(owner), data_(data), num_bytes_(num_bytes) {}
  ~Buffer() { reset(); }
  Buffer(Buffer&& other) noexcept { *this = std::move(other); }
  Buffer& operator=(Buffer&& other) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t num_bytes() const { return num_bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  /// Frees the allocation now.
  void reset() noexcept;

 private:
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  size_t num_bytes_ = 0;
};

/// A run of `num_elements` elements starting at element `offset` of a flat buffer.
struct ElementRange {
  size_t offset = 0;
  size_t num_elements = 0;
};

/// A run of a rank's shard that AdamW updates (see ShardSegment).
struct AdamWSegment {
  size_t shard_offset = 0;  ///< index into master/m/v
  size_t flat_offset = 0;   ///< index into the flat gradient buffer
  size_t num_elements = 0;
  bool decay = true;
};

class Backend {
 public:
  virtual ~Backend() = default;
  /// "cpu" or "cuda".
  virtual std::string name() const = 0;

  /// Allocates `num_bytes` of zeroed memory, 64-byte aligned (256 on CUDA). Throws mpt::Error when out of
  /// memory, naming the size.
  virtual Buffer allocate(size_t num_bytes) = 0;
  /// Bytes currently allocated through allocate() and not yet freed (the memory accounting's ground truth).
  virtual size_t bytes_in_use() const = 0;
  /// Zeroes `num_bytes` at `dst` (backend memory).
  virtual void fill_zero(void* dst, size_t num_bytes) = 0;
  /// Copies host -> backend memory.
  virtual void copy_from_host(void* dst, const void* src, size_t num_bytes) = 0;
  /// Copies backend -> host memory (waits for preceding ops).
  virtual void copy_to_host(void* dst, const void* src, size_t num_bytes) = 0;
  /// Waits until every op issued so far has finished.
  virtual void synchronize() = 0;

  /// Phase 4: one read-only pass over `ranges` of the flat gradient buffer `grads` (dtype `grad_dtype`).
  /// Each range's length is a multiple of `block_elements`. Writes, for every block in range order, the FP64
  /// sum of squares of its elements in an order fixed by the element positions within the block (so the
  /// same on every run, thread count and number of ranks; block_sums_out, host memory, one double per block)
  /// and returns true when any element is inf or NaN (then block sums are unspecified).
  virtual bool grad_check(const void* grads, DType grad_dtype, std::span<const ElementRange> ranges,
                          size_t block_elements, std::span<double> block_sums_out) = 0;

  /// Phase 6: AdamW (kernels/common/adamw.hpp) on FP32 `master`, `m`, `v` (indexed by shard offset) reading
  /// the stored gradient `grads[flat_offset + i] * step.grad_multiplier` for every segment element.
  virtual void adamw(float* master, float* m, float* v, const void* grads, DType grad_dtype,
                     std::span<const AdamWSegment> segments, const common::AdamWStep& step) = 0;

  /// Phase 7: params[ranges[k].offset + i] = round(master[shard position]) to `param_dtype`, with the shard
  /// position running through the ranges consecutively from 0 (round to nearest even).
  virtual void cast_master(void* params, DType param_dtype, const float* master,
                           std::span<const ElementRange> ranges) = 0;

  /// Called by Buffer to free memory; not for direct use.
  virtual void release(void* data, size_t num_bytes) noexcept = 0;
};

/// The CPU backend (OpenMP; thread count from OMP_NUM_THREADS / omp_set_num_threads).
std::unique_ptr<Backend> make_cpu_backend();

}  // namespace mpt
