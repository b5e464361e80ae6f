// The mixed-precision engine (include/mptrain/engine.hpp): phases 1 and 3-7 of DESIGN.md's step.
#include "mptrain/engine.hpp"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdlib>

#include "mptrain/error.hpp"

namespace mpt {

void EngineConfig::validate() const {
  MPT_INPUT_CHECK(dtype == DType::f16 || dtype == DType::bf16 || dtype == DType::f32,
                  "engine: precision must be fp16, bf16 or fp32, got {}", dtype_name(dtype));
  MPT_INPUT_CHECK(bucket_bytes >= dtype_size(dtype),
                  "engine: bucket size must be at least one element, got {} bytes", bucket_bytes);
  MPT_INPUT_CHECK(block_elements >= 1 && block_elements <= (size_t{1} << 30),
                  "engine: block_elements must be in [1, 2^30], got {}", block_elements);
  MPT_INPUT_CHECK(std::isfinite(grad_clip) && grad_clip >= 0.0f, "engine: grad_clip must be >= 0, got {}",
                  grad_clip);
  adamw.validate();
  schedule.validate(adamw.lr);
  MPT_INPUT_CHECK(noise_scale_ema >= 0.0 && noise_scale_ema < 1.0,
                  "engine: noise_scale_ema must be in [0, 1), got {}", noise_scale_ema);
  MPT_INPUT_CHECK(zero_stage == 1 || zero_stage == 2, "engine: --zero-stage must be 1 or 2, got {}",
                  zero_stage);
  // All-reduce leaves every gradient on every rank: nothing for stage 2 to free.
  MPT_INPUT_CHECK(zero_stage == 1 || grad_sync == GradSync::reduce_scatter,
                  "engine: --zero-stage 2 needs --grad-sync reduce-scatter (all-reduce keeps every gradient "
                  "on every rank)");
  MPT_INPUT_CHECK(staging_buffers >= 1, "engine: staging_buffers must be >= 1, got {}", staging_buffers);
  if (dtype == DType::f16)
    scaler.validate();  // bf16/fp32 run with the scaler disabled; its options are unused
}

double MemoryReport::formula_bytes(size_t element_bytes) const {
  const double p = static_cast<double>(num_parameters), n = world_size;
  const double weights = static_cast<double>(element_bytes) * p;
  const double grad = static_cast<double>(grad_element_bytes) * p;
  if (zero_stage == 2) return weights + grad / n + 12.0 * p / n;
  // Stage 1 with fp32 accumulation also holds the micro-batch buffer in the storage dtype.
  const double micro = fp32_grad_accumulation ? weights : 0.0;
  return weights + grad + micro + 12.0 * p / n;
}

double MemoryReport::padding_bytes(size_t element_bytes) const {
  return static_cast<double>(state_bytes() - staging_bytes) - formula_bytes(element_bytes);
}

namespace {

/// Norm segments per rank that the LAMB sum buffers hold: the most any rank owns (at least 1), so every
/// rank's part of the gathered buffer has the same stride.
size_t lamb_capacity(const std::vector<NormSegment>& segments, int world_size) {
  std::vector<size_t> count(static_cast<size_t>(world_size), 0);
  for (const NormSegment& s : segments) ++count[static_cast<size_t>(s.owner)];
  return std::max<size_t>(*std::max_element(count.begin(), count.end()), 1);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

EngineConfig effective(EngineConfig c) {
  c.validate();
  // Loss scaling exists for fp16's narrow range; bf16 and fp32 train unscaled (overflowing steps still skip).
  if (c.dtype != DType::f16) c.scaler.enabled = false;
  return c;
}

/// Capacities (elements) of the stage-2 pool: buffer i holds the i-th largest padded bucket; never more
/// buffers than buckets (no more can be in use at once).
std::vector<size_t> staging_capacities(const ParamLayout& layout, int buffers) {
  std::vector<size_t> sizes;
  for (const Bucket& b : layout.buckets()) sizes.push_back(b.padded_elements);
  std::sort(sizes.begin(), sizes.end(), std::greater<>());
  sizes.resize(std::min(sizes.size(), static_cast<size_t>(buffers)));
  return sizes;
}

/// Bytes of one stage-2 pool entry of `capacity` elements: the staging buffer (dtype) and, with fp32
/// accumulation, its FP32 copy (what is reduced).
size_t staging_entry_bytes(const EngineConfig& c, size_t capacity) {
  return capacity * dtype_size(c.dtype) + (c.fp32_grad_accumulation ? capacity * sizeof(float) : 0);
}

LayoutOptions layout_options(const EngineConfig& c) {
  LayoutOptions o;
  o.bucket_elements = c.bucket_bytes / dtype_size(c.dtype);
  o.block_elements = c.block_elements;
  return o;
}

}  // namespace

MixedPrecisionEngine::MixedPrecisionEngine(std::vector<TensorSpec> tensors, const EngineConfig& config,
                                           Communicator& comm, Backend& backend)
    : config_(effective(config)),
      comm_(comm),
      backend_(backend),
      layout_(std::move(tensors), layout_options(config_), comm.size()),
      scaler_(config_.scaler) {
  const size_t esize = dtype_size(config_.dtype);
  const size_t shard = layout_.shard_elements();
  const bool stage2 = config_.zero_stage == 2;
  params_ = backend_.allocate(layout_.padded_elements() * esize);
  // Stage 2: only this rank's shard of the reduced gradients (the pool comes in setup_stage2).
  grads_ = backend_.allocate((stage2 ? shard : layout_.padded_elements()) * dtype_size(grad_dtype()));
  if (config_.fp32_grad_accumulation && !stage2)
    micro_grads_ = backend_.allocate(layout_.padded_elements() * esize);
  master_ = backend_.allocate(shard * sizeof(float));
  adam_m_ = backend_.allocate(shard * sizeof(float));
  adam_v_ = backend_.allocate(shard * sizeof(float));
  // The step's tables, registered with the backend once: the ops take their handles every step.
  std::vector<ElementRange> slices;
  for (size_t b = 0; b < layout_.buckets().size(); ++b)
    slices.push_back({layout_.slice_offset(b, comm_.rank()), layout_.buckets()[b].slice_elements});
  my_slices_ = backend_.register_table<ElementRange>(slices);
  std::vector<AdamWSegment> segments;
  // The optimizer reads the gradient at flat_offset: in the flat buffer (stage 1) or in the shard (stage 2).
  for (const ShardSegment& s : layout_.shard_segments(comm_.rank()))
    segments.push_back({s.shard_offset, stage2 ? s.shard_offset : s.flat_offset, s.num_elements, s.decay});
  my_segments_ = backend_.register_table<AdamWSegment>(segments);
  // Block sums and bucket squares, gathered rank-major with sums_stride_ per rank: block k of rank r sits at
  // r * stride + k, rank r's square of bucket b at r * stride + blocks_per_rank + b.
  const size_t per_rank = layout_.blocks_per_rank(), num_buckets = layout_.buckets().size();
  sums_stride_ = per_rank + num_buckets;
  block_sums_ = backend_.allocate(sums_stride_ * sizeof(double));
  gathered_block_sums_ = backend_.allocate(sums_stride_ * static_cast<size_t>(comm_.size()) * sizeof(double));
  std::vector<size_t> norm_order, small_order;
  for (const size_t k : layout_.global_block_order())
    norm_order.push_back(k / per_rank * sums_stride_ + k % per_rank);
  for (int r = 0; r < comm_.size(); ++r)
    for (size_t b = 0; b < num_buckets; ++b)
      small_order.push_back(static_cast<size_t>(r) * sums_stride_ + per_rank + b);
  norm_order_ = backend_.register_table<size_t>(norm_order);
  small_order_ = backend_.register_table<size_t>(small_order);
  pending_.resize(layout_.buckets().size());

  scaler_rule_ = scaler_.rule();
  const AdamWConfig& a = config_.adamw;
  optimizer_rule_.peak_lr = a.lr;
  optimizer_rule_.beta1 = a.beta1;
  optimizer_rule_.beta2 = a.beta2;
  optimizer_rule_.eps = a.eps;
  optimizer_rule_.weight_decay = a.weight_decay;
  optimizer_rule_.grad_clip = config_.grad_clip;
  optimizer_rule_.min_lr = config_.schedule.min_lr;
  optimizer_rule_.warmup_samples = config_.schedule.warmup_samples;
  optimizer_rule_.decay_samples = config_.schedule.decay_samples;
  state_ = backend_.allocate(sizeof(common::AmpState));
  upload_state();
  if (config_.optimizer == OptimizerKind::lamb) setup_lamb();

  // grad_done(): which buckets each tensor's flat range [offset, offset + n) overlaps.
  const auto& buckets = layout_.buckets();
  tensor_buckets_.resize(layout_.tensors().size());
  bucket_tensors_.assign(buckets.size(), 0);
  for (size_t t = 0; t < layout_.tensors().size(); ++t) {
    const TensorPlacement& p = layout_.tensors()[t];
    const size_t lo = p.offset, hi = p.offset + p.spec.num_elements();
    for (size_t b = 0; b < buckets.size(); ++b)
      if (lo < buckets[b].offset + buckets[b].num_elements && buckets[b].offset < hi) {
        tensor_buckets_[t].push_back(b);
        ++bucket_tensors_[b];
      }
  }
  reset_grad_done();
  if (stage2) setup_stage2();
}

void MixedPrecisionEngine::setup_stage2() {
  const auto& buckets = layout_.buckets();
  std::vector<ElementRange> slices;
  for (const Bucket& b : buckets) slices.push_back({b.shard_offset, b.slice_elements});
  shard_slices_ = backend_.register_table<ElementRange>(slices);
  for (const size_t capacity : staging_capacities(layout_, config_.staging_buffers)) {
    Staging entry;
    entry.capacity = capacity;
    entry.data = backend_.allocate(capacity * dtype_size(config_.dtype));
    if (config_.fp32_grad_accumulation) entry.wire = backend_.allocate(capacity * sizeof(float));
    pool_.push_back(std::move(entry));
  }
  bucket_staging_.assign(buckets.size(), -1);
  bucket_started_.assign(buckets.size(), 0);
  bucket_rounds_.assign(buckets.size(), 0);
}

void MixedPrecisionEngine::setup_lamb() {
  const std::vector<NormSegment> all = layout_.norm_segments();
  const auto ranks = static_cast<size_t>(comm_.size());
  std::vector<size_t> count(ranks, 0), local(all.size());
  for (size_t g = 0; g < all.size(); ++g) local[g] = count[static_cast<size_t>(all[g].owner)]++;
  lamb_capacity_ = lamb_capacity(all, comm_.size());
  // Segments come grouped by tensor (ParamLayout::norm_segments), so each tensor's run of `order` is
  // contiguous; every tensor has at least one segment (it has at least one element).
  const size_t num_tensors = layout_.tensors().size();
  std::vector<size_t> tensor_begin(num_tensors + 1, 0);
  for (const NormSegment& s : all) ++tensor_begin[s.tensor + 1];
  for (size_t t = 0; t < num_tensors; ++t) tensor_begin[t + 1] += tensor_begin[t];
  std::vector<size_t> order(all.size(), 0);
  std::vector<size_t> fill(tensor_begin.begin(), tensor_begin.end() - 1);
  std::vector<LambSegment> mine;
  for (size_t g = 0; g < all.size(); ++g) {
    const NormSegment& s = all[g];
    order[fill[s.tensor]++] = static_cast<size_t>(s.owner) * lamb_capacity_ + local[g];
    if (s.owner == comm_.rank())  // the gradient read at flat_offset: in the shard for stage 2
      mine.push_back({s.shard_offset, config_.zero_stage == 2 ? s.shard_offset : s.flat_offset,
                      s.num_elements, static_cast<uint32_t>(s.tensor), s.decay ? 1u : 0u});
  }
  lamb_segments_ = backend_.register_table<LambSegment>(mine);
  lamb_order_ = backend_.register_table<size_t>(order);
  lamb_tensor_begin_ = backend_.register_table<size_t>(tensor_begin);
  lamb_sums_ = backend_.allocate(2 * lamb_capacity_ * sizeof(double));
  gathered_lamb_sums_ = backend_.allocate(2 * lamb_capacity_ * ranks * sizeof(double));
  trust_ = backend_.allocate(num_tensors * sizeof(float));
}

void MixedPrecisionEngine::lamb_step() {
  backend_.lamb_moments(master(), adam_m(), adam_v(), grads_.data(), grad_dtype(), lamb_segments_,
                        lamb_sums_.as<double>(), state());
  // Gathered on a skipped step too (nobody on the host knows yet); the trust op then reads nothing.
  comm_.all_gather(lamb_sums_.data(), gathered_lamb_sums_.data(), 2 * lamb_capacity_, DType::f64);
  backend_.lamb_trust(trust_.as<float>(), gathered_lamb_sums_.as<double>(), lamb_order_, lamb_tensor_begin_,
                      state());
  backend_.lamb_apply(master(), adam_m(), adam_v(), lamb_segments_, trust_.as<float>(), state());
}

void MixedPrecisionEngine::upload_state() {
  common::AmpState s;
  s.scaler = scaler_.state();
  s.used_scale = scaler_.scale();
  s.applied_steps = applied_steps_;
  s.applied_samples = applied_samples_;
  s.noise = noise_;
  backend_.copy_from_host(state_.data(), &s, sizeof s);
}

void MixedPrecisionEngine::reset_grad_done() {
  bucket_done_.assign(layout_.buckets().size(), 0);
  tensor_done_.assign(layout_.tensors().size(), 0);
}

const float* MixedPrecisionEngine::loss_scale_device() const {
  // Address arithmetic only: the state is not dereferenced on the host.
  return reinterpret_cast<const float*>(static_cast<const std::byte*>(state_.data()) +
                                        offsetof(common::AmpState, scaler) +
                                        offsetof(common::ScalerState, scale));
}

MixedPrecisionEngine::~MixedPrecisionEngine() {
  // Reductions still reading pool buffers finish before the buffers go (CommRequest's destructor waits).
  for (const size_t i : in_flight_) pool_[i].request.reset();
}

std::vector<float> MixedPrecisionEngine::shard_of(std::span<const float> values) const {
  MPT_CHECK(values.size() == layout_.num_parameters(), "got {} values, the model has {}", values.size(),
            layout_.num_parameters());
  // Registration order -> flat offsets -> this rank's slices, through the segments (padding stays zero).
  std::vector<size_t> source(layout_.tensors().size());
  for (size_t k = 1; k < source.size(); ++k)
    source[k] = source[k - 1] + layout_.tensors()[k - 1].spec.num_elements();
  std::vector<float> shard(layout_.shard_elements(), 0.0f);
  for (const ShardSegment& s : layout_.shard_segments(comm_.rank()))
    std::copy_n(values.begin() + static_cast<std::ptrdiff_t>(source[s.tensor] + s.tensor_offset),
                s.num_elements, shard.begin() + static_cast<std::ptrdiff_t>(s.shard_offset));
  return shard;
}

void MixedPrecisionEngine::set_parameters(std::span<const float> values) {
  const std::vector<float> shard = shard_of(values);
  backend_.copy_from_host(master_.data(), shard.data(), shard.size() * sizeof(float));
  backend_.fill_zero(adam_m_.data(), adam_m_.num_bytes());
  backend_.fill_zero(adam_v_.data(), adam_v_.num_bytes());
  // Every rank rounds the same FP32 values, so the full params copy needs no communication.
  dispatch_float_dtype(config_.dtype, [&]<typename T>() {
    std::vector<T> rounded(layout_.padded_elements(), from_float<T>(0.0f));
    size_t source = 0;
    for (const TensorPlacement& t : layout_.tensors())
      for (size_t i = 0; i < t.spec.num_elements(); ++i)
        rounded[t.offset + i] = from_float<T>(values[source++]);
    backend_.copy_from_host(params_.data(), rounded.data(), rounded.size() * sizeof(T));
  });
}

std::vector<std::vector<float>> MixedPrecisionEngine::gather_tensors(ShardState which) {
  const Buffer& buffer = which == ShardState::master   ? master_
                         : which == ShardState::adam_m ? adam_m_
                                                       : adam_v_;
  const size_t shard = layout_.shard_elements();
  // Gathered where the shards live (the NCCL communicator takes device memory only), then copied out once.
  std::vector<float> all(shard * static_cast<size_t>(comm_.size()));
  Buffer gathered = backend_.allocate(all.size() * sizeof(float));
  comm_.all_gather(buffer.data(), gathered.data(), shard, DType::f32);
  backend_.copy_to_host(all.data(), gathered.data(), all.size() * sizeof(float));
  // Rank-major shards -> the padded flat vector -> tensors.
  std::vector<float> flat(layout_.padded_elements(), 0.0f);
  for (int r = 0; r < comm_.size(); ++r)
    for (size_t b = 0; b < layout_.buckets().size(); ++b) {
      const Bucket& bucket = layout_.buckets()[b];
      std::copy_n(
          all.begin() + static_cast<std::ptrdiff_t>(static_cast<size_t>(r) * shard + bucket.shard_offset),
          bucket.slice_elements, flat.begin() + static_cast<std::ptrdiff_t>(layout_.slice_offset(b, r)));
    }
  std::vector<std::vector<float>> tensors;
  for (const TensorPlacement& t : layout_.tensors())
    tensors.emplace_back(flat.begin() + static_cast<std::ptrdiff_t>(t.offset),
                         flat.begin() + static_cast<std::ptrdiff_t>(t.offset + t.spec.num_elements()));
  return tensors;
}

namespace {

const char* const kNoiseKeys[] = {"noise_grad_sq_ema", "noise_trace_ema", "noise_weight"};

/// The noise scale's averages from checkpoint metadata (zero when a key is absent: an older checkpoint).
common::NoiseScaleState parse_noise_metadata(const std::map<std::string, std::string>& fields) {
  double values[3] = {0.0, 0.0, 0.0};
  for (int k = 0; k < 3; ++k) {
    const auto it = fields.find(kNoiseKeys[k]);
    if (it == fields.end()) continue;
    char* end = nullptr;
    values[k] = std::strtod(it->second.c_str(), &end);
    MPT_INPUT_CHECK(!it->second.empty() && end == it->second.c_str() + it->second.size(),
                    "checkpoint: metadata '{}' is not a number: '{}'", kNoiseKeys[k], it->second);
  }
  return {values[0], values[1], values[2]};
}

/// The LR-schedule position of a checkpoint: its "applied_samples", or for a checkpoint without one (written
/// before the schedule counted samples) applied_steps x the current batch.
int64_t parse_applied_samples(const std::map<std::string, std::string>& fields, int64_t applied_steps,
                              int64_t batch) {
  const auto it = fields.find("applied_samples");
  if (it == fields.end()) return applied_steps * batch;
  int64_t value = -1;
  const auto [end, ec] = std::from_chars(it->second.data(), it->second.data() + it->second.size(), value);
  MPT_INPUT_CHECK(ec == std::errc() && end == it->second.data() + it->second.size() && value >= 0,
                  "checkpoint: metadata 'applied_samples' is not a count: '{}'", it->second);
  return value;
}

}  // namespace

std::map<std::string, std::string> MixedPrecisionEngine::noise_metadata() const {
  const double values[3] = {noise_.grad_sq_ema, noise_.trace_ema, noise_.weight};
  std::map<std::string, std::string> out;
  for (int k = 0; k < 3; ++k) out[kNoiseKeys[k]] = fmt::format("{:a}", values[k]);
  return out;
}

void MixedPrecisionEngine::load_state(const std::vector<std::vector<float>>& master,
                                      const std::vector<std::vector<float>>& adam_m,
                                      const std::vector<std::vector<float>>& adam_v, int64_t applied_steps,
                                      const std::map<std::string, std::string>& scaler_fields) {
  const auto& tensors = layout_.tensors();
  auto concat = [&](const std::vector<std::vector<float>>& parts, const char* what) {
    MPT_INPUT_CHECK(parts.size() == tensors.size(), "checkpoint: {} has {} tensors, the model {}", what,
                    parts.size(), tensors.size());
    std::vector<float> all;
    for (size_t k = 0; k < parts.size(); ++k) {
      MPT_INPUT_CHECK(parts[k].size() == tensors[k].spec.num_elements(),
                      "checkpoint: {} of tensor '{}' has {} elements, the model needs {}", what,
                      tensors[k].spec.name, parts[k].size(), tensors[k].spec.num_elements());
      all.insert(all.end(), parts[k].begin(), parts[k].end());
    }
    return all;
  };
  MPT_INPUT_CHECK(applied_steps >= 0, "checkpoint: negative optimizer step {}", applied_steps);
  DynamicLossScaler restored = scaler_;
  restored.deserialize(scaler_fields);
  set_parameters(concat(master, "master weights"));  // master shard + params cast from it
  const std::vector<float> m = shard_of(concat(adam_m, "Adam m"));
  const std::vector<float> v = shard_of(concat(adam_v, "Adam v"));
  backend_.copy_from_host(adam_m_.data(), m.data(), m.size() * sizeof(float));
  backend_.copy_from_host(adam_v_.data(), v.data(), v.size() * sizeof(float));
  applied_steps_ = applied_steps;
  applied_samples_ = parse_applied_samples(scaler_fields, applied_steps, batch_.samples);
  scaler_ = restored;
  noise_ = parse_noise_metadata(scaler_fields);
  upload_state();
}

void MixedPrecisionEngine::zero_grads() {
  // Stage 2: nothing of a previous step may still write into the shard or hold a pool buffer.
  while (!in_flight_.empty()) complete_oldest();
  for (Staging& entry : pool_) entry.bucket = -1;
  std::fill(bucket_staging_.begin(), bucket_staging_.end(), -1);
  std::fill(bucket_started_.begin(), bucket_started_.end(), 0);
  std::fill(bucket_rounds_.begin(), bucket_rounds_.end(), 0);
  micro_batch_open_ = false;
  backend_.fill_zero(grads_.data(), grads_.num_bytes());
  if (micro_grads_.data()) backend_.fill_zero(micro_grads_.data(), micro_grads_.num_bytes());
  reset_grad_done();
}

void* MixedPrecisionEngine::grad_address(size_t tensor_index) {
  MPT_CHECK(tensor_index < layout_.tensors().size(), "grad_address: tensor {} out of range ({} tensors)",
            tensor_index, layout_.tensors().size());
  const TensorPlacement& t = layout_.tensors()[tensor_index];
  const size_t esize = dtype_size(config_.dtype);
  if (config_.zero_stage == 1) return static_cast<std::byte*>(grads()) + t.offset * esize;
  MPT_CHECK(!bucket_started_[t.bucket],
            "grad_address: tensor '{}' written after its bucket {} was reduced in this micro-batch",
            t.spec.name, t.bucket);
  if (bucket_staging_[t.bucket] < 0) bucket_staging_[t.bucket] = static_cast<int>(acquire_staging(t.bucket));
  micro_batch_open_ = true;
  const Bucket& b = layout_.buckets()[t.bucket];
  return static_cast<std::byte*>(pool_[static_cast<size_t>(bucket_staging_[t.bucket])].data.data()) +
         (t.offset - b.offset) * esize;
}

size_t MixedPrecisionEngine::acquire_staging(size_t bucket) {
  const size_t need = layout_.buckets()[bucket].padded_elements;
  for (;;) {
    // The smallest free buffer that holds the bucket.
    size_t best = pool_.size();
    for (size_t i = 0; i < pool_.size(); ++i)
      if (pool_[i].bucket < 0 && pool_[i].capacity >= need &&
          (best == pool_.size() || pool_[i].capacity < pool_[best].capacity))
        best = i;
    if (best < pool_.size()) {
      Staging& entry = pool_[best];
      entry.bucket = static_cast<int>(bucket);
      // Backward accumulates into it; the padding must be zero for the reduction.
      backend_.fill_zero(entry.data.data(), need * dtype_size(config_.dtype));
      return best;
    }
    // None free: a reduction in flight on a buffer that fits will free one (completed in issue order).
    const bool coming = std::any_of(in_flight_.begin(), in_flight_.end(),
                                    [&](size_t i) { return pool_[i].capacity >= need; });
    MPT_CHECK(coming,
              "ZeRO-2 staging pool: bucket {} ({} elements) finds every buffer that holds it being written; "
              "raise staging_buffers (now {})",
              bucket, need, pool_.size());
    complete_oldest();
  }
}

void MixedPrecisionEngine::complete_oldest() {
  const size_t i = in_flight_.front();
  in_flight_.erase(in_flight_.begin());
  Staging& entry = pool_[i];
  entry.request->wait();  // MPI: the request completed; CUDA: what follows on the stream waits for it
  entry.request.reset();
  const Bucket& b = layout_.buckets()[static_cast<size_t>(entry.bucket)];
  if (entry.add_recv) {
    // Micro-batches after the first add their reduced slice (left in place in the buffer reduced) into the
    // shard, in issue order: bucket b's rounds complete one after the other, so the sum's order is the
    // micro-batches' on every rank.
    const size_t gsize = dtype_size(grad_dtype());
    const auto* reduced = static_cast<const std::byte*>(entry.reduced) +
                          static_cast<size_t>(comm_.rank()) * b.slice_elements * gsize;
    backend_.accumulate(static_cast<std::byte*>(grads_.data()) + b.shard_offset * gsize, reduced,
                        static_cast<int64_t>(b.slice_elements), grad_dtype());
  }
  entry.in_flight = false;
  entry.add_recv = false;
  entry.bucket = -1;
}

void MixedPrecisionEngine::stage2_bucket_ready(size_t bucket) {
  MPT_CHECK(!bucket_started_[bucket], "bucket_ready: bucket {} reported twice in one micro-batch", bucket);
  // A bucket that backward never wrote in this micro-batch contributes zeros.
  if (bucket_staging_[bucket] < 0) bucket_staging_[bucket] = static_cast<int>(acquire_staging(bucket));
  const auto index = static_cast<size_t>(bucket_staging_[bucket]);
  Staging& entry = pool_[index];
  const Bucket& b = layout_.buckets()[bucket];
  const int round = bucket_rounds_[bucket]++;
  bucket_started_[bucket] = 1;
  bucket_staging_[bucket] = -1;
  micro_batch_open_ = true;
  const DType gdt = grad_dtype();
  void* send = entry.data.data();
  if (config_.fp32_grad_accumulation) {  // main_grad: reduced in FP32, as stage 1 reduces its FP32 sums
    backend_.fill_zero(entry.wire.data(), b.padded_elements * sizeof(float));
    backend_.accumulate_f32(entry.wire.as<float>(), entry.data.data(),
                            static_cast<int64_t>(b.padded_elements), config_.dtype);
    send = entry.wire.data();
  }
  // The noise scale's small batch: this rank's gradient of the step's first micro-batch (the whole local
  // gradient without accumulation, squared as stage 1 squares it).
  if (config_.noise_scale && comm_.size() > 1 && round == 0)
    backend_.sum_squares(send, gdt, 0, b.padded_elements,
                         block_sums_.as<double>() + layout_.blocks_per_rank() + bucket);
  // The step's first round lands in the shard directly; later ones in place (this rank's slice of the
  // buffer reduced), added into the shard on completion.
  const size_t gsize = dtype_size(gdt);
  void* recv = round == 0 ? static_cast<std::byte*>(grads_.data()) + b.shard_offset * gsize
                          : static_cast<std::byte*>(send) +
                                static_cast<size_t>(comm_.rank()) * b.slice_elements * gsize;
  entry.reduced = send;
  entry.add_recv = round > 0;
  entry.in_flight = true;
  entry.request = comm_.ireduce_scatter(send, recv, b.slice_elements, gdt, ReduceOp::avg);
  in_flight_.push_back(index);
}

void MixedPrecisionEngine::end_micro_batch() {
  for (size_t b = 0; b < bucket_started_.size(); ++b)
    if (!bucket_started_[b]) stage2_bucket_ready(b);
  std::fill(bucket_started_.begin(), bucket_started_.end(), 0);
  micro_batch_open_ = false;
  reset_grad_done();
}

void MixedPrecisionEngine::set_batch(const StepBatch& batch) {
  MPT_CHECK(batch.samples >= 1 && batch.small_samples >= 0.0 && batch.small_grad_factor > 0.0,
            "set_batch: bad batch (samples {}, small samples {}, factor {})", batch.samples,
            batch.small_samples, batch.small_grad_factor);
  batch_ = batch;
}

void MixedPrecisionEngine::sample_micro_batch() {
  if (config_.zero_stage == 2) {
    // The micro-batch's reduced gradient is in the shard once its reductions are done; with one rank the
    // shard is the flat vector (slice = bucket), so these are stage 1's squares.
    if (micro_batch_open_) end_micro_batch();
    while (!in_flight_.empty()) complete_oldest();
    for (size_t b = 0; b < layout_.buckets().size(); ++b)
      backend_.sum_squares(grads_.data(), grad_dtype(), layout_.buckets()[b].shard_offset,
                           layout_.buckets()[b].slice_elements,
                           block_sums_.as<double>() + layout_.blocks_per_rank() + b);
    return;
  }
  for (size_t b = 0; b < layout_.buckets().size(); ++b)
    backend_.sum_squares(grads_.data(), grad_dtype(), layout_.buckets()[b].offset,
                         layout_.buckets()[b].padded_elements,
                         block_sums_.as<double>() + layout_.blocks_per_rank() + b);
}

void MixedPrecisionEngine::accumulate_micro_batch() {
  if (config_.zero_stage == 2) {
    end_micro_batch();
    return;
  }
  if (!config_.fp32_grad_accumulation) return;  // backward accumulated into grads() directly
  backend_.accumulate_f32(grads_.as<float>(), micro_grads_.data(),
                          static_cast<int64_t>(layout_.padded_elements()), config_.dtype);
  backend_.fill_zero(micro_grads_.data(), micro_grads_.num_bytes());
}

void MixedPrecisionEngine::bucket_ready(size_t bucket) {
  MPT_CHECK(bucket < pending_.size(), "bucket_ready: bucket {} out of range ({} buckets)", bucket,
            pending_.size());
  if (config_.zero_stage == 2) {
    stage2_bucket_ready(bucket);
    return;
  }
  MPT_CHECK(!pending_[bucket], "bucket_ready: bucket {} reported twice in one step", bucket);
  const Bucket& b = layout_.buckets()[bucket];
  const DType gdt = grad_dtype();
  const size_t esize = dtype_size(gdt);
  auto* base = static_cast<std::byte*>(grads_.data()) + b.offset * esize;
  // The noise scale's small batch: this rank's local gradient, squared before the reduction overwrites it.
  if (config_.noise_scale && comm_.size() > 1)
    backend_.sum_squares(grads_.data(), gdt, b.offset, b.padded_elements,
                         block_sums_.as<double>() + layout_.blocks_per_rank() + bucket);
  if (config_.grad_sync == GradSync::reduce_scatter) {
    void* mine = static_cast<std::byte*>(grads_.data()) + layout_.slice_offset(bucket, comm_.rank()) * esize;
    pending_[bucket] = comm_.ireduce_scatter(base, mine, b.slice_elements, gdt, ReduceOp::avg);
  } else {
    pending_[bucket] = comm_.iall_reduce(base, base, b.padded_elements, gdt, ReduceOp::avg);
  }
}

void MixedPrecisionEngine::grad_done(size_t tensor_index) {
  MPT_CHECK(tensor_index < tensor_done_.size(), "grad_done: tensor {} out of range ({} tensors)",
            tensor_index, tensor_done_.size());
  // main_grad: what is reduced is the FP32 buffer, final only after accumulate_micro_batch() (stage 1).
  if (config_.fp32_grad_accumulation && config_.zero_stage == 1) return;
  MPT_CHECK(!tensor_done_[tensor_index], "grad_done: tensor '{}' reported twice in one step",
            layout_.tensors()[tensor_index].spec.name);
  tensor_done_[tensor_index] = 1;
  for (const size_t b : tensor_buckets_[tensor_index])
    if (++bucket_done_[b] == bucket_tensors_[b]) bucket_ready(b);
}

void MixedPrecisionEngine::sync_grads() {
  if (config_.zero_stage == 2) {
    // The open micro-batch ends here; a step whose backward never ran reduces zeros once.
    const bool none_yet =
        std::all_of(bucket_rounds_.begin(), bucket_rounds_.end(), [](int r) { return r == 0; });
    if (micro_batch_open_ || none_yet) end_micro_batch();
    while (!in_flight_.empty()) complete_oldest();
    return;
  }
  for (size_t b = 0; b < pending_.size(); ++b)
    if (!pending_[b]) bucket_ready(b);
  for (auto& request : pending_) request->wait();
}

void MixedPrecisionEngine::check_grads(bool stop_requested) {
  if (config_.zero_stage == 2) {
    // Every reduction must have landed in the shard (sync_grads(), or the micro-batches already ended).
    if (micro_batch_open_ || !in_flight_.empty()) sync_grads();
    std::fill(bucket_rounds_.begin(), bucket_rounds_.end(), 0);
    reset_grad_done();
    timings_ = StepResult{};
    const auto t0 = std::chrono::steady_clock::now();
    backend_.grad_check(grads_.data(), grad_dtype(), shard_slices_, config_.block_elements,
                        block_sums_.as<double>(), state(), stop_requested);
    timings_.check_seconds = seconds_since(t0);
    return;
  }
  // Either no bucket was started (gradients already reduced by the caller, or one rank) or all were.
  size_t started = 0;
  for (const auto& request : pending_) started += request ? 1 : 0;
  MPT_CHECK(started == 0 || started == pending_.size(),
            "step: only {} of {} buckets were synchronised (call sync_grads first)", started,
            pending_.size());
  for (auto& request : pending_)
    if (request) request->wait();  // no-op after sync_grads
  for (auto& request : pending_) request.reset();
  reset_grad_done();

  timings_ = StepResult{};
  const auto t0 = std::chrono::steady_clock::now();
  // Read-only pass over my shard; zeroes and sets my found_inf, records my stop request.
  backend_.grad_check(grads_.data(), grad_dtype(), my_slices_, config_.block_elements,
                      block_sums_.as<double>(), state(), stop_requested);
  timings_.check_seconds = seconds_since(t0);
}

void MixedPrecisionEngine::agree() {
  const auto t0 = std::chrono::steady_clock::now();
  // After this every rank holds the same found_inf, so every op below takes the same branch everywhere. The
  // same MAX all-reduce carries the stop requests (SIGUSR1/SIGTERM), so the ranks also agree on stopping at
  // this step boundary without a collective of its own.
  auto* flags =
      reinterpret_cast<float*>(static_cast<std::byte*>(state_.data()) + offsetof(common::AmpState, flags));
  comm_.all_reduce(flags, flags, 2, DType::f32, ReduceOp::max);
  timings_.check_seconds += seconds_since(t0);
}

void MixedPrecisionEngine::update() {
  const auto t0 = std::chrono::steady_clock::now();
  // Every rank's block sums and bucket squares (gathered even on a skipped step: nobody on the host knows
  // yet), the global norm in the fixed order, clip factor and lr into the state, the noise-scale estimate;
  // the optimizer reads them and skips itself on found_inf.
  comm_.all_gather(block_sums_.data(), gathered_block_sums_.data(), sums_stride_, DType::f64);
  optimizer_rule_.step_samples = batch_.samples;
  backend_.amp_prepare(state(), gathered_block_sums_.as<double>(), norm_order_, optimizer_rule_);
  if (config_.noise_scale && batch_.small_samples > 0.0) {
    common::NoiseRule rule;
    rule.small_samples = batch_.small_samples;
    rule.big_samples = static_cast<double>(batch_.samples);
    rule.small_batches = static_cast<double>(comm_.size());
    rule.small_grad_factor = batch_.small_grad_factor;
    rule.decay = config_.noise_scale_ema;
    backend_.noise_prepare(state(), gathered_block_sums_.as<double>(), small_order_, rule);
  }
  if (config_.optimizer == OptimizerKind::lamb)
    lamb_step();
  else
    backend_.adamw(master(), adam_m(), adam_v(), grads_.data(), grad_dtype(), my_segments_, state());
  // The loss-scaler state machine and Adam's t, on the replicated state (it leaves the flags as they are).
  backend_.amp_update(state(), scaler_rule_);
  timings_.optimizer_seconds = seconds_since(t0);
}

void MixedPrecisionEngine::gather_params() {
  const auto t0 = std::chrono::steady_clock::now();
  // My slices of params from the master shard (skipped on found_inf), then everyone's slices to everyone
  // (unchanged weights on a skipped step).
  backend_.cast_master(params_.data(), config_.dtype, master(), my_slices_, state());
  const size_t esize = dtype_size(config_.dtype);
  auto* params = static_cast<std::byte*>(params_.data());
  for (size_t b = 0; b < layout_.buckets().size(); ++b) {
    const Bucket& bucket = layout_.buckets()[b];
    pending_[b] = comm_.iall_gather(params + layout_.slice_offset(b, comm_.rank()) * esize,
                                    params + bucket.offset * esize, bucket.slice_elements, config_.dtype);
  }
  for (auto& request : pending_) request->wait();
  for (auto& request : pending_) request.reset();
  timings_.gather_seconds = seconds_since(t0);
}

void MixedPrecisionEngine::step_async(bool stop_requested) {
  check_grads(stop_requested);
  agree();
  update();
  gather_params();
}

StepResult MixedPrecisionEngine::result() {
  common::AmpState s;
  backend_.copy_to_host(&s, state_.data(), sizeof s);
  scaler_.restore(s.scaler);
  applied_steps_ = s.applied_steps;
  applied_samples_ = s.applied_samples;
  StepResult r = timings_;
  r.skipped = s.flags[common::kFoundInf] != 0.0f;
  r.stop_requested = s.flags[common::kStopRequested] != 0.0f;
  r.loss_scale = s.used_scale;
  r.grad_norm = s.grad_norm;
  r.clip_factor = s.clip_factor;
  r.lr = s.lr;
  r.applied_steps = s.applied_steps;
  r.applied_samples = s.applied_samples;
  noise_ = s.noise;
  r.noise_scale = common::noise_scale(s.noise);
  r.grad_sq_estimate = common::noise_grad_sq(s.noise);
  r.trace_estimate = common::noise_trace(s.noise);
  if (s.min_scale_stop != 0) scaler_.throw_min_scale_stop(s.scaler);  // identical on every rank
  return r;
}

StepResult MixedPrecisionEngine::step(bool stop_requested) {
  step_async(stop_requested);
  return result();
}

MemoryReport MixedPrecisionEngine::memory() const {
  MemoryReport r;
  r.num_parameters = layout_.num_parameters();
  r.world_size = comm_.size();
  r.params_bytes = params_.num_bytes();
  r.grads_bytes = grads_.num_bytes() + micro_grads_.num_bytes();
  for (const Staging& entry : pool_) r.staging_bytes += entry.data.num_bytes() + entry.wire.num_bytes();
  r.zero_stage = config_.zero_stage;
  r.grad_element_bytes = dtype_size(grad_dtype());
  r.fp32_grad_accumulation = config_.fp32_grad_accumulation;
  r.master_bytes = master_.num_bytes();
  r.adam_m_bytes = adam_m_.num_bytes();
  r.adam_v_bytes = adam_v_.num_bytes();
  r.scratch_bytes = block_sums_.num_bytes() + gathered_block_sums_.num_bytes() + state_.num_bytes() +
                    lamb_sums_.num_bytes() + gathered_lamb_sums_.num_bytes() + trust_.num_bytes();
  return r;
}

MemoryReport MixedPrecisionEngine::predict_memory(std::vector<TensorSpec> tensors, const EngineConfig& config,
                                                  int world_size) {
  // The constructor's allocations, size by size.
  const EngineConfig c = effective(config);
  const ParamLayout layout(std::move(tensors), layout_options(c), world_size);
  const size_t esize = dtype_size(c.dtype);
  const size_t shard_bytes = layout.shard_elements() * sizeof(float);
  MemoryReport r;
  r.num_parameters = layout.num_parameters();
  r.world_size = world_size;
  r.params_bytes = layout.padded_elements() * esize;
  r.zero_stage = c.zero_stage;
  r.grad_element_bytes = c.fp32_grad_accumulation ? sizeof(float) : esize;
  r.fp32_grad_accumulation = c.fp32_grad_accumulation;
  if (c.zero_stage == 2) {
    r.grads_bytes = layout.shard_elements() * r.grad_element_bytes;
    for (const size_t capacity : staging_capacities(layout, c.staging_buffers))
      r.staging_bytes += staging_entry_bytes(c, capacity);
  } else {
    r.grads_bytes = layout.padded_elements() * (c.fp32_grad_accumulation ? sizeof(float) + esize : esize);
  }
  r.master_bytes = r.adam_m_bytes = r.adam_v_bytes = shard_bytes;
  // Block sums and bucket squares (sums_stride_ per rank), this rank's and gathered from every rank.
  const auto ranks = static_cast<size_t>(world_size);
  const size_t stride = layout.blocks_per_rank() + layout.buckets().size();
  r.scratch_bytes = stride * (1 + ranks) * sizeof(double) + sizeof(common::AmpState);
  if (c.optimizer == OptimizerKind::lamb)  // setup_lamb: w^2 and r^2 segment sums, gathered; trust ratios
    r.scratch_bytes += 2 * lamb_capacity(layout.norm_segments(), world_size) * (1 + ranks) * sizeof(double) +
                       layout.tensors().size() * sizeof(float);
  return r;
}

}  // namespace mpt
