// The mixed-precision engine: DESIGN.md phases 1 and 3-7 of the training step over three flat buffers.
//
//   params  : model weights in the storage dtype (fp16/bf16/fp32), full copy on every rank
//   grads   : gradients in the storage dtype, full copy on every rank (loss-scaled in fp16 mode)
//   shard   : this rank's FP32 master weights, Adam m and v (slice r of every bucket: ZeRO-1)
//
// ZeRO stage 2 (EngineConfig::zero_stage = 2) drops the full gradient copy: backward writes each bucket into
// a staging buffer taken from a small pool (grad_address()), the bucket's reduce-scatter lands this rank's
// slice in a gradient shard (storage dtype, or FP32 with fp32_grad_accumulation), and the staging buffer
// returns to the pool only once that collective has completed (CommRequest::wait: the MPI request, or on CUDA
// the collective's event made a dependency of the compute stream). With accumulation every micro-batch's
// buckets are reduce-scattered and added into the shard (K x the gradient traffic, as DeepSpeed ZeRO-2).
//
// Phase 3 reduces each bucket (reduce-scatter by default, all-reduce as an option) as soon as the caller
// reports it ready; phase 4 checks this rank's reduced shard for inf/NaN and sums squares per fixed block;
// phase 5 agrees on found_inf with a MAX all-reduce, so every rank takes the same decision in phase 6 (skip
// and back off, or clip and AdamW or LAMB) and the loss-scale state machine stays replicated; phase 7 casts
// the shard back and all-gathers the weights. The global grad norm sums FP64 block sums in a fixed order, so
// it is bitwise the same for any number of ranks; so are LAMB's per-tensor trust ratios, which sum FP64 norm
// segments in a fixed order (docs/large_batch.md). With several ranks each bucket's local gradient is also
// squared before its reduction, for the gradient noise scale.
//
// The step's decision state (loss scale and scaler counters, found_inf, Adam's t, the LR-schedule position,
// the last norm, clip factor and lr, the noise scale's averages: common::AmpState) lives in backend memory,
// and every op of phases 4-7 reads or writes it there, so step_async() enqueues a whole step without reading
// anything back (on CUDA: no host synchronisation). result() reads it back once; the host copies behind
// scaler(), loss_scale() and applied_steps() are refreshed only by result() (and so by step()) and by
// load_state().
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "mptrain/backend.hpp"
#include "mptrain/comm.hpp"
#include "mptrain/layout.hpp"
#include "mptrain/optimizer.hpp"
#include "mptrain/scaler.hpp"

namespace mpt {

/// How gradients are reduced in phase 3.
enum class GradSync : uint8_t {
  reduce_scatter,  ///< rank r receives slice r of every bucket (2 x params bytes per step with the
                   ///< all-gather)
  all_reduce,      ///< every rank receives every bucket (3 x params bytes per step with the all-gather)
};

struct EngineConfig {
  DType dtype = DType::f16;  ///< storage of params and grads: f16, bf16 or f32
  GradSync grad_sync = GradSync::reduce_scatter;
  size_t bucket_bytes = size_t{25} << 20;  ///< gradient bucket size in bytes of `dtype` (25 MiB)
  size_t block_elements = 1024;            ///< grad-norm block and bucket padding alignment (elements)
  /// Phase 6's update rule. LAMB keeps the same state as AdamW (FP32 m and v) and takes its hyper-parameters
  /// from `adamw` too; its trust ratios use whole-tensor norms, so the step is bitwise the same for any N.
  OptimizerKind optimizer = OptimizerKind::adamw;
  AdamWConfig adamw;  ///< lr, betas, eps and weight decay of AdamW, or of LAMB
  LrSchedule schedule;
  float grad_clip = 0.0f;   ///< max global grad norm (after unscaling); 0 = no clipping
  LossScalerConfig scaler;  ///< ignored (scaler disabled) unless dtype is f16
  /// Megatron-LM's main_grad: backward writes each micro-batch's gradients (dtype) into grads(), and
  /// accumulate_micro_batch() adds them into an FP32 buffer that the reduction, the check and AdamW then
  /// read, so gradient accumulation and the all-reduce/reduce-scatter happen in FP32. Costs 4P more bytes.
  bool fp32_grad_accumulation = false;
  /// Gradient noise scale (McCandlish et al. 2018, appendix A.1): with several ranks each bucket's local
  /// gradient is squared (FP64) just before its reduction; estimates are taken on the steps that pass a
  /// NoiseBatch to step_async().
  bool noise_scale = true;
  double noise_scale_ema = 0.95;  ///< EMA factor of the estimators, in [0, 1)
  /// ZeRO stage: 1 keeps a full gradient buffer on every rank; 2 keeps only this rank's reduced shard and
  /// stages backward's buckets in `staging_buffers` pool buffers (reduce-scatter only).
  int zero_stage = 1;
  /// Stage 2: buffers of the staging pool (>= 1; at most one per bucket). Buffer i holds the i-th largest
  /// bucket, so any bucket fits buffer 0; backward needs as many as buckets it writes at once (GPT: 2, the
  /// tied wte's and the current one), and one more lets a bucket's reduce-scatter overlap the next bucket's
  /// backward.
  int staging_buffers = 3;

