// The CUDA backend: device memory with byte accounting, its own non-blocking stream, and every Backend op
// dispatched on the storage dtype to the launchers in include/mptrain/cuda_kernels.hpp (model ops),
// include/mptrain/cuda_blas.hpp (cuBLASLt linear layers, attention) and include/mptrain/cuda_ops.hpp (the
// optimizer-side kernels). Ops enqueue on the backend's stream and return; copy_to_host and synchronize wait.
//
// The tables the optimizer ops take (ranges, segments, order) are uploaded once, when they are registered,
// and the arrays the kernels derive from them (block starts, cast segments) on their first use; a training
// step copies nothing: the step's scalars (loss scale, found_inf, clip factor, lr, Adam's t) live in device
// memory (common::AmpState).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "mptrain/backend.hpp"
#include "mptrain/cuda_blas.hpp"
#include "mptrain/cuda_check.hpp"
#include "mptrain/cuda_kernels.hpp"
#include "mptrain/cuda_ops.hpp"
#include "mptrain/cuda_raii.hpp"
#include "mptrain/error.hpp"

namespace mpt {

namespace {

using cuda::DeviceMemory;
using cuda::Event;
using cuda::log_cuda_failure;
using cuda::Stream;

/// Makes `device` current; constructed first so that every later member is created on that device.
struct DeviceSelection {
  explicit DeviceSelection(int device) {
    const int count = cuda::device_count();
    MPT_CHECK(count > 0, "cuda backend: no CUDA device is available");
    MPT_CHECK(device >= 0 && device < count, "cuda backend: device {} does not exist ({} devices)", device,
              count);
    MPT_CUDA_CHECK(cudaSetDevice(device));
  }
};

/// MPTRAIN_ATTENTION: unset, "auto" or "cudnn" use cuDNN SDPA where attention_supported() says so; "unfused"
/// forces the unfused path. Anything else is an input error.
bool attention_forced_unfused() {
  const char* env = std::getenv("MPTRAIN_ATTENTION");
  if (env == nullptr) return false;
  const std::string_view value(env);
  if (value.empty() || value == "auto" || value == "cudnn") return false;
  if (value == "unfused") return true;
  throw InputError(MPT_FORMAT("MPTRAIN_ATTENTION={} is not one of auto, cudnn, unfused", value));
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device)
      : device_(device), selection_(device), force_unfused_(attention_forced_unfused()) {}
  ~CudaBackend() override {
    const cudaError_t rc = cudaStreamSynchronize(stream_.get());
    if (rc != cudaSuccess) log_cuda_failure("cudaStreamSynchronize in the backend destructor", rc);
  }
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  void* native_stream() const override { return stream_.get(); }

  // ---- memory ----

