// Training and validation data: a text file read as bytes (vocab 256), or llm.c token shards (".bin": a
// 256 x int32 header {magic 20240520, version 1, token count, vocabulary size, 0...} then uint16 tokens)
// given as one path or a glob. The vocabulary size is mptrain's addition in the header's unused slot 3
// (launch/prepare_data.py writes it); llm.c leaves it 0, which means GPT-2's 50257. Tokens are held once,
// compactly (uint8 for text, uint16 for shards); batches are materialised as int32 on demand.
//
// Sampling, two orders, neither depending on the number of ranks, so rank r of N reading sequences
// [r*G/N, (r+1)*G/N) of the global batch reads a disjoint part of the same global batch:
// - random: sequence j of optimizer step s starts at an offset drawn from a SplitMix64 hash of (seed, s, j),
//   reduced to the valid range without modulo bias; resuming at step s needs no state beyond s.
// - epoch: the train split is cut into non-overlapping windows of T+1 tokens; the global sample with index i
//   (samples counted from the start of training) is window perm_e(i mod W) of epoch e = i / W, with W the
//   number of windows and perm_e a Fisher-Yates permutation seeded by (seed, e), so every window is read
//   once per epoch and resuming needs only the sample count.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mpt {

/// Training/validation data. Which format: a path ending in ".bin" or a glob (contains * ? [) is token
/// shards (sorted by name in byte order, concatenated in that order); anything else is text.
class Dataset {
 public:
  /// Vocabulary sizes of the two formats.
  static constexpr int64_t kTextVocabSize = 256;
  static constexpr int64_t kShardVocabSize = 50257;
  /// llm.c shard header: 256 int32, of which [0] magic, [1] version, [2] token count, [3] vocabulary size
  /// (1..65536; 0 = kShardVocabSize, as in llm.c's own shards).
  static constexpr int32_t kShardMagic = 20240520;
  static constexpr int kShardVocabSlot = 3;
  static constexpr int32_t kShardVersion = 1;
  static constexpr int64_t kShardHeaderBytes = 256 * 4;

  /// Loads and validates; the last `val_fraction` (in [0, 1)) of the tokens is the validation split (the
  /// split point is floor((1 - val_fraction) * n)). Throws mpt::InputError with one line naming the path and
  /// what is wrong for: a missing file, a directory, no read permission, an empty file, a glob matching
  /// nothing, wrong magic, wrong version, a file size disagreeing with the header's token count, a header
  /// vocabulary size outside [0, 65536] or differing between shards, a token >= the vocabulary size in a
  /// shard (file, token index in that file, value), val_fraction outside [0, 1).
  static Dataset load(const std::string& path_or_glob, double val_fraction);

  /// 256 for text; for shards the size in their headers (50257 where it is 0).
  int64_t vocab_size() const { return is_text_ ? kTextVocabSize : shard_vocab_; }
  bool is_text() const { return is_text_; }
  /// Token counts of the two splits; train is the first part of the data, val the rest.
  int64_t train_tokens() const { return split_; }
  int64_t val_tokens() const { return num_tokens() - split_; }
  int64_t num_tokens() const;
  /// The path or glob given to load().
  const std::string& path() const { return path_; }
  /// The files read, in concatenation order (one for text).
  const std::vector<std::string>& files() const { return files_; }
  /// Token `index` of the whole data (train then val), 0 <= index < num_tokens(). For tests and tools.
  int32_t token(int64_t index) const;

  /// FNV-1a 64-bit hash over the vocabulary size (8 bytes), every token (1 byte for text, 2 bytes for
  /// shards, little-endian) and the split point (8 bytes): ranks compare it at start-up. Computed by load().
  uint64_t hash() const { return hash_; }

  /// Throws mpt::InputError naming the path when the train split has fewer than T+1 tokens, or (when
  /// `need_val`) the validation split has fewer than T+1 tokens: "... shorter than one sequence ...".
  void check_sequence_length(int64_t T, bool need_val) const;

