// Backend: where buffers live and the ops that run on them, implemented by the CPU backend (kernels/cpu/) and
// the CUDA backend (kernels/cuda/). The trainer and the engine are written once against it.
//
// It holds memory management, the model's forward/backward ops (GPT-2) and the optimizer-side ops of the
// mixed-precision step (docs/DESIGN.md phases 4, 6 and 7). Pointers passed to ops are in the backend's memory
// (host for CPU, device for CUDA). Ops run on the backend's stream, in order; the CPU backend runs them
// synchronously.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/adamw.hpp"
#include "common/amp_state.hpp"
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

/// A piece of a rank's shard that LAMB updates: one norm segment (NormSegment) of this rank, at most one norm
/// block long, inside one tensor.
struct LambSegment {
  size_t shard_offset = 0;  ///< index into master/m/v
  size_t flat_offset = 0;   ///< index into the flat gradient buffer
  size_t num_elements = 0;
  uint32_t tensor = 0;  ///< index of the tensor's trust ratio
  uint32_t decay = 1;   ///< 0: no weight decay and trust 1 (biases, LayerNorm); 32-bit so no padding bytes
};

/// Move-only handle of a table registered with a Backend (Backend::register_table): a fixed array of `E`
/// (ranges, segments, an order) that ops read on every call. It keeps the host copy; the backend keeps
/// whatever copy its ops read (nothing more on the CPU, a device copy on CUDA), released when the handle is
/// destroyed, which must happen before the backend is. Never throws.
template <typename E>
class Table {
 public:
  Table() = default;
  ~Table() { reset(); }
  Table(Table&& other) noexcept { *this = std::move(other); }
  Table& operator=(Table&& other) noexcept;
  Table(const Table&) = delete;
  Table& operator=(const Table&) = delete;

  /// The registered elements (host memory).
  std::span<const E> host() const { return elements_; }
  size_t size() const { return elements_.size(); }
  bool empty() const { return elements_.empty(); }
  /// The backend's key of this table: unique in the process, 0 for a handle holding no table.
  uint64_t id() const { return id_; }
  /// The backend it is registered with (null for a handle holding no table).
  const Backend* owner() const { return owner_; }
  /// Releases the table now.
  void reset() noexcept;

 private:
  friend class Backend;
  Table(Backend* owner, uint64_t id, std::vector<E> elements)
      : owner_(owner), id_(id), elements_(std::move(elements)) {}

  Backend* owner_ = nullptr;
  uint64_t id_ = 0;
  std::vector<E> elements_;
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
  /// Bytes of scratch the backend keeps outside allocate() (so outside bytes_in_use()) for
  /// matmul_forward/matmul_backward of these sizes: the CPU backend's FP32 copies of fp16/bf16 operands
  /// (grow-only, shared with attention_backward); 0 where the backend needs none.
  virtual size_t matmul_workspace_bytes(int64_t rows, int64_t IC, int64_t OC, DType dtype) const {
    (void)rows, (void)IC, (void)OC, (void)dtype;
    return 0;
  }
  /// The same for attention_forward/attention_backward of this shape (CPU: per-thread FP32 rows; CUDA: the
  /// fused kernel's gradient staging and workspace).
  virtual size_t attention_workspace_bytes(int64_t B, int64_t T, int64_t C, int64_t NH, DType dtype) const {
    (void)B, (void)T, (void)C, (void)NH, (void)dtype;
    return 0;
  }
  /// Bytes of that scratch held now (it grows to the largest need so far and is kept).
  virtual size_t workspace_bytes_in_use() const { return 0; }
  /// Free memory of the device (cudaMemGetInfo's free bytes) for a device backend; nullopt for the CPU,
  /// whose memory is the host's (memory_model.hpp reads /proc/meminfo and the cgroup limit).
  virtual std::optional<size_t> device_free_bytes() const { return std::nullopt; }
  /// Zeroes `num_bytes` at `dst` (backend memory).
  virtual void fill_zero(void* dst, size_t num_bytes) = 0;
  /// Copies host -> backend memory.
  virtual void copy_from_host(void* dst, const void* src, size_t num_bytes) = 0;
  /// Copies backend -> host memory (waits for preceding ops).
  virtual void copy_to_host(void* dst, const void* src, size_t num_bytes) = 0;
  /// Waits until every op issued so far has finished.
  virtual void synchronize() = 0;
  /// Registers `elements` (host memory, copied) as a table for the ops below that take a Table<E>, so a step
  /// passes handles and copies nothing: the CPU backend reads the handle's host copy, CUDA uploads a device
  /// copy here (and an op that reads an array derived from the table, such as grad_check's block starts,
  /// builds and uploads it on its first call, kept with the table). Tables are for arrays fixed for the life
  /// of their user (an engine's ranges, segments, norm order); their memory is not counted in
  /// bytes_in_use(). Throws mpt::Error when the backend cannot hold the copy.
  template <typename E>
  Table<E> register_table(std::span<const E> elements) {
    static_assert(std::is_trivially_copyable_v<E>, "a table holds plain values");
    std::vector<E> copy(elements.begin(), elements.end());
    const uint64_t id = next_table_id();
    store_table(id, copy.data(), copy.size() * sizeof(E));
    return Table<E>(this, id, std::move(copy));
  }

