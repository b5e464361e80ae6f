// Dataset loading, validation, hashing and batching (include/mptrain/data.hpp).
//
// Files are read whole with one fread each: text straight into the uint8 token store, shards in two passes
// (validate every header first, then read every file's tokens into one uint16 store sized once), so a bad
// shard late in a glob fails before any large read and no store is ever regrown.
#include "mptrain/data.hpp"

#include <glob.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>

#include "mptrain/error.hpp"
#include "mptrain/hash.hpp"

namespace mpt {

static_assert(std::endian::native == std::endian::little, "token shards are read as little-endian in place");

namespace {

namespace fs = std::filesystem;

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;

/// The path for a one-line message: control characters (a newline in a file name) become \xNN.
std::string printable(const std::string& path) {
  std::string out;
  out.reserve(path.size());
  for (const char c : path) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f)
      out += fmt::format("\\x{:02x}", u);
    else
      out += c;
  }
  return out;
}

[[noreturn]] void file_error(const std::string& path, const std::string& what) {
  throw InputError(fmt::format("data file '{}': {}", printable(path), what));
}

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

/// Opens `path` for reading after checking it is an existing regular file; returns its size in bytes.
File open_regular_file(const std::string& path, uint64_t* num_bytes) {
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (st.type() == fs::file_type::not_found) file_error(path, "no such file");
  if (ec) file_error(path, fmt::format("cannot stat: {}", ec.message()));
  if (st.type() == fs::file_type::directory) file_error(path, "is a directory, expected a file");
  if (st.type() != fs::file_type::regular) file_error(path, "is not a regular file");
  errno = 0;
  File f(std::fopen(path.c_str(), "rb"));
  if (!f) file_error(path, fmt::format("cannot open for reading: {}", std::strerror(errno)));
  *num_bytes = fs::file_size(path, ec);
  if (ec) file_error(path, fmt::format("cannot get the size: {}", ec.message()));
  return f;
}

void read_exactly(std::FILE* f, void* dst, uint64_t num_bytes, const std::string& path) {
  if (num_bytes == 0) return;
  errno = 0;
  const size_t got = std::fread(dst, 1, num_bytes, f);
  if (got != num_bytes) {
    if (std::ferror(f)) file_error(path, fmt::format("read error: {}", std::strerror(errno)));
    file_error(path, fmt::format("read {} of {} bytes (file shrank while reading?)", got, num_bytes));
  }
}

bool is_glob(const std::string& s) {
  return s.find_first_of("*?[") != std::string::npos;
}

bool ends_with_bin(const std::string& s) {
  return s.size() >= 4 && s.compare(s.size() - 4, 4, ".bin") == 0;
}

/// Matches of `pattern` in byte order (glob(3) sorts by the locale's collation; ranks must agree).
std::vector<std::string> expand_glob(const std::string& pattern) {
  glob_t g{};
  const int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
  std::vector<std::string> out;
  if (rc == 0)
    for (size_t i = 0; i < g.gl_pathc; ++i) out.emplace_back(g.gl_pathv[i]);
  ::globfree(&g);
  if (rc == GLOB_NOMATCH || (rc == 0 && out.empty()))
    throw InputError(fmt::format("data glob '{}': matches no files", printable(pattern)));
  if (rc != 0)
    throw InputError(fmt::format("data glob '{}': cannot expand ({})", printable(pattern),
                                 rc == GLOB_NOSPACE ? "out of memory" : "read error"));
  std::sort(out.begin(), out.end());
  return out;
}

struct ShardInfo {
  std::string path;
  int64_t num_tokens = 0;
  int64_t vocab_size = Dataset::kShardVocabSize;
};

/// Validates the header and the size of one shard.
ShardInfo inspect_shard(const std::string& path) {
  uint64_t num_bytes = 0;
  const File f = open_regular_file(path, &num_bytes);
  if (num_bytes == 0) file_error(path, "file is empty");
  if (num_bytes < static_cast<uint64_t>(Dataset::kShardHeaderBytes))
    file_error(path, fmt::format("{} bytes, too short for the {}-byte llm.c shard header", num_bytes,
                                 Dataset::kShardHeaderBytes));
  int32_t header[256];
  read_exactly(f.get(), header, sizeof(header), path);
  if (header[0] != Dataset::kShardMagic)
    file_error(path, fmt::format("wrong magic {} in the header (expected {}; not an llm.c token shard)",
                                 header[0], Dataset::kShardMagic));
  if (header[1] != Dataset::kShardVersion)
    file_error(path, fmt::format("wrong version {} in the header (expected {}: uint16 tokens)", header[1],
                                 Dataset::kShardVersion));
  const int64_t count = header[2];
  const uint64_t expected =
      static_cast<uint64_t>(Dataset::kShardHeaderBytes) + 2 * static_cast<uint64_t>(count);
  if (count < 0 || num_bytes != expected)
    file_error(path, fmt::format("file size {} bytes disagrees with the header's token count {} (expected "
                                 "1024 + 2*{} = {} bytes)",
                                 num_bytes, count, count, static_cast<int64_t>(expected)));
  const int32_t vocab = header[Dataset::kShardVocabSlot];
  if (vocab < 0 || vocab > 65536)
    file_error(path, fmt::format("vocabulary size {} in header slot {} is outside [1, 65536] (0: GPT-2's {})",
                                 vocab, Dataset::kShardVocabSlot, Dataset::kShardVocabSize));
  return {path, count, vocab == 0 ? Dataset::kShardVocabSize : vocab};
}

