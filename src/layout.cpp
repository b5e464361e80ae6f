// Flat parameter layout, buckets and shards (see include/mptrain/layout.hpp).
#include "mptrain/layout.hpp"

#include <algorithm>
#include <unordered_set>

#include "mptrain/error.hpp"

namespace mpt {

size_t TensorSpec::num_elements() const {
  size_t n = 1;
  for (int64_t d : shape)
    if (__builtin_mul_overflow(n, static_cast<size_t>(d), &n))
      throw InputError(fmt::format("tensor '{}': element count overflows 64 bits", name));
  return n;
}

namespace {
size_t round_up(size_t x, size_t multiple) {
  return (x + multiple - 1) / multiple * multiple;
}
}  // namespace

ParamLayout::ParamLayout(std::vector<TensorSpec> tensors, const LayoutOptions& options, int world_size)
    : options_(options), world_size_(world_size) {
  MPT_INPUT_CHECK(world_size >= 1, "parameter layout: world size must be >= 1, got {}", world_size);
  MPT_INPUT_CHECK(options.bucket_elements >= 1, "parameter layout: bucket size must be >= 1 element");
  MPT_INPUT_CHECK(options.block_elements >= 1, "parameter layout: block size must be >= 1 element");
  size_t align = 0;  // buckets are padded to a multiple of N x block_elements
  MPT_INPUT_CHECK(!__builtin_mul_overflow(options.block_elements, static_cast<size_t>(world_size), &align) &&
                      align <= (size_t{1} << 40),
                  "parameter layout: block size {} x world size {} is too large", options.block_elements,
                  world_size);
  MPT_INPUT_CHECK(!tensors.empty(), "parameter layout: no tensors");
  std::unordered_set<std::string> names;
  for (const TensorSpec& t : tensors) {
    MPT_INPUT_CHECK(!t.name.empty(), "parameter layout: a tensor has an empty name");
    MPT_INPUT_CHECK(names.insert(t.name).second, "parameter layout: duplicate tensor name '{}'", t.name);
    MPT_INPUT_CHECK(!t.shape.empty(), "parameter layout: tensor '{}' has no dimensions", t.name);
    for (int64_t d : t.shape)
      MPT_INPUT_CHECK(d >= 1, "parameter layout: tensor '{}' has dimension {} (must be >= 1)", t.name, d);
  }

  tensors_.resize(tensors.size());
  Bucket open;  // the bucket being filled
  size_t flat = 0;
  auto close = [&] {
    open.padded_elements = round_up(open.num_elements, align);
    open.slice_elements = open.padded_elements / static_cast<size_t>(world_size);
    open.shard_offset = buckets_.empty() ? 0 : buckets_.back().shard_offset + buckets_.back().slice_elements;
    flat = open.offset + open.padded_elements;
    buckets_.push_back(open);
    open = Bucket{};
    open.offset = flat;
  };
  // Reverse registration order: the last layer's tensors come first in the flat vector.
  for (size_t k = tensors.size(); k-- > 0;) {
    const size_t n = tensors[k].num_elements();
    MPT_INPUT_CHECK(n <= (size_t{1} << 48) && num_parameters_ + n <= (size_t{1} << 48),
                    "parameter layout: more than 2^48 parameters (at tensor '{}')", tensors[k].name);
    if (open.num_elements > 0 && open.num_elements + n > options.bucket_elements) close();
    tensors_[k].spec = std::move(tensors[k]);
    tensors_[k].offset = open.offset + open.num_elements;
    tensors_[k].bucket = buckets_.size();
    open.num_elements += n;
    num_parameters_ += n;
  }
  close();
  padded_elements_ = flat;
}

size_t ParamLayout::slice_offset(size_t bucket, int rank) const {
  const Bucket& b = buckets_.at(bucket);
  return b.offset + static_cast<size_t>(rank) * b.slice_elements;
}

std::vector<ShardSegment> ParamLayout::shard_segments(int rank) const {
  MPT_CHECK(rank >= 0 && rank < world_size_, "shard_segments: rank {} outside [0, {})", rank, world_size_);
  std::vector<ShardSegment> segments;
  // Tensors in flat order (reverse registration order) so segments come out in shard order.
  for (size_t k = tensors_.size(); k-- > 0;) {
    const TensorPlacement& t = tensors_[k];
    const Bucket& b = buckets_[t.bucket];
    const size_t lo = std::max(t.offset, slice_offset(t.bucket, rank));
    const size_t hi =
        std::min(t.offset + t.spec.num_elements(), slice_offset(t.bucket, rank) + b.slice_elements);
    if (lo >= hi) continue;
    ShardSegment s;
    s.shard_offset = b.shard_offset + (lo - slice_offset(t.bucket, rank));
    s.flat_offset = lo;
    s.num_elements = hi - lo;
    s.tensor = k;
    s.tensor_offset = lo - t.offset;
    s.decay = t.spec.decay;
    segments.push_back(s);
  }
  return segments;
}

std::vector<NormSegment> ParamLayout::norm_segments() const {
  const size_t block = options_.block_elements;
  // Tensors in flat order, so that each block's tensors are visited in flat order.
  std::vector<size_t> flat_order(tensors_.size());
  for (size_t k = 0; k < flat_order.size(); ++k) flat_order[k] = flat_order.size() - 1 - k;
  std::vector<NormSegment> segments;
  size_t next = 0;  // first tensor (in flat_order) not yet finished
  for (size_t b = 0; b < buckets_.size(); ++b) {
    const Bucket& bucket = buckets_[b];
    const size_t blocks_per_slice = bucket.slice_elements / block;
    for (size_t lo = 0; lo < bucket.num_elements; lo += block) {
      const size_t block_begin = bucket.offset + lo;
      const size_t block_end = bucket.offset + std::min(lo + block, bucket.num_elements);
      const size_t k = lo / block;
      const int owner = static_cast<int>(k / blocks_per_slice);
      const size_t shard_base = bucket.shard_offset + (k % blocks_per_slice) * block;
      for (size_t f = next; f < flat_order.size(); ++f) {
        const TensorPlacement& t = tensors_[flat_order[f]];
        const size_t t_begin = t.offset, t_end = t.offset + t.spec.num_elements();
        if (t_begin >= block_end) break;
        const size_t s_begin = std::max(t_begin, block_begin), s_end = std::min(t_end, block_end);
        if (s_begin < s_end) {
          NormSegment s;
          s.tensor = flat_order[f];
          s.flat_offset = s_begin;
          s.num_elements = s_end - s_begin;
          s.owner = owner;
          s.shard_offset = shard_base + (s_begin - block_begin);
          s.decay = t.spec.decay;
          segments.push_back(s);
        }
        if (t_end <= block_end) next = f + 1;  // finished within this block
      }
    }
  }
  return segments;
}

size_t ParamLayout::find(const std::string& name) const {
  for (size_t k = 0; k < tensors_.size(); ++k)
    if (tensors_[k].spec.name == name) return k;
  throw Error(fmt::format("parameter layout: no tensor named '{}'", name));
}

std::vector<size_t> ParamLayout::global_block_order() const {
  const size_t per_rank = blocks_per_rank();
  const size_t block = options_.block_elements;
  std::vector<size_t> order;
  for (const Bucket& b : buckets_) {
    const size_t blocks_per_slice = b.slice_elements / block;
    const size_t real_blocks = (b.num_elements + block - 1) / block;  // independent of N
    for (size_t k = 0; k < real_blocks; ++k) {
      const size_t owner = k / blocks_per_slice;
      const size_t local = b.shard_offset / block + k % blocks_per_slice;
      order.push_back(owner * per_rank + local);
    }
  }
  return order;
}

double ParamLayout::sum_blocks_in_global_order(const std::vector<double>& gathered) const {
  MPT_CHECK(gathered.size() == blocks_per_rank() * static_cast<size_t>(world_size_),
            "sum_blocks_in_global_order: {} values, expected {} ranks x {} blocks", gathered.size(),
            world_size_, blocks_per_rank());
  double total = 0.0;
  for (const size_t k : global_block_order()) total += gathered[k];
  return total;
}

}  // namespace mpt
