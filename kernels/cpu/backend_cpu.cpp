// The CPU backend: 64-byte aligned host memory with byte accounting, and the CPU op templates dispatched on
// the storage dtype.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <omp.h>

#include "cpu/onednn_gemm.hpp"
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

uint64_t Backend::next_table_id() {
  static std::atomic<uint64_t> last{0};
  return ++last;
}

namespace {

/// The elements of `table`, checked to be registered with `backend` (`op` names the caller).
template <typename E>
std::span<const E> host_table(const Backend* backend, const Table<E>& table, const char* op) {
  MPT_CHECK(table.owner() == backend, "{}: the table is not registered with this backend", op);
  return table.host();
}

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  void* native_stream() const override { return nullptr; }

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
  // The FP32 staging of matmul.cpp (fp16, and bf16 without native oneDNN BF16: inp, weight, out and bias in
  // FP32; the backward and the native BF16 path need no more, so this bounds them) and attention.cpp's
  // backward (per thread q, k, v, dout, dq, dk, dv [T, hs] and two [T, T] tiles; the forward needs less), all
  // in workspace_.
  size_t matmul_workspace_bytes(int64_t rows, int64_t IC, int64_t OC, DType dtype) const override {
    if (dtype == DType::f32 || dtype == DType::f64) return 0;
    return static_cast<size_t>(rows * IC + OC * IC + rows * OC + OC) * sizeof(float);
  }
  size_t attention_workspace_bytes(int64_t /*B*/, int64_t T, int64_t C, int64_t NH,
                                   DType dtype) const override {
    if (dtype == DType::f64) return 0;
    const int64_t per_thread = 7 * T * (C / NH) + 2 * T * T;
    return static_cast<size_t>(per_thread * omp_get_max_threads()) * sizeof(float);
  }
  size_t workspace_bytes_in_use() const override { return workspace_.capacity() * sizeof(float); }
  void release(void* data, size_t num_bytes) noexcept override {
    std::free(data);
    bytes_in_use_ -= num_bytes;
  }
  /// The ops read the handle's own host copy: nothing to store or release.
  void release_table(uint64_t /*id*/) noexcept override {}
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
  double peak_flops() override {
    if (peak_flops_ == 0.0) peak_flops_ = cpu::measure_sgemm_flops(1024, 3);
    return peak_flops_;
  }

  // ---- model ops: dispatch on dtype to the templates in kernels/cpu/*.cpp ----