/// Reads every shard's tokens into `out` (sized once) and checks them against the vocabulary.
void read_shards(const std::vector<ShardInfo>& shards, std::vector<uint16_t>* out) {
  int64_t total = 0;
  for (const ShardInfo& s : shards) total += s.num_tokens;
  out->resize(static_cast<size_t>(total));
  int64_t at = 0;
  for (const ShardInfo& s : shards) {
    uint64_t num_bytes = 0;
    const File f = open_regular_file(s.path, &num_bytes);
    if (num_bytes != static_cast<uint64_t>(Dataset::kShardHeaderBytes + 2 * s.num_tokens))
      file_error(s.path, "file size changed while loading");
    if (std::fseek(f.get(), Dataset::kShardHeaderBytes, SEEK_SET) != 0)
      file_error(s.path, fmt::format("cannot seek past the header: {}", std::strerror(errno)));
    uint16_t* dst = out->data() + at;
    read_exactly(f.get(), dst, 2 * static_cast<uint64_t>(s.num_tokens), s.path);
    uint16_t max_token = 0;
    for (int64_t i = 0; i < s.num_tokens; ++i) max_token = std::max(max_token, dst[i]);
    if (max_token >= s.vocab_size) {
      const int64_t bad =
          std::find_if(dst, dst + s.num_tokens, [&](uint16_t t) { return t >= s.vocab_size; }) - dst;
      file_error(s.path, fmt::format("token {} at index {} is outside the shard's vocabulary of {} (header "
                                     "slot {}; 0 there means GPT-2's {})",
                                     dst[bad], bad, s.vocab_size, Dataset::kShardVocabSlot,
                                     Dataset::kShardVocabSize));
    }
    at += s.num_tokens;
  }
}

uint64_t fnv1a_u64(uint64_t h, uint64_t v) {
  for (int b = 0; b < 8; ++b) h = (h ^ ((v >> (8 * b)) & 0xff)) * kFnv1aPrime;
  return h;
}

/// SplitMix64's output function (Steele, Lea, Flood 2014).
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void check_slice(int64_t global_batch, int64_t first, int64_t count, int64_t T, const int32_t* tokens,
                 const int32_t* targets) {
  MPT_CHECK(T >= 1, "sequence length T = {} must be >= 1", T);
  MPT_CHECK(global_batch >= 1, "global_batch = {} must be >= 1", global_batch);
  MPT_CHECK(first >= 0 && count >= 0 && first + count <= global_batch,
            "sequences [{}, {}) are not inside the global batch of {}", first, first + count, global_batch);
  MPT_CHECK(count == 0 || (tokens != nullptr && targets != nullptr), "tokens and targets must not be null");
}

}  // namespace