  /// Throws mpt::InputError naming the first bad field.
  void validate() const;
};

/// The batch of the optimizer steps that follow (MixedPrecisionEngine::set_batch): its size, and the small
/// batches of the noise-scale estimate, B_big = samples and B_small = small_samples. The small batches are
/// the ranks' local gradients (several ranks: small_samples = samples / N, small_grad_factor 1), or with one
/// rank the first micro-batch's gradient (sample_micro_batch(): small_samples = the micro-batch,
/// small_grad_factor = the accumulation steps K, since that gradient carries the factor 1/K).
/// small_samples = 0: no estimate ("n/a": one rank without accumulation).
struct StepBatch {
  int64_t samples = 1;  ///< sequences in the global batch (B_big)
  double small_samples = 0.0;
  double small_grad_factor = 1.0;
};

/// What one optimizer step did. Identical on every rank.
struct StepResult {
  bool skipped = false;         ///< found_inf: no weight, Adam state, Adam t or LR-schedule change
  float loss_scale = 1.0f;      ///< the scale the gradients carried
  double grad_norm = 0.0;       ///< global L2 norm of the unscaled gradients (NaN when skipped)
  float clip_factor = 1.0f;     ///< multiplier applied to the gradients (1 without clipping)
  float lr = 0.0f;              ///< learning rate used (0 when skipped)
  int64_t applied_steps = 0;    ///< Adam's t after this step
  int64_t applied_samples = 0;  ///< the LR-schedule position after this step (samples of applied steps)
  bool stop_requested = false;  ///< some rank passed stop_requested = true to step() (agreed by all ranks)
  /// Gradient noise scale after this step: B_noise = EMA(S) / EMA(|G|^2), and the bias-corrected EMAs of
  /// the |G|^2 and S = tr(Sigma) estimates (unscaled gradients). NaN while not available (no estimate yet,
  /// or EMA(|G|^2) <= 0 for noise_scale).
  double noise_scale = 0.0;
  double grad_sq_estimate = 0.0;
  double trace_estimate = 0.0;
  // Wall-clock seconds of the phases on this rank as seen by the host in step_async() (the CPU backend runs
  // synchronously, so these are the phases' times there; on CUDA they are enqueue times).
  double check_seconds = 0;  ///< phases 4-5: inf/NaN check, block sums, found_inf agreement
  double optimizer_seconds =
      0;                      ///< phase 6: block-sum gather, norm, clipping, AdamW or LAMB, loss-scale update
  double gather_seconds = 0;  ///< phase 7: cast and weight all-gather
};

/// Bytes per rank of the engine's buffers, read from the buffers actually allocated.
struct MemoryReport {
  size_t num_parameters = 0;  ///< P
  int world_size = 1;         ///< N
  size_t params_bytes = 0;    ///< padded flat weights
  size_t grads_bytes = 0;     ///< padded flat gradients
  size_t master_bytes = 0;    ///< FP32 master shard
  size_t adam_m_bytes = 0;    ///< FP32 Adam m shard
  size_t adam_v_bytes = 0;    ///< FP32 Adam v shard
  /// ZeRO stage 2: the staging pool (its buffers, and with fp32_grad_accumulation per buffer the FP32 copy
  /// that is reduced); 0 for stage 1.
  size_t staging_bytes = 0;
  int zero_stage = 1;                   ///< the engine's ZeRO stage
  size_t grad_element_bytes = 2;        ///< bytes per reduced gradient element (grad_dtype())
  bool fp32_grad_accumulation = false;  ///< stage 1 then also holds the micro-batch buffer (storage dtype)
  /// Grad-norm block sums (local and gathered), the step state (AmpState), and with LAMB its segment sums
  /// (local and gathered) and trust ratios.
  size_t scratch_bytes = 0;
  /// params + grads + master + m + v + staging (ZeRO-1: 4P + 12P/N plus padding in fp16 mode; ZeRO-2:
  /// 2P + 14P/N plus padding plus the staging pool).
  size_t state_bytes() const {
    return params_bytes + grads_bytes + master_bytes + adam_m_bytes + adam_v_bytes + staging_bytes;
  }
  /// The unpadded formula of the stage: ZeRO-1 esize*P + grad_element_bytes*P (+ esize*P for the micro-batch
  /// buffer of fp32 accumulation) + 12P/N; ZeRO-2 esize*P + grad_element_bytes*P/N + 12P/N (the ZeRO paper's
  /// P_os+g: 2P + 14P/N in fp16). `element_bytes` is the storage dtype's size.
  double formula_bytes(size_t element_bytes) const;
  /// state_bytes() minus staging_bytes minus formula_bytes() (may be fractional: returned as double).
  double padding_bytes(size_t element_bytes) const;
};

class MixedPrecisionEngine {
 public:
  /// Lays out `tensors` (forward order) and allocates the buffers on `backend`. Collective over `comm` only
  /// in that every rank must construct it with the same arguments. Throws mpt::InputError for a bad config.
  MixedPrecisionEngine(std::vector<TensorSpec> tensors, const EngineConfig& config, Communicator& comm,
                       Backend& backend);
  ~MixedPrecisionEngine();
  MixedPrecisionEngine(const MixedPrecisionEngine&) = delete;
  MixedPrecisionEngine& operator=(const MixedPrecisionEngine&) = delete;

