// The tokenizers: GPT-2's byte-to-unicode alphabet, the byte-level tokenizer.json read back as the identity,
// tokenizer.json with merged tokens and special tokens, llm.c .bin files, and every error naming the file.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/error.hpp"
#include "mptrain/tokenizer.hpp"

namespace mpt {
namespace {

class Tokenizers : public ::testing::Test {
 protected:
  std::filesystem::path dir = std::filesystem::temp_directory_path() /
                              ("mptrain_tokenizer_" + std::to_string(getpid()) + "_" +
                               ::testing::UnitTest::GetInstance()->current_test_info()->name());
  void SetUp() override { std::filesystem::create_directories(dir); }
  void TearDown() override { std::filesystem::remove_all(dir); }
  std::string write(const std::string& name, const std::string& content) const {
    const std::string p = (dir / name).string();
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }
};

void expect_input_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "no error";
  } catch (const InputError& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

TEST(ByteToUnicode, IsGpt2sAlphabet) {
  // Values from the released GPT-2 encoder: space is 'Ġ' (U+0120), newline 'Ċ' (U+010A), byte 0 'Ā' (U+0100),
  // 0x7F U+0121, 0xAD U+0143; printable Latin-1 bytes stand for themselves.
  EXPECT_EQ(byte_to_unicode(' '), 0x120u);
  EXPECT_EQ(byte_to_unicode('\n'), 0x10Au);
  EXPECT_EQ(byte_to_unicode(0), 0x100u);
  EXPECT_EQ(byte_to_unicode(0x7F), 0x121u);
  EXPECT_EQ(byte_to_unicode(0xAD), 0x143u);
  EXPECT_EQ(byte_to_unicode('A'), static_cast<uint32_t>('A'));
  EXPECT_EQ(byte_to_unicode(0xE9), 0xE9u);
  std::set<uint32_t> seen;
  for (int b = 0; b < 256; ++b) seen.insert(byte_to_unicode(static_cast<uint8_t>(b)));
  EXPECT_EQ(seen.size(), 256u);
  EXPECT_EQ(*seen.rbegin(), 0x143u);  // 256 + 68 - 1
}

TEST_F(Tokenizers, ByteLevelJsonReadsBackAsTheIdentity) {
  const Tokenizer t = Tokenizer::load(write("bytes.json", byte_level_tokenizer_json()));
  ASSERT_EQ(t.vocab_size(), 256);
  for (int b = 0; b < 256; ++b) {
    EXPECT_EQ(t.token_bytes(b), std::string(1, static_cast<char>(b))) << b;
    EXPECT_EQ(t.text_bytes(b), 1);
  }
  const std::vector<int32_t> ids = {'H', 'i', 0xC3, 0xA9, '\n', 0};
  EXPECT_EQ(t.decode(ids.data(), 6), std::string("Hi\xC3\xA9\n\0", 6));
  EXPECT_EQ(Tokenizer::bytes().decode(ids.data(), 6), t.decode(ids.data(), 6));
}

TEST_F(Tokenizers, MergedAndSpecialTokens) {
  // "Ġthe" = " the", "Ċ" = "\n"; <|endoftext|> is special: decoded as its content, 0 text bytes.
  const std::string json = R"({"model": {"type": "BPE", "vocab": {"a": 0, "Ġthe": 1, "Ċ": 2, "Ã©": 3}},
    "decoder": {"type": "ByteLevel"},
    "added_tokens": [{"id": 4, "content": "<|endoftext|>", "special": true}]})";
  const Tokenizer t = Tokenizer::load(write("t.json", json));
  ASSERT_EQ(t.vocab_size(), 5);
  const std::vector<int32_t> ids = {1, 0, 3, 2, 4};
  EXPECT_EQ(t.decode(ids.data(), 5), " thea\xC3\xA9\n<|endoftext|>");
  EXPECT_EQ(t.text_bytes(1), 4);
  EXPECT_EQ(t.text_bytes(3), 2);
  EXPECT_EQ(t.text_bytes(4), 0);
  expect_input_error([&] { t.token_bytes(5); }, {"t.json", "token 5", "vocabulary of 5"});
}

TEST_F(Tokenizers, LlmcBin) {
  std::string blob(1024, '\0');
  const uint32_t header[3] = {20240328u, 2u, 3u};
  std::memcpy(blob.data(), header, sizeof(header));
  for (const std::string tok : {"a", " b", "\xff"}) blob += static_cast<char>(tok.size()) + tok;
  const Tokenizer t = Tokenizer::load(write("t.bin", blob));
  const std::vector<int32_t> ids = {1, 0, 2};
  EXPECT_EQ(t.decode(ids.data(), 3), " ba\xff");
  expect_input_error([&] { Tokenizer::load(write("cut.bin", blob.substr(0, blob.size() - 1))); },
                     {"cut.bin", "truncated after 2 tokens"});
}

TEST_F(Tokenizers, ErrorsNameTheFile) {
  expect_input_error([&] { Tokenizer::load((dir / "none.json").string()); }, {"none.json", "cannot open"});
  expect_input_error([&] { Tokenizer::load(write("x.json", "{ not json")); },
                     {"x.json", "not a JSON object"});
  expect_input_error(
      [&] {
        Tokenizer::load(
            write("wp.json", R"({"model": {"vocab": {"a": 0}}, "decoder": {"type": "WordPiece"}})"));
      },
      {"wp.json", "not ByteLevel"});
  expect_input_error(
      [&] {
        Tokenizer::load(
            write("gap.json", R"({"model": {"vocab": {"a": 0, "b": 2}}, "decoder": {"type": "ByteLevel"}})"));
      },
      {"gap.json", "no token has id 1"});
  expect_input_error(
      [&] {
        Tokenizer::load(
            write("cjk.json", R"({"model": {"vocab": {"中": 0}}, "decoder": {"type": "ByteLevel"}})"));
      },
      {"cjk.json", "U+4E2D", "byte-level alphabet"});
  expect_input_error([&] { Tokenizer::load(write("magic.bin", std::string(1100, '\1'))); },
                     {"magic.bin", "wrong magic"});
}

}  // namespace
}  // namespace mpt