Dataset Dataset::load(const std::string& path_or_glob, double val_fraction) {
  if (!(val_fraction >= 0.0 && val_fraction < 1.0))
    throw InputError(
        fmt::format("data '{}': val_fraction {} is outside [0, 1)", printable(path_or_glob), val_fraction));
  Dataset d;
  d.path_ = path_or_glob;
  d.is_text_ = !(is_glob(path_or_glob) || ends_with_bin(path_or_glob));
  if (d.is_text_) {
    uint64_t num_bytes = 0;
    const File f = open_regular_file(path_or_glob, &num_bytes);
    if (num_bytes == 0) file_error(path_or_glob, "file is empty");
    d.bytes_.resize(num_bytes);
    read_exactly(f.get(), d.bytes_.data(), num_bytes, path_or_glob);
    d.files_ = {path_or_glob};
  } else {
    d.files_ = is_glob(path_or_glob) ? expand_glob(path_or_glob) : std::vector<std::string>{path_or_glob};
    std::vector<ShardInfo> shards;
    shards.reserve(d.files_.size());
    for (const std::string& f : d.files_) shards.push_back(inspect_shard(f));
    d.shard_vocab_ = shards.front().vocab_size;
    for (const ShardInfo& s : shards)
      if (s.vocab_size != d.shard_vocab_)
        file_error(s.path,
                   fmt::format("vocabulary size {} differs from {}'s {} (shards of one tokenizer only)",
                               s.vocab_size, printable(shards.front().path), d.shard_vocab_));
    read_shards(shards, &d.shard_);
    if (d.shard_.empty())
      throw InputError(fmt::format("data '{}': the shards hold no tokens", printable(path_or_glob)));
  }

  const int64_t n = d.num_tokens();
  const double split = std::floor((1.0 - val_fraction) * static_cast<double>(n));
  d.split_ = std::clamp(static_cast<int64_t>(split), int64_t{0}, n);

  uint64_t h = fnv1a_u64(kFnv1aOffset, static_cast<uint64_t>(d.vocab_size()));
  if (d.is_text_) {
    h = fnv1a(d.bytes_.data(), d.bytes_.size(), h);
  } else {
    for (const uint16_t t : d.shard_) {
      h = (h ^ (t & 0xffu)) * kFnv1aPrime;
      h = (h ^ (t >> 8)) * kFnv1aPrime;
    }
  }
  d.hash_ = fnv1a_u64(h, static_cast<uint64_t>(d.split_));
  return d;
}

int64_t Dataset::num_tokens() const {
  return static_cast<int64_t>(is_text_ ? bytes_.size() : shard_.size());
}

int32_t Dataset::token(int64_t index) const {
  MPT_CHECK(index >= 0 && index < num_tokens(), "token index {} is outside [0, {})", index, num_tokens());
  return is_text_ ? bytes_[static_cast<size_t>(index)] : shard_[static_cast<size_t>(index)];
}

void Dataset::check_sequence_length(int64_t T, bool need_val) const {
  MPT_CHECK(T >= 1, "sequence length T = {} must be >= 1", T);
  if (train_tokens() < T + 1)
    throw InputError(
        fmt::format("data '{}': the training split ({} tokens) is shorter than one sequence "
                    "(T + 1 = {} tokens)",
                    printable(path_), train_tokens(), T + 1));
  if (need_val && val_tokens() < T + 1)
    throw InputError(
        fmt::format("data '{}': the validation split ({} tokens) is shorter than one sequence "
                    "(T + 1 = {} tokens); raise the validation fraction or use longer data",
                    printable(path_), val_tokens(), T + 1));
}

int64_t Dataset::sample_offset(uint64_t seed, int64_t step, int64_t sequence, int64_t num_starts) {
  MPT_CHECK(num_starts >= 1, "num_starts = {} must be >= 1", num_starts);
  // Chain the three inputs through SplitMix64 so every (seed, step, sequence) seeds its own stream.
  uint64_t state = mix64(seed + kGolden);
  state = mix64(state ^ (static_cast<uint64_t>(step) + kGolden));
  state = mix64(state ^ (static_cast<uint64_t>(sequence) + kGolden));
  const auto range = static_cast<uint64_t>(num_starts);
  // 2^64 mod range: draws at or above 2^64 - reject would make the low offsets more likely.
  const uint64_t reject = (0 - range) % range;
  for (;;) {
    state += kGolden;
    const uint64_t x = mix64(state);
    if (x <= std::numeric_limits<uint64_t>::max() - reject) return static_cast<int64_t>(x % range);
  }
}

template <typename Tok>
void Dataset::copy_window(const Tok* data, int64_t start, int64_t T, int32_t* tokens,
                          int32_t* targets) const {
  const Tok* src = data + start;
  for (int64_t t = 0; t < T; ++t) {
    tokens[t] = src[t];
    targets[t] = src[t + 1];
  }
}

void Dataset::window(int64_t start, int64_t T, int32_t* tokens, int32_t* targets) const {
  if (is_text_)
    copy_window(bytes_.data(), start, T, tokens, targets);
  else
    copy_window(shard_.data(), start, T, tokens, targets);
}

void Dataset::train_batch(uint64_t seed, int64_t step, int64_t global_batch, int64_t first, int64_t count,
                          int64_t T, int32_t* tokens, int32_t* targets) const {
  check_slice(global_batch, first, count, T, tokens, targets);
  MPT_CHECK(step >= 0, "step = {} must be >= 0", step);
  check_sequence_length(T, false);
  const int64_t num_starts = train_tokens() - T;  // starts 0 .. train_tokens - T - 1
  for (int64_t i = 0; i < count; ++i)
    window(sample_offset(seed, step, first + i, num_starts), T, tokens + i * T, targets + i * T);
}

int64_t Dataset::train_windows(int64_t T) const {
  MPT_CHECK(T >= 1, "sequence length T = {} must be >= 1", T);
  return train_tokens() / (T + 1);
}