  const ParamLayout& layout() const { return layout_; }
  /// This process's rank in the engine's communicator.
  int rank() const { return comm_.rank(); }
  const EngineConfig& config() const { return config_; }
  /// Host mirror of the loss scaler: its config, and its state as of the last result()/step() or load_state()
  /// (after a step_async() without result() it lags the backend-memory state by that step).
  const DynamicLossScaler& scaler() const { return scaler_; }
  /// Loss scale to multiply the loss by before backward (1 unless fp16), from the host mirror (see scaler()).
  float loss_scale() const { return scaler_.scale(); }
  /// The current loss scale in backend memory (one FP32, advanced by every step on the backend's stream):
  /// pass it to GPT::forward / Backend::crossentropy_forward_backward so that the scaling needs no host read.
  const float* loss_scale_device() const;
  /// Optimizer steps applied so far (Adam's t), host mirror as for scaler().
  int64_t applied_steps() const { return applied_steps_; }
  /// Samples of the applied steps (the LR-schedule position), host mirror as for scaler().
  int64_t applied_samples() const { return applied_samples_; }

  /// Flat weights, padded_elements() of dtype, backend memory.
  void* params() const { return params_.data(); }
  /// Flat gradients, padded_elements() of dtype, backend memory: where backward accumulates. With
  /// fp32_grad_accumulation this is the micro-batch buffer; call accumulate_micro_batch() after each
  /// backward.
  /// ZeRO stage 2 has no such buffer: nullptr (backward writes through grad_address()).
  void* grads() const { return micro_grads_.data() ? micro_grads_.data() : grads_.data(); }
  /// Where backward writes the gradient of tensor `tensor_index` (registration order), in dtype, backend
  /// memory: inside grads() for stage 1. Stage 2: inside the staging buffer of the tensor's bucket; the
  /// bucket's first address request of a micro-batch takes a buffer from the pool, waiting (in issue order)
  /// for earlier reduce-scatters to complete until one that fits is free, and zeroes it. Throws mpt::Error
  /// when the tensor's bucket was already reduced in this micro-batch, or when every buffer that could hold
  /// the bucket is being written (raise staging_buffers).
  void* grad_address(size_t tensor_index);
  /// The reduced gradients this rank's phases 4-6 read (grad_dtype()): stage 1 the flat buffer (grads_,
  /// flat offsets), stage 2 the shard (shard_elements(), bucket b's slice at Bucket::shard_offset).
  void* reduced_grads() const { return grads_.data(); }
  /// Storage type of the gradients that are reduced, checked and read by AdamW: f32 with
  /// fp32_grad_accumulation, else dtype.
  DType grad_dtype() const { return config_.fp32_grad_accumulation ? DType::f32 : config_.dtype; }
  /// FP32 master weights / Adam m / Adam v of this rank's shard, shard_elements() each, backend memory.
  float* master() const { return master_.as<float>(); }
  float* adam_m() const { return adam_m_.as<float>(); }
  float* adam_v() const { return adam_v_.as<float>(); }

