// FNV-1a 64-bit hashing, used to compare config, layout and data across ranks and to checksum checkpoints.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace mpt {

inline constexpr uint64_t kFnv1aOffset = 0xcbf29ce484222325ull;
inline constexpr uint64_t kFnv1aPrime = 0x100000001b3ull;

/// Continues the FNV-1a hash `h` over `num_bytes` bytes at `data`.
inline uint64_t fnv1a(const void* data, size_t num_bytes, uint64_t h = kFnv1aOffset) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < num_bytes; ++i) h = (h ^ p[i]) * kFnv1aPrime;
  return h;
}

/// Continues the FNV-1a hash `h` over the characters of `text`.
inline uint64_t fnv1a(std::string_view text, uint64_t h = kFnv1aOffset) {
  return fnv1a(text.data(), text.size(), h);
}

}  // namespace mpt
