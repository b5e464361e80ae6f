// Tokenizers (include/mptrain/tokenizer.hpp): byte-level identity, tokenizer.json with a ByteLevel decoder,
// llm.c tokenizer .bin.
#include "mptrain/tokenizer.hpp"

#include <array>
#include <cstring>
#include <fstream>
#include <iterator>

#include <nlohmann/json.hpp>

#include "mptrain/error.hpp"

namespace mpt {

namespace {

bool stands_for_itself(unsigned b) {
  return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

/// Code point -> byte for the 256 code points of the byte-level alphabet; -1 elsewhere.
const std::array<int, 324>& unicode_to_byte() {
  static const std::array<int, 324> table = [] {
    std::array<int, 324> t{};
    t.fill(-1);
    for (unsigned b = 0; b < 256; ++b) t[byte_to_unicode(static_cast<uint8_t>(b))] = static_cast<int>(b);
    return t;
  }();
  return table;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

/// The bytes a byte-level vocabulary string stands for (its UTF-8 code points mapped back through
/// byte_to_unicode); throws naming `path` and the token when a code point is outside the alphabet.
std::string byte_level_bytes(const std::string& token, const std::string& path) {
  std::string out;
  for (size_t i = 0; i < token.size();) {
    const auto c = static_cast<unsigned char>(token[i]);
    uint32_t cp = c;
    size_t len = 1;
    if (c >= 0xF0)
      len = 4, cp = c & 0x07;
    else if (c >= 0xE0)
      len = 3, cp = c & 0x0F;
    else if (c >= 0xC0)
      len = 2, cp = c & 0x1F;
    MPT_INPUT_CHECK(i + len <= token.size(), "tokenizer {}: token '{}' is not valid UTF-8", path, token);
    for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(token[i + k]) & 0x3F);
    MPT_INPUT_CHECK(
        cp < unicode_to_byte().size() && unicode_to_byte()[cp] >= 0,
        "tokenizer {}: token '{}' holds U+{:04X}, outside the byte-level alphabet (only byte-level "
        "BPE tokenizers are supported)",
        path, token, cp);
    out += static_cast<char>(unicode_to_byte()[cp]);
    i += len;
  }
  return out;
}

std::string read_whole(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MPT_INPUT_CHECK(static_cast<bool>(in), "tokenizer {}: cannot open", path);
  std::string text((std::istreambuf_iterator<char>(in)), {});
  MPT_INPUT_CHECK(!in.bad(), "tokenizer {}: read error", path);
  return text;
}

/// Sets token `id` (growing the tables), refusing a repeated id.
void put_token(std::vector<std::string>& bytes, std::vector<bool>& special, std::vector<bool>& seen,
               int64_t id, std::string token, bool is_special, const std::string& path) {
  MPT_INPUT_CHECK(id >= 0 && id < (int64_t{1} << 24), "tokenizer {}: id {} out of range", path, id);
  const auto i = static_cast<size_t>(id);
  if (i >= bytes.size()) {
    bytes.resize(i + 1);
    special.resize(i + 1);
    seen.resize(i + 1);
  }
  MPT_INPUT_CHECK(!seen[i] || is_special, "tokenizer {}: id {} is given twice", path, id);
  bytes[i] = std::move(token);
  special[i] = is_special;
  seen[i] = true;
}

}  // namespace

uint32_t byte_to_unicode(uint8_t b) {
  if (stands_for_itself(b)) return b;
  uint32_t n = 0;
  for (unsigned k = 0; k < b; ++k) n += stands_for_itself(k) ? 0 : 1;
  return 256 + n;
}

Tokenizer Tokenizer::bytes() {
  Tokenizer t;
  for (int b = 0; b < 256; ++b) t.token_bytes_.emplace_back(1, static_cast<char>(b));
  t.special_.assign(256, false);
  return t;
}

Tokenizer Tokenizer::load(const std::string& path) {
  const std::string text = read_whole(path);
  Tokenizer t;
  t.path_ = path;
  const size_t first = text.find_first_not_of(" \t\r\n");
  if (first == std::string::npos || text[first] != '{') {
    // llm.c tokenizer .bin
    MPT_INPUT_CHECK(text.size() >= 1024, "tokenizer {}: truncated header", path);
    uint32_t header[256];
    std::memcpy(header, text.data(), sizeof(header));
    MPT_INPUT_CHECK(header[0] == 20240328u, "tokenizer {}: wrong magic {} (expected 20240328 or a JSON file)",
                    path, header[0]);
    MPT_INPUT_CHECK(header[1] == 1u || header[1] == 2u, "tokenizer {}: unsupported version {}", path,
                    header[1]);
    size_t at = 1024;
    for (uint32_t i = 0; i < header[2]; ++i) {
      MPT_INPUT_CHECK(at < text.size(), "tokenizer {}: truncated after {} tokens", path, i);
      const auto length = static_cast<unsigned char>(text[at]);
      MPT_INPUT_CHECK(at + 1 + length <= text.size(), "tokenizer {}: truncated after {} tokens", path, i);
      t.token_bytes_.push_back(text.substr(at + 1, length));
      at += 1 + length;
    }
    t.special_.assign(t.token_bytes_.size(), false);
    if (header[2] == 50257u) t.special_[50256] = true;  // GPT-2's <|endoftext|>
    return t;
  }
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  MPT_INPUT_CHECK(!j.is_discarded() && j.is_object(), "tokenizer {}: not a JSON object", path);
  const auto decoder = j.find("decoder");
  MPT_INPUT_CHECK(decoder != j.end() && decoder->is_object() && decoder->value("type", "") == "ByteLevel",
                  "tokenizer {}: the decoder is not ByteLevel (only byte-level BPE tokenizers are supported)",
                  path);
  const auto model = j.find("model");
  MPT_INPUT_CHECK(
      model != j.end() && model->is_object() && model->contains("vocab") && (*model)["vocab"].is_object(),
      "tokenizer {}: no model.vocab object", path);
  std::vector<bool> seen;
  for (const auto& [token, id] : (*model)["vocab"].items()) {
    MPT_INPUT_CHECK(id.is_number_integer(), "tokenizer {}: the id of '{}' is not an integer", path, token);
    put_token(t.token_bytes_, t.special_, seen, id.get<int64_t>(), byte_level_bytes(token, path), false,
              path);
  }
  if (const auto added = j.find("added_tokens"); added != j.end() && added->is_array())
    for (const auto& a : *added) {
      MPT_INPUT_CHECK(a.is_object() && a.contains("id") && a["id"].is_number_integer() &&
                          a.contains("content") && a["content"].is_string(),
                      "tokenizer {}: an added_tokens entry lacks an integer id or a content string", path);
      put_token(t.token_bytes_, t.special_, seen, a["id"].get<int64_t>(), a["content"].get<std::string>(),
                a.value("special", false), path);
    }
  for (size_t i = 0; i < seen.size(); ++i)
    MPT_INPUT_CHECK(seen[i], "tokenizer {}: no token has id {} (ids must be 0..{})", path, i,
                    seen.size() - 1);
  MPT_INPUT_CHECK(!seen.empty(), "tokenizer {}: the vocabulary is empty", path);
  return t;
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  MPT_INPUT_CHECK(id >= 0 && id < vocab_size(), "tokenizer {}: token {} outside its vocabulary of {}",
                  path_.empty() ? "bytes" : path_, id, vocab_size());
  return token_bytes_[static_cast<size_t>(id)];
}

int64_t Tokenizer::text_bytes(int32_t id) const {
  const std::string& bytes = token_bytes(id);
  return special_[static_cast<size_t>(id)] ? 0 : static_cast<int64_t>(bytes.size());
}

std::string Tokenizer::decode(const int32_t* tokens, int64_t n) const {
  std::string out;
  for (int64_t i = 0; i < n; ++i) out += token_bytes(tokens[i]);
  return out;
}

std::string byte_level_tokenizer_json() {
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  for (unsigned b = 0; b < 256; ++b) {
    std::string s;
    append_utf8(s, byte_to_unicode(static_cast<uint8_t>(b)));
    vocab[s] = b;
  }
  const nlohmann::ordered_json byte_level = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", true}};
  const nlohmann::ordered_json j = {{"version", "1.0"},
                                    {"truncation", nullptr},
                                    {"padding", nullptr},
                                    {"added_tokens", nlohmann::ordered_json::array()},
                                    {"normalizer", nullptr},
                                    {"pre_tokenizer", byte_level},
                                    {"post_processor", nullptr},
                                    {"decoder", byte_level},
                                    {"model",
                                     {{"type", "BPE"},
                                      {"dropout", nullptr},
                                      {"unk_token", nullptr},
                                      {"continuing_subword_prefix", nullptr},
                                      {"end_of_word_suffix", nullptr},
                                      {"fuse_unk", false},
                                      {"byte_fallback", false},
                                      {"vocab", vocab},
                                      {"merges", nlohmann::ordered_json::array()}}}};
  return j.dump(2) + "\n";
}

}  // namespace mpt