  void embedding_forward(void* out, const int32_t* tokens, const void* wte, const void* wpe, int64_t B,
                         int64_t T, int64_t C, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::embedding_forward(static_cast<S*>(out), tokens, static_cast<const S*>(wte),
                             static_cast<const S*>(wpe), B, T, C);
    });
  }
  void embedding_backward(void* dwte, void* dwpe, const void* dout, const int32_t* tokens, int64_t B,
                          int64_t T, int64_t C, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::embedding_backward(static_cast<S*>(dwte), static_cast<S*>(dwpe), static_cast<const S*>(dout),
                              tokens, B, T, C);
    });
  }
  void layernorm_forward(void* out, float* mean, float* rstd, const void* inp, const void* weight,
                         const void* bias, int64_t rows, int64_t C, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::layernorm_forward(static_cast<S*>(out), mean, rstd, static_cast<const S*>(inp),
                             static_cast<const S*>(weight), static_cast<const S*>(bias), rows, C);
    });
  }
  void layernorm_backward(void* dinp, void* dweight, void* dbias, const void* dout, const void* inp,
                          const void* weight, const float* mean, const float* rstd, int64_t rows, int64_t C,
                          DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::layernorm_backward(static_cast<S*>(dinp), static_cast<S*>(dweight), static_cast<S*>(dbias),
                              static_cast<const S*>(dout), static_cast<const S*>(inp),
                              static_cast<const S*>(weight), mean, rstd, rows, C);
    });
  }
  void residual_layernorm_forward(void* residual, void* out, float* mean, float* rstd, const void* a,
                                  const void* b, const void* weight, const void* bias, int64_t rows,
                                  int64_t C, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::residual_layernorm_forward(static_cast<S*>(residual), static_cast<S*>(out), mean, rstd,
                                      static_cast<const S*>(a), static_cast<const S*>(b),
                                      static_cast<const S*>(weight), static_cast<const S*>(bias), rows, C);
    });
  }
  void matmul_gelu_forward(void* pre, void* out, const void* inp, const void* weight, const void* bias,
                           int64_t rows, int64_t IC, int64_t OC, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::matmul_gelu_forward(static_cast<S*>(pre), static_cast<S*>(out), static_cast<const S*>(inp),
                               static_cast<const S*>(weight), static_cast<const S*>(bias), rows, IC, OC,
                               workspace_);
    });
  }
  void matmul_backward_gelu(void* dpre, void* dweight, void* dbias, const void* dout, const void* inp,
                            const void* weight, const void* pre, int64_t rows, int64_t IC, int64_t OC,
                            DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::matmul_backward_gelu(static_cast<S*>(dpre), static_cast<S*>(dweight), static_cast<S*>(dbias),
                                static_cast<const S*>(dout), static_cast<const S*>(inp),
                                static_cast<const S*>(weight), static_cast<const S*>(pre), rows, IC, OC,
                                workspace_);
    });
  }
  void matmul_forward(void* out, const void* inp, const void* weight, const void* bias, int64_t rows,
                      int64_t IC, int64_t OC, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::matmul_forward(static_cast<S*>(out), static_cast<const S*>(inp), static_cast<const S*>(weight),
                          static_cast<const S*>(bias), rows, IC, OC, workspace_);
    });
  }
  void matmul_backward(void* dinp, void* dweight, void* dbias, const void* dout, const void* inp,
                       const void* weight, int64_t rows, int64_t IC, int64_t OC, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::matmul_backward(static_cast<S*>(dinp), static_cast<S*>(dweight), static_cast<S*>(dbias),
                           static_cast<const S*>(dout), static_cast<const S*>(inp),
                           static_cast<const S*>(weight), rows, IC, OC, workspace_);
    });
  }
  void attention_forward(void* out, void* att, const void* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                         DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::attention_forward(static_cast<S*>(out), static_cast<S*>(att), static_cast<const S*>(qkv), B, T, C,
                             NH, workspace_);
    });
  }
  void attention_backward(void* dqkv, const void* dout, const void* qkv, const void* att, const void* /*out*/,
                          int64_t B, int64_t T, int64_t C, int64_t NH, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::attention_backward(static_cast<S*>(dqkv), static_cast<const S*>(dout), static_cast<const S*>(qkv),
                              static_cast<const S*>(att), B, T, C, NH, workspace_);
    });
  }
  void gelu_forward(void* out, const void* inp, int64_t n, DType dtype) override {
    dispatch_float_dtype(
        dtype, [&]<typename S>() { cpu::gelu_forward(static_cast<S*>(out), static_cast<const S*>(inp), n); });
  }
  void gelu_backward(void* dinp, const void* inp, const void* dout, int64_t n, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::gelu_backward(static_cast<S*>(dinp), static_cast<const S*>(inp), static_cast<const S*>(dout), n);
    });
  }
  void residual_forward(void* out, const void* a, const void* b, int64_t n, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::residual_forward(static_cast<S*>(out), static_cast<const S*>(a), static_cast<const S*>(b), n);
    });
  }
  void accumulate(void* acc, const void* x, int64_t n, DType dtype) override {
    dispatch_float_dtype(
        dtype, [&]<typename S>() { cpu::accumulate(static_cast<S*>(acc), static_cast<const S*>(x), n); });
  }
  void accumulate_f32(float* acc, const void* x, int64_t n, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() { cpu::accumulate_f32(acc, static_cast<const S*>(x), n); });
  }
  void crossentropy_forward_backward(void* dlogits, float* losses, const void* logits, const int32_t* targets,
                                     int64_t rows, int64_t V, int64_t Vp, float dloss,
                                     const float* dloss_scale, DType dtype) override {
    const float multiplier = dloss_scale ? dloss * *dloss_scale : dloss;
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cpu::crossentropy_forward_backward(static_cast<S*>(dlogits), losses, static_cast<const S*>(logits),
                                         targets, rows, V, Vp, multiplier);
    });
  }

  void sum_losses(double* acc, const float* losses, int64_t n) override { cpu::sum_losses(acc, losses, n); }

  void grad_check(const void* grads, DType grad_dtype, const Table<ElementRange>& ranges,
                  size_t block_elements, double* block_sums, common::AmpState* state,
                  bool stop_requested) override {
    MPT_CHECK(block_elements >= 1, "grad_check: block_elements must be >= 1");
    const std::span<const ElementRange> r = host_table(this, ranges, "grad_check");
    size_t num_blocks = 0;
    for (const ElementRange& range : r) num_blocks += range.num_elements / block_elements;
    const bool found = dispatch_float_dtype(grad_dtype, [&]<typename T>() {
      return cpu::grad_check(static_cast<const T*>(grads), r, block_elements,
                             std::span<double>(block_sums, num_blocks));
    });
    state->flags[common::kFoundInf] = found ? 1.0f : 0.0f;  // zeroed here, every step
    state->flags[common::kStopRequested] = stop_requested ? 1.0f : 0.0f;
  }
  void amp_prepare(common::AmpState* state, const double* gathered_block_sums, const Table<size_t>& order,
                   const common::OptimizerRule& rule) override {
    cpu::amp_prepare(*state, gathered_block_sums, host_table(this, order, "amp_prepare"), rule);
  }
  void adamw(float* master, float* m, float* v, const void* grads, DType grad_dtype,
             const Table<AdamWSegment>& segments, const common::AmpState* state) override {
    const std::span<const AdamWSegment> s = host_table(this, segments, "adamw");
    if (state->flags[common::kFoundInf] != 0.0f) return;  // skipped step
    dispatch_float_dtype(grad_dtype, [&]<typename T>() {
      cpu::adamw(master, m, v, static_cast<const T*>(grads), s, state->step);
    });
  }
  void sum_squares(const void* data, DType dtype, size_t offset, size_t num_elements, double* out) override {
    *out = dispatch_float_dtype(dtype, [&]<typename T>() {
      return cpu::sum_squares(static_cast<const T*>(data) + offset, num_elements);
    });
  }
  void noise_prepare(common::AmpState* state, const double* gathered, const Table<size_t>& indices,
                     const common::NoiseRule& rule) override {
    cpu::noise_prepare(*state, gathered, host_table(this, indices, "noise_prepare"), rule);
  }
  void lamb_moments(float* master, float* m, float* v, const void* grads, DType grad_dtype,
                    const Table<LambSegment>& segments, double* segment_sums,
                    const common::AmpState* state) override {
    const std::span<const LambSegment> s = host_table(this, segments, "lamb_moments");
    if (state->flags[common::kFoundInf] != 0.0f) return;  // skipped step
    dispatch_float_dtype(grad_dtype, [&]<typename T>() {
      cpu::lamb_moments(master, m, v, static_cast<const T*>(grads), s, segment_sums, state->step);
    });
  }
  void lamb_trust(float* trust, const double* gathered_sums, const Table<size_t>& order,
                  const Table<size_t>& tensor_begin, const common::AmpState* state) override {
    const std::span<const size_t> o = host_table(this, order, "lamb_trust");
    const std::span<const size_t> b = host_table(this, tensor_begin, "lamb_trust");
    if (state->flags[common::kFoundInf] != 0.0f) return;
    cpu::lamb_trust(trust, gathered_sums, o, b);
  }
  void lamb_apply(float* master, const float* m, const float* v, const Table<LambSegment>& segments,
                  const float* trust, const common::AmpState* state) override {
    const std::span<const LambSegment> s = host_table(this, segments, "lamb_apply");
    if (state->flags[common::kFoundInf] != 0.0f) return;
    cpu::lamb_apply(master, m, v, s, trust, state->step);
  }
  void cast_master(void* params, DType param_dtype, const float* master, const Table<ElementRange>& ranges,
                   const common::AmpState* state) override {
    const std::span<const ElementRange> r = host_table(this, ranges, "cast_master");
    if (state && state->flags[common::kFoundInf] != 0.0f) return;  // the weights did not change
    dispatch_float_dtype(param_dtype,
                         [&]<typename T>() { cpu::cast_master(static_cast<T*>(params), master, r); });
  }
  void amp_update(common::AmpState* state, const common::ScalerRule& rule) override {
    common::amp_update(*state, rule);
  }

 protected:
  void store_table(uint64_t /*id*/, const void* /*data*/, size_t /*num_bytes*/) override {}

 private:
  size_t bytes_in_use_ = 0;
  double peak_flops_ = 0.0;
  std::vector<float> workspace_;  // grow-only scratch of the GEMMs and attention backward
};

}  // namespace

void check_cpu_backend_environment() {
  (void)cpu::onednn_f32_preferred();
  (void)cpu::onednn_native_bf16();
}

std::unique_ptr<Backend> make_cpu_backend() {
  check_cpu_backend_environment();
  return std::make_unique<CpuBackend>();
}

}  // namespace mpt