  Buffer allocate(size_t num_bytes) override {
    if (num_bytes == 0) return Buffer(this, nullptr, 0);
    void* p = nullptr;
    const cudaError_t rc = cudaMalloc(&p, num_bytes);  // 256-byte aligned (CUDA guarantees it)
    if (rc != cudaSuccess) {
      (void)cudaGetLastError();
      size_t free_bytes = 0, total_bytes = 0;
      if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) (void)cudaGetLastError();
      throw Error(
          MPT_FORMAT("cuda backend: out of device memory allocating {} bytes on device {} ({} of {} "
                     "bytes free, {} in use by mptrain): {}",
                     num_bytes, device_, free_bytes, total_bytes, bytes_in_use_, cudaGetErrorString(rc)));
    }
    bytes_in_use_ += num_bytes;
    Buffer buffer(this, p, num_bytes);  // owns p from here: a failing memset frees it
    MPT_CUDA_CHECK(cudaMemsetAsync(p, 0, num_bytes, stream_.get()));
    return buffer;
  }
  size_t bytes_in_use() const override { return bytes_in_use_; }
  // cuDNN SDPA's backward stages the dq/dk/dv gradient [B,T,3C] and a workspace of about B*NH*T*T elements
  // (attention_cudnn.cu); the unfused path needs none.
  size_t attention_workspace_bytes(int64_t B, int64_t T, int64_t C, int64_t NH, DType dtype) const override {
    if (force_unfused_) return 0;
    return static_cast<size_t>(B) * static_cast<size_t>(T) * static_cast<size_t>(3 * C + NH * T) *
           dtype_size(dtype);
  }
  size_t workspace_bytes_in_use() const override { return workspace_.num_bytes(); }
  std::optional<size_t> device_free_bytes() const override {
    size_t free_bytes = 0, total_bytes = 0;
    MPT_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    return free_bytes;
  }
  void release(void* data, size_t num_bytes) noexcept override {
    if (data) {
      // Work still reading the buffer finishes first (cudaFree waits for the device too, but only
      // implicitly).
      const cudaError_t sync_rc = cudaStreamSynchronize(stream_.get());
      if (sync_rc != cudaSuccess) log_cuda_failure("cudaStreamSynchronize before cudaFree", sync_rc);
      const cudaError_t rc = cudaFree(data);
      if (rc != cudaSuccess) log_cuda_failure("cudaFree", rc);
    }
    bytes_in_use_ -= num_bytes;
  }
  void release_table(uint64_t id) noexcept override {
    const auto it = tables_.find(id);
    if (it == tables_.end()) return;
    // Ops still reading the table finish first (as in release).
    const cudaError_t rc = cudaStreamSynchronize(stream_.get());
    if (rc != cudaSuccess) log_cuda_failure("cudaStreamSynchronize before freeing a table", rc);
    tables_.erase(it);
  }
  void fill_zero(void* dst, size_t num_bytes) override {
    if (num_bytes) MPT_CUDA_CHECK(cudaMemsetAsync(dst, 0, num_bytes, stream_.get()));
  }
  void copy_from_host(void* dst, const void* src, size_t num_bytes) override {
    if (num_bytes == 0) return;
    MPT_CUDA_CHECK(cudaMemcpyAsync(dst, src, num_bytes, cudaMemcpyHostToDevice, stream_.get()));
    // From pageable memory the call returns once `src` is staged, so the caller may reuse it at once. From
    // page-locked memory the copy is truly asynchronous: wait, so the caller may still reuse `src`.
    cudaPointerAttributes attributes{};
    if (cudaPointerGetAttributes(&attributes, src) != cudaSuccess) {
      (void)cudaGetLastError();
      synchronize();
    } else if (attributes.type != cudaMemoryTypeUnregistered) {
      synchronize();
    }
  }
  void copy_to_host(void* dst, const void* src, size_t num_bytes) override {
    if (num_bytes == 0) return;
    MPT_CUDA_CHECK(cudaMemcpyAsync(dst, src, num_bytes, cudaMemcpyDeviceToHost, stream_.get()));
    synchronize();
  }
  void synchronize() override { MPT_CUDA_CHECK(cudaStreamSynchronize(stream_.get())); }

