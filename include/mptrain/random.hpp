// A counter-based random number generator: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random
// numbers: as easy as 1, 2, 3", SC 2011; the generator of Random123, cuRAND's Philox and JAX). Each output
// block depends only on (key, counter), so any element of a stream can be computed on its own, in any order
// and on any number of threads, and gives the same value.
#pragma once

#include <array>
#include <cstdint>

namespace mpt {

/// Philox4x32 with 10 rounds: 128 random bits for the 128-bit `counter` under the 64-bit `key` (both as
/// 32-bit words, least significant first). Pure function; the known-answer vectors of Random123 (kat_vectors)
/// hold.
constexpr std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter,
                                                std::array<uint32_t, 2> key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;    // round multipliers
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule: golden ratio, sqrt(3) - 1
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key[0] += kWeyl0;
      key[1] += kWeyl1;
    }
    const uint64_t p0 = uint64_t{kMul0} * counter[0];
    const uint64_t p1 = uint64_t{kMul1} * counter[2];
    counter = {static_cast<uint32_t>(p1 >> 32) ^ counter[1] ^ key[0], static_cast<uint32_t>(p1),
               static_cast<uint32_t>(p0 >> 32) ^ counter[3] ^ key[1], static_cast<uint32_t>(p0)};
  }
  return counter;
}

}  // namespace mpt