int64_t Dataset::epoch_window(uint64_t seed, int64_t sample, int64_t T) const {
  MPT_CHECK(sample >= 0, "sample index {} must be >= 0", sample);
  const int64_t windows = train_windows(T);
  MPT_INPUT_CHECK(windows >= 1,
                  "--data {}: the train split ({} tokens) is shorter than one window of {} tokens", path_,
                  train_tokens(), T + 1);
  const int64_t epoch = sample / windows;
  if (epoch != perm_epoch_ || T != perm_T_ || seed != perm_seed_) {
    // Fisher-Yates with SplitMix64 draws seeded by (seed, epoch); draws rejected as in sample_offset so
    // every permutation is equally likely.
    perm_.resize(static_cast<size_t>(windows));
    for (int64_t w = 0; w < windows; ++w) perm_[static_cast<size_t>(w)] = w;
    uint64_t state = mix64(mix64(seed + kGolden) ^ (static_cast<uint64_t>(epoch) + kGolden));
    for (int64_t i = windows - 1; i > 0; --i) {
      const auto range = static_cast<uint64_t>(i + 1);
      const uint64_t reject = (0 - range) % range;
      uint64_t x = 0;
      do {
        state += kGolden;
        x = mix64(state);
      } while (x > std::numeric_limits<uint64_t>::max() - reject);
      std::swap(perm_[static_cast<size_t>(i)], perm_[static_cast<size_t>(x % range)]);
    }
    perm_epoch_ = epoch;
    perm_T_ = T;
    perm_seed_ = seed;
  }
  return perm_[static_cast<size_t>(sample % windows)];
}

void Dataset::epoch_batch(uint64_t seed, int64_t first_sample, int64_t count, int64_t T, int32_t* tokens,
                          int32_t* targets) const {
  MPT_CHECK(T >= 1 && first_sample >= 0 && count >= 0,
            "epoch_batch: bad arguments (first {}, count {}, T {})", first_sample, count, T);
  MPT_CHECK(count == 0 || (tokens != nullptr && targets != nullptr), "tokens and targets must not be null");
  for (int64_t i = 0; i < count; ++i)
    window(epoch_window(seed, first_sample + i, T) * (T + 1), T, tokens + i * T, targets + i * T);
}

int64_t Dataset::val_windows(int64_t T) const {
  MPT_CHECK(T >= 1, "sequence length T = {} must be >= 1", T);
  return val_tokens() / (T + 1);
}

void Dataset::val_batch(int64_t k, int64_t global_batch, int64_t first, int64_t count, int64_t T,
                        int32_t* tokens, int32_t* targets) const {
  check_slice(global_batch, first, count, T, tokens, targets);
  MPT_CHECK(k >= 0 && k <= (std::numeric_limits<int64_t>::max() - global_batch) / global_batch,
            "validation batch index k = {} is out of range", k);
  check_sequence_length(T, true);
  const int64_t windows = val_windows(T);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t w = (k * global_batch + first + i) % windows;
    window(split_ + w * (T + 1), T, tokens + i * T, targets + i * T);
  }
}

std::string Dataset::decode(const int32_t* tokens, int64_t n) const {
  MPT_CHECK(n >= 0 && (n == 0 || tokens != nullptr), "decode: bad token array (n = {})", n);
  std::string out;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = tokens[i];
    MPT_CHECK(t >= 0 && t < vocab_size(), "decode: token {} at index {} is outside [0, {})", t, i,
              vocab_size());
    if (!is_text_) {
      if (i > 0) out += ' ';
      out += fmt::format("{}", t);
    } else if ((t >= 0x20 && t < 0x7f) || t == '\n' || t == '\t') {
      out += static_cast<char>(t);
    } else {
      out += fmt::format("\\x{:02x}", t);
    }
  }
  return out;
}

std::string Dataset::describe() const {
  std::string source;
  if (is_text_) {
    source = fmt::format("text file '{}'", printable(path_));
  } else {
    constexpr size_t kShown = 3;
    std::string names;
    for (size_t i = 0; i < std::min(files_.size(), kShown); ++i)
      names += (i > 0 ? ", " : "") + printable(fs::path(files_[i]).filename().string());
    if (files_.size() > kShown) names += fmt::format(", ... ({} more)", files_.size() - kShown);
    source = fmt::format("llm.c token shards '{}' ({} file{}: {})", printable(path_), files_.size(),
                         files_.size() == 1 ? "" : "s", names);
  }
  return fmt::format("{}, vocab {}: {} tokens, train {} / val {}", source, vocab_size(), num_tokens(),
                     train_tokens(), val_tokens());
}

}  // namespace mpt