  /// Peak FP32-accumulate GEMM rate of this backend in FLOP/s, the denominator of MFU: the CPU backend
  /// measures OpenBLAS SGEMM (1024^3, current OpenMP thread count) once and caches it.
  virtual double peak_flops() = 0;

  // ---- model ops (GPT-2); shapes: B batch, T sequence, C channels, NH heads, V vocab, Vp padded vocab ----

  /// out[B,T,C] = wte[tokens[b,t], :] + wpe[t, :]. tokens: int32 [B,T] in [0, V), backend memory.
  virtual void embedding_forward(void* out, const int32_t* tokens, const void* wte, const void* wpe,
                                 int64_t B, int64_t T, int64_t C, DType dtype) = 0;
  /// dwte[tokens[b,t], :] += dout[b,t,:]; dwpe[t, :] += sum over b of dout[b,t,:].
  virtual void embedding_backward(void* dwte, void* dwpe, const void* dout, const int32_t* tokens, int64_t B,
                                  int64_t T, int64_t C, DType dtype) = 0;

  /// LayerNorm over the last dimension (eps 1e-5, torch.nn.LayerNorm): out[rows,C], saves mean[rows] and
  /// rstd[rows] (FP32, 1/sqrt(var + eps), biased variance).
  virtual void layernorm_forward(void* out, float* mean, float* rstd, const void* inp, const void* weight,
                                 const void* bias, int64_t rows, int64_t C, DType dtype) = 0;
  /// dinp[rows,C] +=, dweight[C] +=, dbias[C] += the LayerNorm gradients given dout and the saved statistics.
  virtual void layernorm_backward(void* dinp, void* dweight, void* dbias, const void* dout, const void* inp,
                                  const void* weight, const float* mean, const float* rstd, int64_t rows,
                                  int64_t C, DType dtype) = 0;

  /// residual[rows,C] = a + b (as residual_forward: FP32 add, one rounding to dtype), then layernorm_forward
  /// of the stored residual into out, mean and rstd: one pass over the residual stream instead of two.
  /// Bitwise the same as residual_forward followed by layernorm_forward. residual may alias a or b, not out.
  virtual void residual_layernorm_forward(void* residual, void* out, float* mean, float* rstd, const void* a,
                                          const void* b, const void* weight, const void* bias, int64_t rows,
                                          int64_t C, DType dtype) = 0;

  /// torch.nn.Linear: out[rows,OC] = inp[rows,IC] @ weight[OC,IC]^T + bias[OC] (bias may be null).
  virtual void matmul_forward(void* out, const void* inp, const void* weight, const void* bias, int64_t rows,
                              int64_t IC, int64_t OC, DType dtype) = 0;
  /// dinp[rows,IC] += dout @ weight; dweight[OC,IC] += dout^T @ inp; dbias[OC] += column sums of dout (dbias
  /// may be null). dinp may be null when the input needs no gradient.
  virtual void matmul_backward(void* dinp, void* dweight, void* dbias, const void* dout, const void* inp,
                               const void* weight, int64_t rows, int64_t IC, int64_t OC, DType dtype) = 0;