  /// Sets every weight from FP32 host values in registration order, each tensor unpadded and contiguous
  /// (values.size() == P): the master shard takes its part exactly, params get them rounded to dtype. Adam
  /// state is zeroed. Throws mpt::Error on a size mismatch.
  void set_parameters(std::span<const float> values);

  /// Which FP32 shard state gather_tensors() collects.
  enum class ShardState : uint8_t { master, adam_m, adam_v };
  /// Every tensor's FP32 `which` state, unpadded, in registration order, assembled from all ranks' shards
  /// (an all-gather: collective, and every rank gets the full copy). For checkpoints.
  std::vector<std::vector<float>> gather_tensors(ShardState which);
  /// Restores the optimizer state written by a checkpoint: this rank's shard of master, m and v from full
  /// unpadded tensors (registration order; sizes checked, mpt::InputError naming the tensor), the weights
  /// re-cast from the master weights, Adam's t, and from the map `scaler_fields` (a checkpoint's metadata)
  /// the loss scaler (DynamicLossScaler::deserialize fields), the LR-schedule position "applied_samples"
  /// (when absent: applied_steps x the batch of set_batch()) and the noise scale's averages (noise_metadata()
  /// fields, zero when absent). No communication.
  void load_state(const std::vector<std::vector<float>>& master,
                  const std::vector<std::vector<float>>& adam_m,
                  const std::vector<std::vector<float>>& adam_v, int64_t applied_steps,
                  const std::map<std::string, std::string>& scaler_fields);

  /// The noise scale's averages as checkpoint metadata (exact hexadecimal floats), read back by load_state().
  std::map<std::string, std::string> noise_metadata() const;