  /// Dense FP16/BF16 tensor-core peak (FP32 accumulate) of the device from the vendor data sheets: 989e12 for
  /// sm_90 (H100/H200 SXM), 312e12 for sm_80 (A100). Any other device is measured once: the best of 10
  /// 4096^3 FP16 cuBLASLt GEMMs (through cuda::matmul_forward) after 3 warm-ups, timed with CUDA events.
  double peak_flops() override {
    if (peak_flops_ > 0.0) return peak_flops_;
    int major = 0, minor = 0;
    MPT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_));
    MPT_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_));
    if (major == 9 && minor == 0)
      peak_flops_ = 989e12;
    else if (major == 8 && minor == 0)
      peak_flops_ = 312e12;
    else
      peak_flops_ = measure_fp16_gemm_flops();
    return peak_flops_;
  }

  // ---- model ops ----

  void embedding_forward(void* out, const int32_t* tokens, const void* wte, const void* wpe, int64_t B,
                         int64_t T, int64_t C, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cuda::embedding_forward(static_cast<S*>(out), tokens, static_cast<const S*>(wte),
                              static_cast<const S*>(wpe), B, T, C, stream());
    });
  }
  void embedding_backward(void* dwte, void* dwpe, const void* dout, const int32_t* tokens, int64_t B,
                          int64_t T, int64_t C, DType dtype) override {
    const size_t bytes = cuda::embedding_backward_workspace_bytes(B, T);
    void* ws = workspace(bytes);
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cuda::embedding_backward(static_cast<S*>(dwte), static_cast<S*>(dwpe), static_cast<const S*>(dout),
                               tokens, B, T, C, ws, bytes, stream());
    });
  }
  void layernorm_forward(void* out, float* mean, float* rstd, const void* inp, const void* weight,
                         const void* bias, int64_t rows, int64_t C, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cuda::layernorm_forward(static_cast<S*>(out), mean, rstd, static_cast<const S*>(inp),
                              static_cast<const S*>(weight), static_cast<const S*>(bias), rows, C, stream());
    });
  }
  void layernorm_backward(void* dinp, void* dweight, void* dbias, const void* dout, const void* inp,
                          const void* weight, const float* mean, const float* rstd, int64_t rows, int64_t C,
                          DType dtype) override {
    const size_t bytes = cuda::layernorm_backward_workspace_bytes(rows, C);
    void* ws = workspace(bytes);
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cuda::layernorm_backward(static_cast<S*>(dinp), static_cast<S*>(dweight), static_cast<S*>(dbias),
                               static_cast<const S*>(dout), static_cast<const S*>(inp),
                               static_cast<const S*>(weight), mean, rstd, rows, C, ws, bytes, stream());
    });
  }
  void residual_layernorm_forward(void* residual, void* out, float* mean, float* rstd, const void* a,
                                  const void* b, const void* weight, const void* bias, int64_t rows,
                                  int64_t C, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cuda::residual_layernorm_forward(static_cast<S*>(residual), static_cast<S*>(out), mean, rstd,
                                       static_cast<const S*>(a), static_cast<const S*>(b),
                                       static_cast<const S*>(weight), static_cast<const S*>(bias), rows, C,
                                       stream());
    });
  }
  void matmul_forward(void* out, const void* inp, const void* weight, const void* bias, int64_t rows,
                      int64_t IC, int64_t OC, DType dtype) override {
    cuda::matmul_forward(blas_, out, inp, weight, bias, rows, IC, OC, dtype, stream());
  }
  /// The GEMM with its cuBLASLt bias epilogue, then the GELU kernel on the stored output (cuBLASLt's own
  /// GELU epilogue is not the same tanh-GELU arithmetic, so it would break the bitwise contract).
  void matmul_gelu_forward(void* pre, void* out, const void* inp, const void* weight, const void* bias,
                           int64_t rows, int64_t IC, int64_t OC, DType dtype) override {
    MPT_CHECK(out != pre, "cuda::matmul_gelu_forward: out must not alias pre (the backward reads pre)");
    cuda::matmul_forward(blas_, pre, inp, weight, bias, rows, IC, OC, dtype, stream());
    if (rows == 0 || OC == 0) return;
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cuda::gelu_forward(static_cast<S*>(out), static_cast<const S*>(pre), rows * OC, stream());
    });
  }
  void matmul_backward_gelu(void* dpre, void* dweight, void* dbias, const void* dout, const void* inp,
                            const void* weight, const void* pre, int64_t rows, int64_t IC, int64_t OC,
                            DType dtype) override {
    cuda::matmul_backward_gelu(blas_, dpre, dweight, dbias, dout, inp, weight, pre, rows, IC, OC, dtype,
                               stream());
  }
  void matmul_backward(void* dinp, void* dweight, void* dbias, const void* dout, const void* inp,
                       const void* weight, int64_t rows, int64_t IC, int64_t OC, DType dtype) override {
    cuda::matmul_backward(blas_, dinp, dweight, dbias, dout, inp, weight, rows, IC, OC, dtype, stream());
  }
  void attention_forward(void* out, void* att, const void* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                         DType dtype) override {
    cuda::attention_forward(blas_, attention_impl(B, T, C, NH, dtype), out, att, qkv, B, T, C, NH, dtype,
                            stream());
  }
  void attention_backward(void* dqkv, const void* dout, const void* qkv, const void* att, const void* out,
                          int64_t B, int64_t T, int64_t C, int64_t NH, DType dtype) override {
    // The same shape gives the same choice as in forward, so backward reads what forward saved.
    cuda::attention_backward(blas_, attention_impl(B, T, C, NH, dtype), dqkv, dout, qkv, att, out, B, T, C,
                             NH, dtype, stream());
  }
  /// What the path this shape takes saves (the same choice as forward and backward): only the softmax
  /// statistics on the cuDNN path, the probabilities on the unfused one.
  size_t attention_saved_bytes(int64_t B, int64_t T, int64_t C, int64_t NH, DType dtype) override {
    return cuda::attention_saved_bytes(attention_impl(B, T, C, NH, dtype), B, T, NH, dtype);
  }
  void gelu_forward(void* out, const void* inp, int64_t n, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cuda::gelu_forward(static_cast<S*>(out), static_cast<const S*>(inp), n, stream());
    });
  }
  void gelu_backward(void* dinp, const void* inp, const void* dout, int64_t n, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cuda::gelu_backward(static_cast<S*>(dinp), static_cast<const S*>(inp), static_cast<const S*>(dout), n,
                          stream());
    });
  }
  void residual_forward(void* out, const void* a, const void* b, int64_t n, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cuda::residual_forward(static_cast<S*>(out), static_cast<const S*>(a), static_cast<const S*>(b), n,
                             stream());
    });
  }
  void accumulate(void* acc, const void* x, int64_t n, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cuda::accumulate(static_cast<S*>(acc), static_cast<const S*>(x), n, stream());
    });
  }
  void accumulate_f32(float* acc, const void* x, int64_t n, DType dtype) override {
    dispatch_float_dtype(
        dtype, [&]<typename S>() { cuda::accumulate_f32(acc, static_cast<const S*>(x), n, stream()); });
  }
  void crossentropy_forward_backward(void* dlogits, float* losses, const void* logits, const int32_t* targets,
                                     int64_t rows, int64_t V, int64_t Vp, float dloss,
                                     const float* dloss_scale, DType dtype) override {
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cuda::crossentropy_forward_backward(static_cast<S*>(dlogits), losses, static_cast<const S*>(logits),
                                          targets, rows, V, Vp, dloss, dloss_scale, stream());
    });
  }

  // ---- optimizer-side ops: the mixed-precision state lives in device memory (common::AmpState), so a
  // whole step is enqueued without reading anything back (DESIGN.md, "Numerics contract") ----

  void sum_losses(double* acc, const float* losses, int64_t n) override {
    cuda::sum_losses(acc, losses, n, stream());
  }

  void grad_check(const void* grads, DType grad_dtype, const Table<ElementRange>& ranges,
                  size_t block_elements, double* block_sums, common::AmpState* state,
                  bool stop_requested) override {
    MPT_CHECK(block_elements >= 1, "cuda grad_check: block_elements must be >= 1");
    MPT_CHECK(state != nullptr, "cuda grad_check: state is null");
    DeviceTable& table = device_table(ranges, "cuda grad_check");
    size_t num_blocks = 0;
    for (const ElementRange& r : ranges.host()) {
      MPT_CHECK(r.num_elements % block_elements == 0,
                "cuda grad_check: range at offset {} has {} elements, not a multiple of the block size {}",
                r.offset, r.num_elements, block_elements);
      num_blocks += r.num_elements / block_elements;
    }
    float* found_inf = &state->flags[common::kFoundInf];
    if (num_blocks > 0) {
      // Each block's first element, derived from the ranges once per block size.
      if (table.block_starts_for != block_elements) {
        std::vector<size_t> starts;
        starts.reserve(num_blocks);
        for (const ElementRange& r : ranges.host())
          for (size_t b = 0; b < r.num_elements; b += block_elements) starts.push_back(r.offset + b);
        if (table.block_starts.data()) synchronize();  // no op still reads the starts of the other size
        table.block_starts = upload(std::span<const size_t>(starts));
        table.block_starts_for = block_elements;
      }
      // The launcher zeroes *found_inf on the stream before the pass.
      dispatch_float_dtype(grad_dtype, [&]<typename S>() {
        cuda::grad_check(block_sums, found_inf, static_cast<const S*>(grads),
                         static_cast<const size_t*>(table.block_starts.data()), num_blocks, block_elements,
                         stream());
      });
    } else {
      cuda::write_flag(found_inf, 0.0f, stream());  // a rank with an empty shard still owns the flag
    }
    cuda::write_flag(&state->flags[common::kStopRequested], stop_requested ? 1.0f : 0.0f, stream());
  }

  void amp_prepare(common::AmpState* state, const double* gathered_block_sums, const Table<size_t>& order,
                   const common::OptimizerRule& rule) override {
    const DeviceTable& table = device_table(order, "cuda amp_prepare");
    cuda::amp_prepare(state, gathered_block_sums, static_cast<const size_t*>(table.elements.data()),
                      order.size(), rule, stream());
  }

  void adamw(float* master, float* m, float* v, const void* grads, DType grad_dtype,
             const Table<AdamWSegment>& segments, const common::AmpState* state) override {
    const DeviceTable& table = device_table(segments, "cuda adamw");
    if (segments.empty()) return;
    size_t max_elements = 0;
    for (const AdamWSegment& s : segments.host()) max_elements = std::max(max_elements, s.num_elements);
    dispatch_float_dtype(grad_dtype, [&]<typename S>() {
      cuda::adamw(master, m, v, static_cast<const S*>(grads),
                  static_cast<const AdamWSegment*>(table.elements.data()), segments.size(), max_elements,
                  state, stream());
    });
  }

  void sum_squares(const void* data, DType dtype, size_t offset, size_t num_elements, double* out) override {
    if (!sum_partials_.data()) sum_partials_ = DeviceMemory(cuda::kSumSquaresBlocks * sizeof(double));
    dispatch_float_dtype(dtype, [&]<typename S>() {
      cuda::sum_squares(out, static_cast<const S*>(data) + offset, num_elements,
                        static_cast<double*>(sum_partials_.data()), stream());
    });
  }

  void noise_prepare(common::AmpState* state, const double* gathered, const Table<size_t>& indices,
                     const common::NoiseRule& rule) override {
    const DeviceTable& table = device_table(indices, "cuda noise_prepare");
    cuda::noise_prepare(state, gathered, static_cast<const size_t*>(table.elements.data()), indices.size(),
                        rule, stream());
  }

  void lamb_moments(float* master, float* m, float* v, const void* grads, DType grad_dtype,
                    const Table<LambSegment>& segments, double* segment_sums,
                    const common::AmpState* state) override {
    const DeviceTable& table = device_table(segments, "cuda lamb_moments");
    if (segments.empty()) return;
    dispatch_float_dtype(grad_dtype, [&]<typename S>() {
      cuda::lamb_moments(master, m, v, static_cast<const S*>(grads),
                         static_cast<const LambSegment*>(table.elements.data()), segments.size(),
                         segment_sums, state, stream());
    });
  }

  void lamb_trust(float* trust, const double* gathered_sums, const Table<size_t>& order,
                  const Table<size_t>& tensor_begin, const common::AmpState* state) override {
    const DeviceTable& o = device_table(order, "cuda lamb_trust");
    const DeviceTable& b = device_table(tensor_begin, "cuda lamb_trust");
    MPT_CHECK(!tensor_begin.empty() && tensor_begin.host().back() == order.size(),
              "cuda lamb_trust: tensor_begin must end at the order's length {}", order.size());
    if (order.empty()) return;
    cuda::lamb_trust(trust, gathered_sums, static_cast<const size_t*>(o.elements.data()),
                     static_cast<const size_t*>(b.elements.data()), tensor_begin.size() - 1, state, stream());
  }

  void lamb_apply(float* master, const float* m, const float* v, const Table<LambSegment>& segments,
                  const float* trust, const common::AmpState* state) override {
    const DeviceTable& table = device_table(segments, "cuda lamb_apply");
    if (segments.empty()) return;
    cuda::lamb_apply(master, m, v, static_cast<const LambSegment*>(table.elements.data()), segments.size(),
                     trust, state, stream());
  }

  void cast_master(void* params, DType param_dtype, const float* master, const Table<ElementRange>& ranges,
                   const common::AmpState* state) override {
    DeviceTable& table = device_table(ranges, "cuda cast_master");
    size_t num_segments = 0, max_elements = 0;
    for (const ElementRange& r : ranges.host()) {
      num_segments += r.num_elements > 0 ? 1 : 0;
      max_elements = std::max(max_elements, r.num_elements);
    }
    if (num_segments == 0) return;
    // The kernel's segments (shard position running through the non-empty ranges), derived once.
    if (table.cast_segments.data() == nullptr) {
      std::vector<AdamWSegment> segments;
      size_t shard_position = 0;
      for (const ElementRange& r : ranges.host()) {
        if (r.num_elements == 0) continue;
        segments.push_back({shard_position, r.offset, r.num_elements, true});
        shard_position += r.num_elements;
      }
      table.cast_segments = upload(std::span<const AdamWSegment>(segments));
    }
    dispatch_float_dtype(param_dtype, [&]<typename S>() {
      cuda::cast_master(static_cast<S*>(params), master,
                        static_cast<const AdamWSegment*>(table.cast_segments.data()), num_segments,
                        max_elements, state ? &state->flags[common::kFoundInf] : nullptr, stream());
    });
  }

  void amp_update(common::AmpState* state, const common::ScalerRule& rule) override {
    cuda::amp_update(state, rule, stream());
  }

 protected:
  void store_table(uint64_t id, const void* data, size_t num_bytes) override {
    DeviceTable table;
    table.elements = upload(std::span<const std::byte>(static_cast<const std::byte*>(data), num_bytes));
    tables_.emplace(id, std::move(table));
  }

 private:
  cudaStream_t stream() const { return stream_.get(); }

  /// A device scratch area of at least `num_bytes`, grown (never shrunk) on demand. Reuse between ops is
  /// ordered by the stream; growing waits for the stream before freeing the old area.
  void* workspace(size_t num_bytes) {
    if (workspace_.num_bytes() < num_bytes) {
      const size_t grown = std::max(num_bytes, 2 * workspace_.num_bytes());
      synchronize();       // no op still uses the old area
      workspace_.reset();  // free first: peak memory is one workspace
      workspace_ = DeviceMemory(grown);
    }
    return workspace_.data();
  }

  /// A registered table's device copy, and the arrays the ops derive from it on first use.
  struct DeviceTable {
    DeviceMemory elements;      // the registered elements
    DeviceMemory block_starts;  // grad_check: each block's first element, for block size block_starts_for
    size_t block_starts_for = 0;
    DeviceMemory cast_segments;  // cast_master: the ranges as AdamWSegments with shard positions
  };

  /// Device copy of `values` (null for none), enqueued on the stream. From pageable memory the copy is staged
  /// before the call returns, so `values` may go away afterwards.
  template <typename E>
  DeviceMemory upload(std::span<const E> values) {
    DeviceMemory memory(values.size_bytes());
    if (!values.empty())
      MPT_CUDA_CHECK(cudaMemcpyAsync(memory.data(), values.data(), values.size_bytes(),
                                     cudaMemcpyHostToDevice, stream()));
    return memory;
  }

  /// The device side of `table`; throws mpt::Error (naming `op`) for a table of another backend.
  template <typename E>
  DeviceTable& device_table(const Table<E>& table, const char* op) {
    const auto it = tables_.find(table.id());
    MPT_CHECK(table.owner() == this && it != tables_.end(),
              "{}: the table is not registered with this backend", op);
    return it->second;
  }

  double measure_fp16_gemm_flops() {
    constexpr int64_t n = 4096;
    constexpr int kWarmup = 3, kRuns = 10;
    const size_t bytes = static_cast<size_t>(n * n) * sizeof(half);
    DeviceMemory a(bytes), b(bytes), c(bytes);
    // 0x3c3c is about 1.06 in FP16: non-zero operands, so the timing is not flattered by zeros.
    MPT_CUDA_CHECK(cudaMemsetAsync(a.data(), 0x3c, bytes, stream()));
    MPT_CUDA_CHECK(cudaMemsetAsync(b.data(), 0x3c, bytes, stream()));
    for (int i = 0; i < kWarmup; ++i)
      cuda::matmul_forward(blas_, c.data(), a.data(), b.data(), nullptr, n, n, n, DType::f16, stream());
    const Event start = Event::create(true), stop = Event::create(true);
    float best_ms = 0.0f;
    for (int i = 0; i < kRuns; ++i) {
      MPT_CUDA_CHECK(cudaEventRecord(start.get(), stream()));
      cuda::matmul_forward(blas_, c.data(), a.data(), b.data(), nullptr, n, n, n, DType::f16, stream());
      MPT_CUDA_CHECK(cudaEventRecord(stop.get(), stream()));
      MPT_CUDA_CHECK(cudaEventSynchronize(stop.get()));
      float ms = 0.0f;
      MPT_CUDA_CHECK(cudaEventElapsedTime(&ms, start.get(), stop.get()));
      if (i == 0 || ms < best_ms) best_ms = ms;
    }
    MPT_CHECK(best_ms > 0.0f, "cuda backend: the FP16 GEMM timing came out as {} ms", best_ms);
    return 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n) /
           (static_cast<double>(best_ms) * 1e-3);
  }

  // Declaration order is construction order: the device is selected before anything is created on it.
  int device_;
  DeviceSelection selection_;
  bool force_unfused_;
  Stream stream_ = Stream::create();
  cuda::BlasContext blas_;
  DeviceMemory workspace_;
  DeviceMemory sum_partials_;  // sum_squares' first-pass partials (stream-ordered reuse)
  std::unordered_map<uint64_t, DeviceTable> tables_;  // registered tables by id
  size_t bytes_in_use_ = 0;
  double peak_flops_ = 0.0;

  /// The attention path for a shape: cuDNN SDPA where supported and not forced off, else unfused.
  cuda::AttentionImpl attention_impl(int64_t B, int64_t T, int64_t C, int64_t NH, DType dtype) {
    if (!force_unfused_ && cuda::attention_supported(blas_, cuda::AttentionImpl::cudnn, B, T, C, NH, dtype))
      return cuda::AttentionImpl::cudnn;
    return cuda::AttentionImpl::unfused;
  }
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device) {
  return std::make_unique<CudaBackend>(device);
}

}  // namespace mpt