  /// Linear layer then GELU (the MLP's c_fc): pre[rows,OC] = matmul_forward's output (bias may be null) and
  /// out[rows,OC] = GELU(pre) (tanh approximation, from the stored pre), the GELU applied while the GEMM's
  /// output rows are written. Bitwise the same as matmul_forward followed by gelu_forward. out must not alias
  /// pre (the backward reads pre).
  virtual void matmul_gelu_forward(void* pre, void* out, const void* inp, const void* weight,
                                   const void* bias, int64_t rows, int64_t IC, int64_t OC, DType dtype) = 0;
  /// matmul_backward of a linear layer whose input is inp = GELU(pre) (the MLP's c_proj), with the GELU's
  /// backward applied to the input gradient: dpre[rows,IC] = GELU'(pre) * round(dout @ weight) (OVERWRITTEN:
  /// not accumulated, so no zero-fill is needed), dweight[OC,IC] +=, dbias[OC] += (dbias may be null).
  /// Bitwise the same as matmul_backward into a zeroed g, then gelu_backward into a zeroed dpre (the input
  /// gradient rounded to dtype before the product, so FP16 overflow gives inf as it did). dpre may alias inp
  /// (the weight gradient is computed first), not pre.
  virtual void matmul_backward_gelu(void* dpre, void* dweight, void* dbias, const void* dout, const void* inp,
                                    const void* weight, const void* pre, int64_t rows, int64_t IC, int64_t OC,
                                    DType dtype) = 0;

  /// Causal multi-head self-attention (GPT-2, scale 1/sqrt(C/NH)). qkv[B,T,3C] holds q, k, v (each [NH, hs]
  /// per position, hs = C/NH); out[B,T,C]; saves the softmax probabilities att[B,NH,T,T] (entries above the
  /// diagonal are zero).
  virtual void attention_forward(void* out, void* att, const void* qkv, int64_t B, int64_t T, int64_t C,
                                 int64_t NH, DType dtype) = 0;
  /// dqkv[B,T,3C] += gradient of attention_forward given dout[B,T,C], the saved att and its output out[B,T,C]
  /// (fused kernels recompute from the statistics and need out; the CPU ignores it).
  virtual void attention_backward(void* dqkv, const void* dout, const void* qkv, const void* att,
                                  const void* out, int64_t B, int64_t T, int64_t C, int64_t NH,
                                  DType dtype) = 0;
  /// Bytes attention_forward saves in `att` for this shape on this backend, sized for the implementation the
  /// shape takes: B*NH*T*T elements of dtype for the probabilities (CPU, unfused CUDA), or only the softmax
  /// statistics where a fused kernel recomputes the rest (cuDNN SDPA: B*NH*T FP32). C = channels (hs = C/NH
  /// decides whether a fused kernel applies). May build and cache the fused kernel's plan for the shape.
  virtual size_t attention_saved_bytes(int64_t B, int64_t T, [[maybe_unused]] int64_t C, int64_t NH,
                                       DType dtype) {
    return static_cast<size_t>(B) * static_cast<size_t>(NH) * static_cast<size_t>(T) *
           static_cast<size_t>(T) * dtype_size(dtype);
  }

  /// out[n] = GELU with the tanh approximation (torch.nn.GELU(approximate="tanh")).
  virtual void gelu_forward(void* out, const void* inp, int64_t n, DType dtype) = 0;
  /// dinp[n] += dout * GELU'(inp).
  virtual void gelu_backward(void* dinp, const void* inp, const void* dout, int64_t n, DType dtype) = 0;

  /// out[n] = a + b (residual connection).
  virtual void residual_forward(void* out, const void* a, const void* b, int64_t n, DType dtype) = 0;
  /// acc[n] += x (the residual's backward, and any gradient fan-in).
  virtual void accumulate(void* acc, const void* x, int64_t n, DType dtype) = 0;
  /// acc[n] (FP32) += float(x[n]) with x in `dtype`: micro-batch gradients into the FP32 main_grad buffer.
  virtual void accumulate_f32(float* acc, const void* x, int64_t n, DType dtype) = 0;

  /// Fused softmax cross-entropy over logits[rows,Vp] of which the first V columns are real: losses[r] (FP32)
  /// = -log softmax(logits[r, :V])[targets[r]]. When dlogits is non-null also writes (overwrites) dlogits[r,
  /// j] = (softmax_j - [j == target]) * dloss * s for j < V and 0 for the padding, in the same pass over each
  /// row, where s = *dloss_scale when dloss_scale is non-null (one FP32 in backend memory: the loss scale
  /// read where it lives, so fp16 training needs no host sync for it; torch.amp.GradScaler.scale) and 1
  /// otherwise; dlogits may alias logits. targets: int32 [rows] in [0, V).
  virtual void crossentropy_forward_backward(void* dlogits, float* losses, const void* logits,
                                             const int32_t* targets, int64_t rows, int64_t V, int64_t Vp,
                                             float dloss, const float* dloss_scale, DType dtype) = 0;

  /// Adds the FP64 sum of losses[0..n) (FP32, backend memory), summed in position order on the CPU and in a
  /// fixed-shape tree on CUDA (deterministic either way), to *acc (one double, backend memory): the model's
  /// loss accumulator, read by the host only when it wants the number (GPT::take_loss_sum).
  virtual void sum_losses(double* acc, const float* losses, int64_t n) = 0;

