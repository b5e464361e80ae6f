// The flat parameter layout: named tensors as views into one flat vector, grouped into gradient buckets, and
// each rank's shard (slice r of every bucket), as DESIGN.md "The step" describes.
//
// Tensors are registered in forward order and laid out in REVERSE order, so backward (which produces the last
// layer's gradients first) fills the flat vector from its start and bucket 0 is the first one finished, as in
// PyTorch DDP and Megatron-LM. A bucket is a contiguous run of whole tensors of at most `bucket_elements`
// (a larger tensor gets a bucket of its own), so bucket boundaries never depend on the number of ranks N.
// Each bucket is zero-padded at its end to a multiple of N x `block_elements`; rank r owns slice r of every
// bucket. `block_elements` is also the size of the grad-norm blocks, so no block straddles two ranks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace mpt {

/// A parameter tensor as the model declares it.
struct TensorSpec {
  std::string name;            ///< unique, e.g. "h.0.attn.qkv.weight"
  std::vector<int64_t> shape;  ///< every dimension >= 1
  bool decay = true;           ///< AdamW weight decay applies (false for biases, LayerNorm, ...)
  /// Product of the shape (elements).
  size_t num_elements() const;
};

/// A tensor placed in the flat vector.
struct TensorPlacement {
  TensorSpec spec;
  size_t offset = 0;  ///< first element in the padded flat vector
  size_t bucket = 0;  ///< index of the bucket holding it
};

/// A contiguous run of the flat vector, reduced as one collective.
struct Bucket {
  size_t offset = 0;           ///< first element in the padded flat vector
  size_t num_elements = 0;     ///< real (unpadded) elements
  size_t padded_elements = 0;  ///< multiple of N x block_elements, >= num_elements
  size_t slice_elements = 0;   ///< padded_elements / N: what each rank owns
  size_t shard_offset = 0;     ///< where this bucket's slice starts inside every rank's shard
};

/// Part of a rank's shard that holds real parameters of one tensor (never padding): for AdamW and
/// checkpoint I/O.
struct ShardSegment {
  size_t shard_offset = 0;  ///< element index inside the rank's shard
  size_t flat_offset = 0;   ///< element index in the padded flat vector
  size_t num_elements = 0;
  size_t tensor = 0;         ///< index into tensors()
  size_t tensor_offset = 0;  ///< element index inside the tensor
  bool decay = true;
};

/// The part of one norm block (block_elements elements of a bucket, counted from the bucket's start) that
/// lies in one tensor: LAMB's per-tensor norm segments. Which elements a segment holds depends only on the
/// tensors and the options, never on N; where it lies (owner rank, offsets) does.
struct NormSegment {
  size_t tensor = 0;        ///< index into tensors()
  size_t flat_offset = 0;   ///< element index in the padded flat vector
  size_t num_elements = 0;  ///< 1 .. block_elements
  int owner = 0;            ///< the rank whose shard holds it (a block never straddles two ranks)
  size_t shard_offset = 0;  ///< element index inside the owner's shard
  bool decay = true;        ///< the tensor's TensorSpec::decay
};

/// Layout options; bucket boundaries depend on these and on the tensors, never on N.
struct LayoutOptions {
  size_t bucket_elements = size_t{25}
                           << 19;  ///< 25 MiB of fp16 gradients (13,107,200 elements), PyTorch's 25 MB
  size_t block_elements = 1024;    ///< grad-norm block and padding alignment
};

class ParamLayout {
 public:
  /// Lays out `tensors` (in forward order) for `world_size` ranks. Throws mpt::InputError for an empty list,
  /// an empty or duplicate name, a dimension < 1, world_size < 1 or zero-sized options.
  ParamLayout(std::vector<TensorSpec> tensors, const LayoutOptions& options, int world_size);

  /// Tensors in registration (forward) order with their placement.
  const std::vector<TensorPlacement>& tensors() const { return tensors_; }
  /// Buckets in flat-vector order (bucket 0 is finished first by backward).
  const std::vector<Bucket>& buckets() const { return buckets_; }
  const LayoutOptions& options() const { return options_; }
  int world_size() const { return world_size_; }

  /// P: real parameters (elements), excluding padding.
  size_t num_parameters() const { return num_parameters_; }
  /// Elements of the padded flat vector (N x shard_elements()).
  size_t padded_elements() const { return padded_elements_; }
  /// Elements of every rank's shard (the sum of its bucket slices, padding included).
  size_t shard_elements() const { return padded_elements_ / static_cast<size_t>(world_size_); }
  /// Flat offset of rank r's slice of bucket b.
  size_t slice_offset(size_t bucket, int rank) const;
  /// The real-parameter segments of rank r's shard, in shard order.
  std::vector<ShardSegment> shard_segments(int rank) const;
  /// Grad-norm blocks per rank: shard_elements() / block_elements.
  size_t blocks_per_rank() const { return shard_elements() / options_.block_elements; }
  /// Every norm segment in the global order: bucket by bucket, block by block, and within a block tensor by
  /// tensor in flat order. A tensor's segments are consecutive in it, and the sequence of segments (tensor,
  /// element count) is the same for every N.
  std::vector<NormSegment> norm_segments() const;
  /// Index of tensor `name`; throws mpt::Error when absent.
  size_t find(const std::string& name) const;

  /// Sums gathered block sums (all_gather of every rank's per-block values, rank-major, blocks_per_rank()
  /// each) in the fixed global order: bucket by bucket, block by block through the real elements. The order
  /// and the blocks do not depend on N, so the result is bitwise the same for every N.
  double sum_blocks_in_global_order(const std::vector<double>& gathered) const;
  /// The indices into the gathered block sums that sum_blocks_in_global_order adds, in its order: every real
  /// block once (padding-only blocks left out), as many as the unpadded blocks of all buckets for any N.
  std::vector<size_t> global_block_order() const;

 private:
  std::vector<TensorPlacement> tensors_;
  std::vector<Bucket> buckets_;
  LayoutOptions options_;
  int world_size_ = 1;
  size_t num_parameters_ = 0;
  size_t padded_elements_ = 0;
};

}  // namespace mpt