  /// Phase 1: grads = 0 (padding included), the FP32 accumulation buffer too; resets grad_done()'s counts.
  void zero_grads();
  /// After each micro-batch's backward: with fp32_grad_accumulation, adds grads() into the FP32 buffer and
  /// zeroes grads(); otherwise nothing (backward already accumulated in place). Stage 2: ends the
  /// micro-batch: starts the reduce-scatter of every bucket not reported yet (the rest of the gradients
  /// are zero), so the next micro-batch's backward starts every bucket afresh.
  void accumulate_micro_batch();
  /// Phase 3 for one bucket: starts its non-blocking collective now (backward has finished writing it).
  /// Buckets may be reported in any order, each at most once per step.
  void bucket_ready(size_t bucket);
  /// Phase 3 driven by backward (GPT::backward's on_grad_done): tensor `tensor_index` (registration order, as
  /// layout().tensors()) has received its last gradient write of this step. Counts the finished tensors of
  /// every bucket the tensor overlaps (a bucket may hold parts of tensors) and calls bucket_ready(b) the
  /// moment bucket b's last tensor is reported, so its collective overlaps the rest of backward. Report each
  /// tensor at most once per step (throws mpt::Error otherwise), and only during the LAST micro-batch's
  /// backward (earlier micro-batches still add into the buckets). With fp32_grad_accumulation it does
  /// nothing: the reduced buffer is final only after accumulate_micro_batch(), so sync_grads() starts every
  /// bucket then (no overlap). Counts reset in zero_grads() and after each step. Stage 2: report every
  /// micro-batch's tensors (each micro-batch's buckets are reduced; with fp32_grad_accumulation too), counts
  /// reset by accumulate_micro_batch().
  void grad_done(size_t tensor_index);
  /// The noise scale's small batch with one rank: squares the gradients as they stand (call it after the
  /// first micro-batch's backward and accumulate_micro_batch(), when they hold that micro-batch alone), for
  /// the step's StepBatch. With several ranks the buckets' local gradients are used instead and this is
  /// not needed.
  void sample_micro_batch();
  /// Phase 3: starts the buckets not reported yet and waits for all. After it, this rank's slices of grads
  /// hold the average over ranks (reduce-scatter mode: other slices are unspecified; all-reduce: all valid).
  /// Stage 2: ends the open micro-batch as accumulate_micro_batch() does, then waits for every reduction and
  /// its addition into the shard.
  void sync_grads();
  /// Phase 4 on the gradients as they stand: the read-only pass over this rank's shard (Backend::grad_check:
  /// found_inf and the FP64 block sums), which also records this rank's `stop_requested`. In data-parallel
  /// training call sync_grads() (or report every tensor through grad_done()) first; with no bucket started
  /// the gradients are taken as already reduced (every rank must then hold the same values in its slices).
  /// Throws mpt::Error when only some buckets were started. Phases 4-7 enqueue without any host read of the
  /// step state; call check_grads(), agree(), update(), gather_params() in this order, every rank alike.
  void check_grads(bool stop_requested = false);
  /// Phase 5: the MAX all-reduce of {found_inf, stop} through the Communicator on backend memory, so every
  /// rank takes the same decision in phase 6.
  void agree();
  /// Phase 6: the block-sum all-gather, norm/clip/lr in the fixed block order (Backend::amp_prepare), AdamW
  /// on the master shard (skips itself on found_inf), then the loss-scaler update with Adam's t.
  void update();
  /// Phase 7: this rank's slices of the weights cast from the master shard (skipped on found_inf) and the
  /// weight all-gather (issued on every step: on a skipped one it re-sends unchanged weights).
  void gather_params();
  /// Phases 4-7: check_grads(stop_requested), agree(), update(), gather_params(), enqueued without any host
  /// read of the step state.
  void step_async(bool stop_requested = false);
  /// Reads the step state back (a host synchronisation), refreshes the host mirrors (scaler(), loss_scale(),
  /// applied_steps()) and describes the last step_async(). Throws mpt::NumericsError, on every rank alike
  /// (the state is replicated), when that step's scaler update hit the minimum-scale rule.
  StepResult result();
  /// step_async() then result(): one step with its numbers (the trainer's and the tests' form; on the CPU
  /// the read-back costs nothing). `stop_requested` (this rank wants to stop, e.g. after SIGUSR1) travels in
  /// the found_inf all-reduce; StepResult::stop_requested is its OR over ranks.
  StepResult step(bool stop_requested = false);
  /// The batch of the following steps (default {1, 0, 1}: one sample, no noise-scale estimate).
  void set_batch(const StepBatch& batch);
  /// Host mirror of the noise scale's averages (for checkpoints), refreshed like scaler().
  const common::NoiseScaleState& noise_state() const { return noise_; }

  /// Memory accounting from the allocated buffers.
  MemoryReport memory() const;
  /// The memory() an engine constructed with these arguments on `world_size` ranks would report, computed
  /// from the layout alone: nothing is allocated. Throws mpt::InputError for a bad config.
  static MemoryReport predict_memory(std::vector<TensorSpec> tensors, const EngineConfig& config,
                                     int world_size);

 private:
  /// This rank's shard of a full set of unpadded tensors (registration order), padding zero.
  std::vector<float> shard_of(std::span<const float> values) const;
  /// Writes a fresh step state (flags clear) holding the host mirrors (scaler state, applied steps).
  void upload_state();
  common::AmpState* state() const { return state_.as<common::AmpState>(); }
  /// Resets grad_done()'s per-step counts.
  void reset_grad_done();
  /// Stage 2: the pool, the shard's tables, the buffers that each pool entry owns.
  void setup_stage2();
  /// Stage 2: a pool buffer for `bucket` (waiting for reductions in issue order until one that fits is free),
  /// zeroed; returns its index.
  size_t acquire_staging(size_t bucket);
  /// Stage 2: waits for the oldest reduction in flight, adds its slice (reduced in place) into the shard
  /// (micro-batches after the first) and returns its buffer to the pool.
  void complete_oldest();
  /// Stage 2: bucket_ready() with the bucket in a pool buffer.
  void stage2_bucket_ready(size_t bucket);
  /// Stage 2: starts every bucket of the open micro-batch not started yet and resets the per-micro-batch
  /// counts.
  void end_micro_batch();
  /// LAMB's tables and buffers: this rank's norm segments, the order of the gathered segment sums per tensor.
  void setup_lamb();
  /// Phase 6 with LAMB: pass 1, the segment-sum all-gather, the trust ratios, pass 2.
  void lamb_step();