  // ---- optimizer side of the mixed-precision step (DESIGN.md phases 4-7) ----
  // Every op below reads or writes the step state common::AmpState (kernels/common/amp_state.hpp) in backend
  // memory, so on CUDA the whole step is enqueued without a host synchronisation; the host reads the state
  // back only when it wants the numbers (MixedPrecisionEngine::result). Their tables (ranges, segments,
  // order) are registered with this backend once (register_table) and passed by handle; an op given a table
  // of another backend throws mpt::Error.

  /// Phase 4: one read-only pass over `ranges` of the flat gradient buffer `grads` (dtype `grad_dtype`).
  /// Each range's length is a multiple of `block_elements`. Writes, for every block in range order, the FP64
  /// sum of squares of its elements to block_sums[k] (backend memory, one double per block) in an order fixed
  /// by the element positions within the block (so the same on every run, thread count and number of ranks;
  /// unspecified when the block holds inf/NaN). This op owns the flags: it ZEROES
  /// state->flags[kFoundInf] and then sets it to 1 when any element is inf or NaN, and writes
  /// state->flags[kStopRequested] = stop_requested (this rank's stop request, passed by value so that no host
  /// buffer has to outlive the call). Throws mpt::Error for a range that is not a multiple of the block.
  virtual void grad_check(const void* grads, DType grad_dtype, const Table<ElementRange>& ranges,
                          size_t block_elements, double* block_sums, common::AmpState* state,
                          bool stop_requested) = 0;

  /// Phase 6, before AdamW: sums gathered_block_sums[order[0]], gathered_block_sums[order[1]], ... in FP64
  /// (the global norm's fixed block order, independent of the number of ranks: the CPU adds them one by one
  /// in that order, CUDA in a fixed-shape tree over that sequence, so each is bitwise N-independent), then
  /// common::amp_prepare: norm, clip factor, lr from Adam's t and the AdamW constants into *state. On a step
  /// whose agreed flags[kFoundInf] is set the sums are not read (norm NaN, lr 0).
  virtual void amp_prepare(common::AmpState* state, const double* gathered_block_sums,
                           const Table<size_t>& order, const common::OptimizerRule& rule) = 0;

  /// The noise scale's small-batch squares (phase 3, before a bucket's reduction, or after a micro-batch):
  /// *out (one double, backend memory) = the FP64 sum of squares of data[offset, offset + num_elements)
  /// (dtype), in an order fixed by the element positions (deterministic). inf/NaN propagate into the sum.
  virtual void sum_squares(const void* data, DType dtype, size_t offset, size_t num_elements,
                           double* out) = 0;

  /// Phase 6, after amp_prepare: the FP64 sum of gathered[indices[0]], gathered[indices[1]], ... in that
  /// order (backend memory), then common::noise_prepare(*state, sum, rule): the step's noise-scale estimate
  /// into the moving averages of state->noise. Nothing changes on a skipped step or without a small batch.
  virtual void noise_prepare(common::AmpState* state, const double* gathered, const Table<size_t>& indices,
                             const common::NoiseRule& rule) = 0;

  /// Phase 6: AdamW (kernels/common/adamw.hpp) with the constants state->step on FP32 `master`, `m`, `v`
  /// (indexed by shard offset), reading the stored gradient `grads[flat_offset + i] * step.grad_multiplier`
  /// for every segment element. Does nothing when state->flags[kFoundInf] is set (the skipped step).
  virtual void adamw(float* master, float* m, float* v, const void* grads, DType grad_dtype,
                     const Table<AdamWSegment>& segments, const common::AmpState* state) = 0;

  /// Phase 6, LAMB pass 1 (kernels/common/lamb.hpp): for every segment, the moments m and v from the stored
  /// gradient `grads[flat_offset + i] * step.grad_multiplier`, then the FP64 sums of w^2 (the master weight
  /// before the update) and of r^2 (the update direction) over the segment's elements, written to
  /// segment_sums[2k] and segment_sums[2k + 1] for segment k (backend memory). Each sum's order is fixed by
  /// the element positions within the segment (the same on every run, thread count and number of ranks).
  /// The master weights are not changed. Does nothing when state->flags[kFoundInf] is set.
  virtual void lamb_moments(float* master, float* m, float* v, const void* grads, DType grad_dtype,
                            const Table<LambSegment>& segments, double* segment_sums,
                            const common::AmpState* state) = 0;

