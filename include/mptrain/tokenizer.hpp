// Tokenizers for printing samples and measuring loss per byte: the byte-level identity (id = byte), a
// Hugging Face tokenizer.json with a byte-level decoder (GPT-2's, or one trained by launch/prepare_data.py
// with the `tokenizers` package), or an llm.c tokenizer .bin. Each token id maps to the bytes it stands for.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mpt {

class Tokenizer {
 public:
  /// The byte-level identity: 256 tokens, token i is the byte i.
  static Tokenizer bytes();

  /// Reads `path`: a tokenizer.json (a JSON object: "model" with a "vocab" map of token string -> id, a
  /// "decoder" of type "ByteLevel", optional "added_tokens" [{id, content, special}]) or an llm.c tokenizer
  /// .bin (256 x uint32 header {magic 20240328, version 1 or 2, vocab size, ...}, then per token a uint8
  /// length and its bytes). Throws mpt::InputError with one line naming `path` for a missing or unreadable
  /// file, malformed JSON, a decoder other than ByteLevel, a vocabulary string that is not in GPT-2's
  /// byte-to-unicode alphabet, ids that leave a gap or repeat, a wrong magic or a truncated .bin.
  static Tokenizer load(const std::string& path);

  /// Number of ids (one more than the largest id).
  int64_t vocab_size() const { return static_cast<int64_t>(token_bytes_.size()); }
  /// The bytes of token `id` (a special token's content); throws mpt::InputError for an id outside
  /// [0, vocab_size()).
  const std::string& token_bytes(int32_t id) const;
  /// Bytes of text token `id` stands for: its byte length, 0 for a special token (<|endoftext|> is no
  /// text). The denominator of the loss in nats per byte.
  int64_t text_bytes(int32_t id) const;
  /// The concatenated bytes of `n` tokens; throws as token_bytes().
  std::string decode(const int32_t* tokens, int64_t n) const;
  /// The file read ("" for bytes()).
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::vector<std::string> token_bytes_;
  std::vector<bool> special_;
};

/// GPT-2's byte-to-unicode alphabet (Radford et al. 2019, the byte-level BPE of the released encoder): the
/// code point that stands for byte `b` in byte-level vocabulary strings. Printable Latin-1 bytes ('!'..'~',
/// 0xA1..0xAC, 0xAE..0xFF) stand for themselves; the other 68 take 256, 257, ... in byte order.
uint32_t byte_to_unicode(uint8_t b);

/// The tokenizer.json of a byte-level model (what `mptrain export` writes beside a 256-token model): a BPE
/// with 256 tokens and no merges, token i the byte-level string of byte i, ByteLevel pre-tokenizer (no
/// prefix space) and decoder, so `tokenizers`/`transformers` encode any text to its bytes and back.
std::string byte_level_tokenizer_json();

}  // namespace mpt