  EngineConfig config_;
  Communicator& comm_;
  Backend& backend_;
  ParamLayout layout_;
  DynamicLossScaler scaler_;
  int64_t applied_steps_ = 0;
  int64_t applied_samples_ = 0;
  common::NoiseScaleState noise_;

  Buffer params_, grads_, master_, adam_m_, adam_v_;
  Buffer micro_grads_;  // only with fp32_grad_accumulation: backward's target, dtype
  // The tables of the optimizer-side ops, registered with backend_ at construction.
  Table<ElementRange> my_slices_;    // this rank's slice of every bucket, in shard order
  Table<AdamWSegment> my_segments_;  // real-parameter parts of the shard
  Table<size_t> norm_order_;         // ParamLayout::global_block_order(), remapped to sums_stride_
  common::ScalerRule scaler_rule_;
  common::OptimizerRule optimizer_rule_;
  Buffer state_;  // one common::AmpState, backend memory
  // This rank's block sums (blocks_per_rank doubles) followed by its buckets' local squared norms (one
  // double per bucket, the noise scale's small batch): sums_stride_ doubles, backend memory; all-gathered
  // rank-major into gathered_block_sums_.
  Buffer block_sums_;
  Buffer gathered_block_sums_;
  size_t sums_stride_ = 0;
  Table<size_t> small_order_;  // every rank's bucket squares in the gathered sums, rank by rank
  // LAMB: this rank's norm segments; per rank `lamb_capacity_` segments (the most any rank has) of two FP64
  // sums (w^2, r^2) each, gathered rank-major; every tensor's segments' indices into them in global order.
  Table<LambSegment> lamb_segments_;
  size_t lamb_capacity_ = 0;
  Table<size_t> lamb_order_, lamb_tensor_begin_;
  Buffer lamb_sums_, gathered_lamb_sums_, trust_;
  StepBatch batch_;                                    // set_batch()
  StepResult timings_;                                 // host-side phase times of the last step_async()
  std::vector<std::unique_ptr<CommRequest>> pending_;  // per bucket; null when not started this step
  // grad_done(): buckets each tensor overlaps, tensors overlapping each bucket, this step's counts.
  std::vector<std::vector<size_t>> tensor_buckets_;
  std::vector<size_t> bucket_tensors_, bucket_done_;
  std::vector<char> tensor_done_;
  // ZeRO stage 2. A pool entry: its staging buffer (dtype; capacity in elements), with fp32 accumulation the
  // FP32 copy that is reduced, and while a reduction reads it, that reduction (the micro-batches after a
  // step's first reduce in place). The in-flight queue holds entries in issue order.
  struct Staging {
    Buffer data, wire;
    void* reduced = nullptr;  // what the reduction in flight reads (data or wire); later rounds land in it
    size_t capacity = 0;
    int bucket = -1;         // the bucket it holds (written or in flight), -1 when free
    bool in_flight = false;  // its reduce-scatter was issued and not yet completed
    bool add_recv = false;   // on completion add its slice into the shard (not the step's first round)
    std::unique_ptr<CommRequest> request;
  };
  std::vector<Staging> pool_;
  std::vector<size_t> in_flight_;     // pool indices in issue order
  std::vector<int> bucket_staging_;   // per bucket: the pool entry being written this micro-batch, or -1
  std::vector<char> bucket_started_;  // per bucket: reduced in this micro-batch
  std::vector<int> bucket_rounds_;    // per bucket: reductions issued this step
  bool micro_batch_open_ = false;     // some bucket was written or started since the last end
  Table<ElementRange> shard_slices_;  // this rank's slices inside the shard (stage 2 grad_check)
};

}  // namespace mpt
