// The tiny GPT and the byte trace that the multi-rank step tests (tests/test_recompute_mpi.cpp,
// tests/test_zero2_mpi.cpp) compare bitwise between two ways of taking the same steps.
#pragma once

#include <cstddef>
#include <vector>

#include "mptrain/model.hpp"

namespace mpt::test {

/// A 3-layer GPT with odd sizes (vocabulary 37, 2 heads of 8 channels, 8 positions): 16 channels keep the
/// runs fast, and a vocabulary that is no multiple of a block size gives buckets and shards ragged ends.
inline GPTConfig tiny_gpt() {
  GPTConfig c;
  c.vocab_size = 37;
  c.max_seq_len = 8;
  c.num_layers = 3;
  c.num_heads = 2;
  c.channels = 16;
  return c;
}

/// What a run leaves behind, as raw bytes appended in order (weights, master shard, losses, ...), so two
/// runs compare bit for bit with one EXPECT_EQ on `bytes`.
struct RunTrace {
  std::vector<unsigned char> bytes;
  /// Appends the n bytes at p.
  void add(const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    bytes.insert(bytes.end(), b, b + n);
  }
};

}  // namespace mpt::test
