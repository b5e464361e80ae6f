// Flat parameter layout tests: bucket boundaries independent of N, padding to N x block, slice ownership,
// shard segments covering every parameter exactly once for any N (prime element counts included), and the
// fixed-order block sum being bitwise the same for every N.
#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/error.hpp"
#include "mptrain/layout.hpp"

namespace mpt {
namespace {

std::vector<TensorSpec> model() {
  return {{"wte", {37, 12}, true},  {"wpe", {7, 12}, true}, {"ln.w", {12}, false},
          {"fc.w", {12, 48}, true}, {"fc.b", {48}, false},  {"proj.w", {48, 12}, true},
          {"tiny", {3}, false}};
}

LayoutOptions options(size_t bucket, size_t block) {
  LayoutOptions o;
  o.bucket_elements = bucket;
  o.block_elements = block;
  return o;
}

TEST(Layout, ReverseOrderBucketsIndependentOfN) {
  const ParamLayout one(model(), options(600, 16), 1);
  // Flat order is reverse registration order: the last tensor starts the flat vector.
  EXPECT_EQ(one.tensors().back().offset, 0u);
  EXPECT_EQ(one.tensors().back().bucket, 0u);
  for (int n : {2, 3, 4, 5, 7, 8}) {
    const ParamLayout many(model(), options(600, 16), n);
    ASSERT_EQ(many.buckets().size(), one.buckets().size());
    EXPECT_EQ(many.num_parameters(), one.num_parameters());
    for (size_t b = 0; b < one.buckets().size(); ++b) {
      EXPECT_EQ(many.buckets()[b].num_elements, one.buckets()[b].num_elements) << "N " << n;
      EXPECT_EQ(many.buckets()[b].padded_elements % (16u * n), 0u);
      EXPECT_GE(many.buckets()[b].padded_elements, many.buckets()[b].num_elements);
      EXPECT_LT(many.buckets()[b].padded_elements - many.buckets()[b].num_elements, 16u * n);
      EXPECT_EQ(many.buckets()[b].slice_elements * n, many.buckets()[b].padded_elements);
    }
    for (size_t t = 0; t < model().size(); ++t) EXPECT_EQ(many.tensors()[t].bucket, one.tensors()[t].bucket);
  }
}

TEST(Layout, BucketsHoldWholeTensorsUpToTheSize) {
  const ParamLayout l(model(), options(600, 16), 2);
  // proj.w (576) + tiny (3) fit in 600; fc.b (48) would not; fc.w (576) alone; etc.
  for (const Bucket& b : l.buckets()) {
    size_t inside = 0;
    for (const TensorPlacement& t : l.tensors())
      if (t.offset >= b.offset && t.offset < b.offset + b.padded_elements) {
        inside += t.spec.num_elements();
        EXPECT_LE(t.offset + t.spec.num_elements(), b.offset + b.num_elements) << t.spec.name;
      }
    EXPECT_EQ(inside, b.num_elements);
    EXPECT_TRUE(b.num_elements <= 600 || inside == b.num_elements);
  }
  // A tensor larger than the bucket size gets a bucket of its own.
  const ParamLayout big({{"a", {10}, true}, {"huge", {5000}, true}, {"b", {10}, true}}, options(600, 16), 3);
  EXPECT_EQ(big.buckets().size(), 3u);
  EXPECT_EQ(big.buckets()[1].num_elements, 5000u);
}

bool is_prime(size_t n) {
  if (n < 2) return false;
  for (size_t d = 2; d * d <= n; ++d)
    if (n % d == 0) return false;
  return true;
}

// Every real parameter belongs to exactly one rank's shard, for any N and any element count.
TEST(Layout, ShardSegmentsPartitionEveryParameter) {
  std::vector<std::vector<TensorSpec>> models = {model(), {{"p", {1009}, true}}, {{"x", {1}, false}}};
  ASSERT_TRUE(is_prime(1009));
  for (const auto& m : models) {
    for (int n = 1; n <= 8; ++n) {
      const ParamLayout l(m, options(300, 8), n);
      std::vector<int> owner(l.padded_elements(), -1);
      size_t covered = 0;
      for (int r = 0; r < n; ++r) {
        size_t previous_end = 0;
        for (const ShardSegment& s : l.shard_segments(r)) {
          EXPECT_GE(s.shard_offset, previous_end);  // shard order, no overlap
          previous_end = s.shard_offset + s.num_elements;
          EXPECT_LE(previous_end, l.shard_elements());
          const TensorPlacement& t = l.tensors()[s.tensor];
          EXPECT_EQ(s.flat_offset, t.offset + s.tensor_offset);
          EXPECT_EQ(s.decay, t.spec.decay);
          for (size_t i = 0; i < s.num_elements; ++i) {
            ASSERT_EQ(owner[s.flat_offset + i], -1) << "element owned twice";
            owner[s.flat_offset + i] = r;
          }
          covered += s.num_elements;
          // The segment lies inside rank r's slice of its bucket.
          EXPECT_GE(s.flat_offset, l.slice_offset(t.bucket, r));
          EXPECT_LE(s.flat_offset + s.num_elements,
                    l.slice_offset(t.bucket, r) + l.buckets()[t.bucket].slice_elements);
        }
      }
      EXPECT_EQ(covered, l.num_parameters()) << "N " << n;
    }
  }
}

// The fixed-order sum over gathered block sums is bitwise the same for every N.
TEST(Layout, BlockSumOrderIndependentOfN) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  const ParamLayout one(model(), options(600, 16), 1);
  std::vector<double> values(one.num_parameters());  // squared gradient per real element, registration order
  for (double& x : values) x = std::pow(u(rng), 2) * std::pow(10.0, 6.0 * u(rng));
  double reference = 0;
  for (int n = 1; n <= 6; ++n) {
    const ParamLayout l(model(), options(600, 16), n);
    // Flat padded vector of squares, then per-rank block sums in shard order, rank-major.
    std::vector<double> flat(l.padded_elements(), 0.0);
    size_t k = 0;
    for (const TensorPlacement& t : l.tensors())
      for (size_t i = 0; i < t.spec.num_elements(); ++i) flat[t.offset + i] = values[k++];
    std::vector<double> gathered;
    for (int r = 0; r < n; ++r)
      for (size_t b = 0; b < l.buckets().size(); ++b) {
        const size_t start = l.slice_offset(b, r);
        for (size_t blk = 0; blk < l.buckets()[b].slice_elements; blk += 16) {
          double s = 0;
          for (size_t i = 0; i < 16; ++i) s += flat[start + blk + i];
          gathered.push_back(s);
        }
      }
    ASSERT_EQ(gathered.size(), l.blocks_per_rank() * n);
    const double total = l.sum_blocks_in_global_order(gathered);
    if (n == 1) reference = total;
    EXPECT_EQ(total, reference) << "N " << n;
  }
  double plain = 0;
  for (double x : values) plain += x;
  EXPECT_NEAR(reference, plain, 1e-12 * plain);
}

// LAMB's norm segments: the same (tensor, offset in tensor, length) sequence for every N, each inside one
// norm block and one tensor, covering every parameter once in flat order, and each lying in its owner's
// shard exactly where shard_segments() puts those elements.
TEST(Layout, NormSegmentsIndependentOfN) {
  struct Piece {
    size_t tensor, tensor_offset, num_elements;
    bool operator==(const Piece&) const = default;
  };
  for (size_t block : {size_t{16}, size_t{7}, size_t{1}, size_t{1000}}) {
    std::vector<Piece> reference;
    for (int n : {1, 2, 3, 4, 5, 8}) {
      const ParamLayout l(model(), options(600, block), n);
      std::vector<Piece> pieces;
      size_t covered = 0;
      for (const NormSegment& s : l.norm_segments()) {
        const TensorPlacement& t = l.tensors()[s.tensor];
        ASSERT_GE(s.flat_offset, t.offset);
        ASSERT_LE(s.flat_offset + s.num_elements, t.offset + t.spec.num_elements());
        const Bucket& b = l.buckets()[t.bucket];
        // Inside one block of the bucket.
        ASSERT_EQ((s.flat_offset - b.offset) / block,
                  (s.flat_offset + s.num_elements - 1 - b.offset) / block);
        ASSERT_EQ(s.decay, t.spec.decay);
        pieces.push_back({s.tensor, s.flat_offset - t.offset, s.num_elements});
        covered += s.num_elements;
        // The owner's shard holds these elements at shard_offset.
        bool found = false;
        for (const ShardSegment& q : l.shard_segments(s.owner))
          if (q.tensor == s.tensor && q.flat_offset <= s.flat_offset &&
              s.flat_offset + s.num_elements <= q.flat_offset + q.num_elements) {
            EXPECT_EQ(q.shard_offset + (s.flat_offset - q.flat_offset), s.shard_offset);
            found = true;
          }
        ASSERT_TRUE(found) << "block " << block << " N " << n;
      }
      EXPECT_EQ(covered, l.num_parameters());
      // A tensor's segments are consecutive.
      for (size_t k = 1; k < pieces.size(); ++k)
        if (pieces[k].tensor == pieces[k - 1].tensor) {
          EXPECT_EQ(pieces[k].tensor_offset, pieces[k - 1].tensor_offset + pieces[k - 1].num_elements);
        }
      if (n == 1)
        reference = pieces;
      else
        EXPECT_TRUE(pieces == reference) << "block " << block << " N " << n;
    }
  }
}

TEST(Layout, RejectsBadInput) {
  EXPECT_THROW(ParamLayout({}, options(10, 4), 1), InputError);
  EXPECT_THROW(ParamLayout({{"a", {3}, true}, {"a", {2}, true}}, options(10, 4), 1), InputError);
  EXPECT_THROW(ParamLayout({{"", {3}, true}}, options(10, 4), 1), InputError);
  EXPECT_THROW(ParamLayout({{"a", {3, 0}, true}}, options(10, 4), 1), InputError);
  EXPECT_THROW(ParamLayout({{"a", {}, true}}, options(10, 4), 1), InputError);
  EXPECT_THROW(ParamLayout({{"a", {3}, true}}, options(10, 4), 0), InputError);
  EXPECT_THROW(ParamLayout({{"a", {3}, true}}, options(0, 4), 1), InputError);
  EXPECT_THROW(ParamLayout({{"a", {3}, true}}, options(10, 0), 1), InputError);
  // Element counts and the padding alignment that overflow 64 bits are input errors, not wrapped sizes.
  EXPECT_THROW(ParamLayout({{"huge", {int64_t{1} << 32, int64_t{1} << 32}, true}}, options(10, 4), 1),
               InputError);
  EXPECT_THROW(
      ParamLayout({{"a", {int64_t{1} << 47}, true}, {"b", {int64_t{1} << 47}, true}, {"c", {5}, true}},
                  options(10, 4), 1),
      InputError);
  EXPECT_THROW(ParamLayout({{"a", {3}, true}}, options(10, size_t{1} << 63), 2), InputError);
  EXPECT_THROW(ParamLayout({{"a", {3}, true}}, options(10, (size_t{1} << 62) + 1), 4), InputError);
  try {
    ParamLayout({{"w", {3}, true}, {"w", {2}, true}}, options(10, 4), 1);
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("'w'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace mpt