  /// Phase 6, LAMB trust ratios: for each tensor t, sums gathered_sums[2 order[j]] (w^2) and
  /// gathered_sums[2 order[j] + 1] (r^2) for j in [tensor_begin[t], tensor_begin[t + 1]) in that order, in
  /// FP64 one by one, and writes trust[t] = common::lamb_trust(w^2, r^2, true) (backend memory, FP32,
  /// tensor_begin.size() - 1 entries). Does nothing when state->flags[kFoundInf] is set.
  virtual void lamb_trust(float* trust, const double* gathered_sums, const Table<size_t>& order,
                          const Table<size_t>& tensor_begin, const common::AmpState* state) = 0;

  /// Phase 6, LAMB pass 2: recomputes every segment element's direction r from master, m and v exactly as
  /// lamb_moments did and applies master -= lr * trust * r, with trust = trust[segment.tensor] for decay
  /// segments and 1 otherwise. Does nothing when state->flags[kFoundInf] is set.
  virtual void lamb_apply(float* master, const float* m, const float* v, const Table<LambSegment>& segments,
                          const float* trust, const common::AmpState* state) = 0;

  /// Phase 7: params[ranges[k].offset + i] = round(master[shard position]) to `param_dtype`, with the shard
  /// position running through the ranges consecutively from 0 (round to nearest even). Does nothing when
  /// `state` is non-null and state->flags[kFoundInf] is set (the weights did not change).
  virtual void cast_master(void* params, DType param_dtype, const float* master,
                           const Table<ElementRange>& ranges, const common::AmpState* state) = 0;

  /// End of the step: common::amp_update on *state (the loss-scaler state machine with the agreed found_inf,
  /// Adam's t + 1 when the step was applied, min_scale_stop when the minimum-scale rule fired).
  virtual void amp_update(common::AmpState* state, const common::ScalerRule& rule) = 0;

  /// The stream the ops run on (a cudaStream_t on CUDA; null on the CPU, whose ops are synchronous). The NCCL
  /// communicator orders its collectives after the work already issued here.
  virtual void* native_stream() const = 0;

  /// Called by Buffer to free memory; not for direct use.
  virtual void release(void* data, size_t num_bytes) noexcept = 0;
  /// Called by Table to drop the backend's copy of table `id`; not for direct use. Waits for ops still
  /// reading it.
  virtual void release_table(uint64_t id) noexcept = 0;

 protected:
  /// Called by register_table: prepares what the ops read for table `id`, `num_bytes` of host memory at
  /// `data` (the CPU backend reads the handle's host copy and stores nothing; CUDA uploads it).
  virtual void store_table(uint64_t id, const void* data, size_t num_bytes) = 0;

 private:
  /// A fresh table id, unique in the process (so an op can tell a table of another backend).
  static uint64_t next_table_id();
};

template <typename E>
Table<E>& Table<E>::operator=(Table&& other) noexcept {
  if (this != &other) {
    reset();
    owner_ = std::exchange(other.owner_, nullptr);
    id_ = std::exchange(other.id_, 0);
    elements_ = std::move(other.elements_);
    other.elements_.clear();
  }
  return *this;
}

template <typename E>
void Table<E>::reset() noexcept {
  if (owner_) owner_->release_table(id_);
  owner_ = nullptr;
  id_ = 0;
  elements_.clear();
}

/// The CPU backend (OpenMP; thread count from OMP_NUM_THREADS / omp_set_num_threads). Throws what
/// check_cpu_backend_environment() throws.
std::unique_ptr<Backend> make_cpu_backend();

/// Checks the CPU backend's environment switches, MPTRAIN_ONEDNN_F32 (oneDNN's f32 matmul instead of
/// OpenBLAS SGEMM) and MPTRAIN_ONEDNN_BF16 (oneDNN's native BF16 matmul), each unset, empty, "auto", "0" or
/// "1" (kernels/cpu/onednn_gemm.hpp). Throws mpt::InputError naming the variable for any other value, or for
/// MPTRAIN_ONEDNN_BF16=1 on a CPU without native BF16. mptrain calls it on every rank at start-up, so a bad
/// value ends the job there (exit 2) instead of at the first GEMM.
void check_cpu_backend_environment();

/// The CUDA backend on device `device` (cudaSetDevice), with its own non-blocking stream and cuBLASLt handle.
/// Defined only in builds with MPTRAIN_WITH_CUDA. Throws mpt::Error when the device cannot be used.
std::unique_ptr<Backend> make_cuda_backend(int device);

}  // namespace mpt
