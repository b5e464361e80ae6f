// The CPU backend: 64-byte aligned host memory with byte accounting, and the CPU op templates dispatched on
// the storage dtype.
#include <cstdlib>
#include <cstring>

#include "cpu/ops.hpp"
#include "mptrain/error.hpp"

namespace mpt {

Buffer& Buffer::operator=(Buffer&& other) noexcept {
  if (this != &other) {
    reset();
    owner_ = other.owner_;
    data_ = other.data_;
    num_bytes_ = other.num_bytes_;
    other.owner_ = nullptr;
    other.data_ = nullptr;
    other.num_bytes_ = 0;
  }
  return *this;
}

void Buffer::reset() noexcept {
  if (owner_ && data_) owner_->release(data_, num_bytes_);
  owner_ = nullptr;
  data_ = nullptr;
  num_bytes_ = 0;
}

namespace {

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }

  Buffer allocate(size_t num_bytes) override {
    constexpr size_t kAlign = 64;
    const size_t rounded = (num_bytes + kAlign - 1) / kAlign * kAlign;
    void* p = rounded == 0 ? nullptr : std::aligned_alloc(kAlign, rounded);
    MPT_CHECK(rounded == 0 || p != nullptr, "cpu backend: out of host memory allocating {} bytes", num_bytes);
    if (p) std::memset(p, 0, rounded);
    bytes_in_use_ += num_bytes;
    return Buffer(this, p, num_bytes);
  }
  size_t bytes_in_use() const override { return bytes_in_use_; }
  void release(void* data, size_t num_bytes) noexcept override {
    std::free(data);
    bytes_in_use_ -= num_bytes;
  }
  void fill_zero(void* dst, size_t num_bytes) override {
    if (num_bytes) std::memset(dst, 0, num_bytes);
  }
  void copy_from_host(void* dst, const void* src, size_t num_bytes) override {
    if (num_bytes) std::memcpy(dst, src, num_bytes);
  }
  void copy_to_host(void* dst, const void* src, size_t num_bytes) override {
    if (num_bytes) std::memcpy(dst, src, num_bytes);
  }
  void synchronize() override {}

  bool grad_check(const void* grads, DType grad_dtype, std::span<const ElementRange> ranges,
                  size_t block_elements, std::span<double> block_sums_out) override {
    return dispatch_float_dtype(grad_dtype, [&]<typename T>() {
      return cpu::grad_check(static_cast<const T*>(grads), ranges, block_elements, block_sums_out);
    });
  }
  void adamw(float* master, float* m, float* v, const void* grads, DType grad_dtype,
             std::span<const AdamWSegment> segments, const common::AdamWStep& step) override {
    dispatch_float_dtype(grad_dtype, [&]<typename T>() {
      cpu::adamw(master, m, v, static_cast<const T*>(grads), segments, step);
    });
  }
  void cast_master(void* params, DType param_dtype, const float* master,
                   std::span<const ElementRange> ranges) override {
    dispatch_float_dtype(param_dtype,
                         [&]<typename T>() { cpu::cast_master(static_cast<T*>(params), master, ranges); });
  }

 private:
  size_t bytes_in_use_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() {
  return std::make_unique<CpuBackend>();
}

}  // namespace mpt