  /// Sequences [first, first+count) of the global batch of optimizer step `step` (global batch =
  /// `global_batch` sequences, 0 <= first, first+count <= global_batch, step >= 0, T >= 1).
  /// tokens[i*T + t] and targets[i*T + t] (each count*T int32) = a window of T+1 consecutive train tokens,
  /// targets shifted by one. Sequence j starts at an offset in [0, train_tokens - T - 1] that depends only on
  /// (seed, step, j). Throws mpt::Error for bad arguments, InputError when the train split is too short.
  void train_batch(uint64_t seed, int64_t step, int64_t global_batch, int64_t first, int64_t count, int64_t T,
                   int32_t* tokens, int32_t* targets) const;

  /// Validation batch k >= 0: the global batch of G sequences is windows k*G + j (j < G) of T+1 consecutive
  /// tokens of the validation split, windows laid end to end from its start (window w starts at
  /// train_tokens + w*(T+1)), the window index taken modulo the number of whole windows (wrap-around).
  /// Writes sequences [first, first+count) as in train_batch. Throws as train_batch (validation split).
  void val_batch(int64_t k, int64_t global_batch, int64_t first, int64_t count, int64_t T, int32_t* tokens,
                 int32_t* targets) const;

  /// The epoch order: sequences [first, first+count) of the global samples indexed from `first_sample`
  /// (global sample i = window epoch_window(seed, i, T)), written as in train_batch. Throws mpt::Error for
  /// bad arguments, InputError when the train split is shorter than one window.
  void epoch_batch(uint64_t seed, int64_t first_sample, int64_t count, int64_t T, int32_t* tokens,
                   int32_t* targets) const;
  /// Number of whole, non-overlapping train windows of T+1 tokens (train_tokens / (T+1)): one epoch.
  int64_t train_windows(int64_t T) const;
  /// The window (its index; it starts at token index x (T+1)) of global sample `sample` in the epoch order.
  /// Permutations are built once per epoch and cached (the last one used).
  int64_t epoch_window(uint64_t seed, int64_t sample, int64_t T) const;

  /// Number of whole validation windows of T+1 tokens (val_tokens / (T+1)).
  int64_t val_windows(int64_t T) const;

  /// Offset of sequence `sequence` of step `step` in [0, num_starts): SplitMix64 of (seed, step, sequence),
  /// rejection-sampled so every offset is equally likely. num_starts >= 1.
  static int64_t sample_offset(uint64_t seed, int64_t step, int64_t sequence, int64_t num_starts);

  /// Decodes tokens for printing a sample. Text: the bytes, with bytes outside printable ASCII written as
  /// \xNN (lower-case hex) except \n and \t. Shards (no tokenizer): token ids separated by single spaces.
  /// Throws mpt::Error naming the index for a token outside [0, vocab_size()).
  std::string decode(const int32_t* tokens, int64_t n) const;

  /// One line: format, path (and for shards the number of files and the first names), token counts of the
  /// splits and the vocabulary size.
  std::string describe() const;

 private:
  Dataset() = default;
  template <typename Tok>
  void copy_window(const Tok* data, int64_t start, int64_t T, int32_t* tokens, int32_t* targets) const;
  void window(int64_t start, int64_t T, int32_t* tokens, int32_t* targets) const;

  std::string path_;
  std::vector<std::string> files_;
  bool is_text_ = true;
  std::vector<uint8_t> bytes_;   // text tokens
  std::vector<uint16_t> shard_;  // shard tokens
  int64_t split_ = 0;            // first validation token index
  uint64_t hash_ = 0;
  int64_t shard_vocab_ = kShardVocabSize;
  // epoch_window's cache: the permutation of epoch `perm_epoch_` for windows of perm_T_ + 1 tokens.
  mutable std::vector<int64_t> perm_;
  mutable int64_t perm_epoch_ = -1, perm_T_ = -1;
  mutable uint64_t perm_seed_ = 0;
};

}  // namespace mpt
