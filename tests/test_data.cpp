// Dataset: text and llm.c shard loading, one clear one-line InputError naming the path for every kind of bad
// input, the rank-independent sampling of train batches, validation windows, and the start-up hash.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/data.hpp"
#include "mptrain/error.hpp"

namespace mpt {
namespace {

struct ShardHeader {
  int32_t magic = Dataset::kShardMagic;
  int32_t version = Dataset::kShardVersion;
  std::optional<int64_t> count;  // default: the number of tokens written
  int32_t vocab = 0;             // header slot 3; 0: GPT-2's 50257
};
ShardHeader with_vocab(int32_t vocab) {
  ShardHeader h;
  h.vocab = vocab;
  return h;
}
ShardHeader with_magic(int32_t magic) {
  ShardHeader h;
  h.magic = magic;
  return h;
}
ShardHeader with_version(int32_t version) {
  ShardHeader h;
  h.version = version;
  return h;
}
ShardHeader with_count(int64_t count) {
  ShardHeader h;
  h.count = count;
  return h;
}

class Data : public ::testing::Test {
 protected:
  std::filesystem::path dir = std::filesystem::temp_directory_path() /
                              ("mptrain_data_" + std::to_string(getpid()) + "_" +
                               ::testing::UnitTest::GetInstance()->current_test_info()->name());
  void SetUp() override { std::filesystem::create_directories(dir); }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::permissions(dir, std::filesystem::perms::owner_all, std::filesystem::perm_options::add,
                                 ec);
    std::filesystem::remove_all(dir);
  }
  std::string path(const std::string& name) const { return (dir / name).string(); }

  std::string write_text(const std::string& name, const std::string& content) const {
    const std::string p = path(name);
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }
  std::string write_shard(const std::string& name, const std::vector<uint16_t>& tokens, ShardHeader h = {},
                          int extra_bytes = 0) const {
    std::vector<int32_t> header(256, 0);
    header[0] = h.magic;
    header[1] = h.version;
    header[2] = static_cast<int32_t>(h.count.value_or(static_cast<int64_t>(tokens.size())));
    header[Dataset::kShardVocabSlot] = h.vocab;
    const std::string p = path(name);
    std::ofstream out(p, std::ios::binary);
    out.write(reinterpret_cast<const char*>(header.data()), 1024);
    out.write(reinterpret_cast<const char*>(tokens.data()), static_cast<std::streamsize>(2 * tokens.size()));
    for (int i = 0; i < extra_bytes; ++i) out.put('\0');
    return p;
  }
  /// A shard whose token i is i, so a window's first token is its offset.
  std::string write_positions(const std::string& name, int n) const {
    std::vector<uint16_t> tokens(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) tokens[static_cast<size_t>(i)] = static_cast<uint16_t>(i);
    return write_shard(name, tokens);
  }
};

/// Runs `f`, expects an InputError whose message is one line and contains every needle.
void expect_input_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "no InputError thrown; expected one containing '" << needles.front() << "'";
  } catch (const InputError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "not one line: " << msg;
    for (const std::string& needle : needles) EXPECT_NE(msg.find(needle), std::string::npos) << msg;
  }
}

struct Batch {
  std::vector<int32_t> tokens, targets;
  bool operator==(const Batch&) const = default;
};

Batch train(const Dataset& d, uint64_t seed, int64_t step, int64_t G, int64_t first, int64_t count,
            int64_t T) {
  Batch b{std::vector<int32_t>(static_cast<size_t>(count * T)),
          std::vector<int32_t>(static_cast<size_t>(count * T))};
  d.train_batch(seed, step, G, first, count, T, b.tokens.data(), b.targets.data());
  return b;
}

Batch val(const Dataset& d, int64_t k, int64_t G, int64_t first, int64_t count, int64_t T) {
  Batch b{std::vector<int32_t>(static_cast<size_t>(count * T)),
          std::vector<int32_t>(static_cast<size_t>(count * T))};
  d.val_batch(k, G, first, count, T, b.tokens.data(), b.targets.data());
  return b;
}

// ---------------------------------------------------------------------------------------------- formats

TEST_F(Data, TextIsBytesWithVocab256AndFloorSplit) {
  std::string content;
  for (int i = 0; i < 1000; ++i) content += static_cast<char>((i * 7 + 3) % 256);
  const std::string p = write_text("corpus.txt", content);
  const Dataset d = Dataset::load(p, 0.05);
  EXPECT_TRUE(d.is_text());
  EXPECT_EQ(d.vocab_size(), 256);
  EXPECT_EQ(d.train_tokens(), 950);
  EXPECT_EQ(d.val_tokens(), 50);
  ASSERT_EQ(d.num_tokens(), 1000);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(d.token(i), (i * 7 + 3) % 256) << "index " << i;
  ASSERT_EQ(d.files(), std::vector<std::string>{p});

  // floor((1 - 0.33) * 10) = 6, not rounded to 7.
  const Dataset small = Dataset::load(write_text("ten.txt", "0123456789"), 0.33);
  EXPECT_EQ(small.train_tokens(), 6);
  EXPECT_EQ(small.val_tokens(), 4);
  const Dataset all_train = Dataset::load(p, 0.0);
  EXPECT_EQ(all_train.train_tokens(), 1000);
  EXPECT_EQ(all_train.val_tokens(), 0);
}

TEST_F(Data, DecodeTextEscapesNonPrintableBytes) {
  const Dataset d = Dataset::load(write_text("t.txt", "x"), 0.0);
  const std::vector<int32_t> tokens = {'H', 'i', ' ', '~', '\n', '\t', 0, '\r', 0x7f, 0x80, 0xff, '\\'};
  EXPECT_EQ(d.decode(tokens.data(), static_cast<int64_t>(tokens.size())),
            "Hi ~\n\t\\x00\\x0d\\x7f\\x80\\xff\\");
  EXPECT_EQ(d.decode(tokens.data(), 0), "");
  const std::vector<int32_t> bad = {'a', 256};
  EXPECT_THROW(d.decode(bad.data(), 2), Error);
}

TEST_F(Data, OneShardFile) {
  const std::vector<uint16_t> tokens = {50256, 0, 1, 2, 40000, 7, 8, 9, 10, 11};
  const std::string p = write_shard("train_000.bin", tokens);
  const Dataset d = Dataset::load(p, 0.2);
  EXPECT_FALSE(d.is_text());
  EXPECT_EQ(d.vocab_size(), 50257);
  EXPECT_EQ(d.train_tokens(), 8);
  EXPECT_EQ(d.val_tokens(), 2);
  for (size_t i = 0; i < tokens.size(); ++i) EXPECT_EQ(d.token(static_cast<int64_t>(i)), tokens[i]);
  const std::vector<int32_t> ids = {50256, 0, 13};
  EXPECT_EQ(d.decode(ids.data(), 3), "50256 0 13");
  const std::vector<int32_t> bad = {50257};
  EXPECT_THROW(d.decode(bad.data(), 1), Error);
}

TEST_F(Data, GlobConcatenatesShardsInNameOrder) {
  // Written in reverse order so directory order is unlikely to match name order.
  write_shard("shard_10.bin", {300, 301, 302});
  write_shard("shard_02.bin", {200, 201});
  write_shard("shard_01.bin", {100});
  write_text("shard_01.txt", "not a shard, not matched");
  const Dataset d = Dataset::load(path("shard_*.bin"), 0.0);
  EXPECT_FALSE(d.is_text());
  ASSERT_EQ(d.files(),
            (std::vector<std::string>{path("shard_01.bin"), path("shard_02.bin"), path("shard_10.bin")}));
  const std::vector<int32_t> expected = {100, 200, 201, 300, 301, 302};
  ASSERT_EQ(d.num_tokens(), 6);
  for (int64_t i = 0; i < 6; ++i) EXPECT_EQ(d.token(i), expected[static_cast<size_t>(i)]) << i;

  const Dataset two = Dataset::load(path("shard_0?.bin"), 0.0);
  EXPECT_EQ(two.num_tokens(), 3);
  const Dataset bracket = Dataset::load(path("shard_[1]0.bin"), 0.0);
  EXPECT_EQ(bracket.num_tokens(), 3);
  EXPECT_NE(d.describe().find("3 files"), std::string::npos) << d.describe();
}

TEST_F(Data, FormatFollowsThePathName) {
  // A shard's bytes under a non-.bin name are text; text under a .bin name is checked as a shard.
  const std::string shard = write_shard("tokens.bin", {1, 2, 3});
  std::filesystem::copy_file(shard, path("tokens.dat"));
  const Dataset as_text = Dataset::load(path("tokens.dat"), 0.0);
  EXPECT_TRUE(as_text.is_text());
  EXPECT_EQ(as_text.num_tokens(), 1024 + 6);
  const std::string text = write_text("words.bin", std::string(2000, 'a'));
  expect_input_error([&] { Dataset::load(text, 0.0); }, {text, "wrong magic"});
}

TEST_F(Data, DescribeIsOneLineWithCounts) {
  const std::string p = write_text("d.txt", std::string(100, 'z'));
  const std::string s = Dataset::load(p, 0.1).describe();
  EXPECT_EQ(s.find('\n'), std::string::npos);
  for (const std::string& needle :
       {p, std::string("text"), std::string("256"), std::string("train 90"), std::string("val 10")})
    EXPECT_NE(s.find(needle), std::string::npos) << s;
  write_shard("a.bin", {1, 2, 3, 4});
  const std::string sh = Dataset::load(path("*.bin"), 0.25).describe();
  for (const std::string& needle : {std::string("shards"), std::string("a.bin"), std::string("50257"),
                                    std::string("train 3"), std::string("val 1")})
    EXPECT_NE(sh.find(needle), std::string::npos) << sh;
}

// ---------------------------------------------------------------------------------------------- errors

TEST_F(Data, MissingFile) {
  const std::string text = path("nope.txt");
  expect_input_error([&] { Dataset::load(text, 0.1); }, {text, "no such file"});
  const std::string bin = path("nope.bin");
  expect_input_error([&] { Dataset::load(bin, 0.1); }, {bin, "no such file"});
}

TEST_F(Data, Directory) {
  std::filesystem::create_directories(dir / "sub.bin");
  expect_input_error([&] { Dataset::load(dir.string(), 0.1); }, {dir.string(), "directory"});
  expect_input_error([&] { Dataset::load(path("sub.bin"), 0.1); }, {path("sub.bin"), "directory"});
  expect_input_error([&] { Dataset::load(path("s*"), 0.1); }, {path("sub.bin"), "directory"});
}

TEST_F(Data, NoReadPermission) {
  if (geteuid() == 0) GTEST_SKIP() << "root reads everything";
  const std::string text = write_text("secret.txt", "abc");
  const std::string bin = write_shard("secret.bin", {1, 2});
  ASSERT_EQ(chmod(text.c_str(), 0), 0);
  ASSERT_EQ(chmod(bin.c_str(), 0), 0);
  expect_input_error([&] { Dataset::load(text, 0.1); }, {text, "Permission denied"});
  expect_input_error([&] { Dataset::load(bin, 0.1); }, {bin, "Permission denied"});
}

TEST_F(Data, EmptyFile) {
  const std::string text = write_text("empty.txt", "");
  expect_input_error([&] { Dataset::load(text, 0.1); }, {text, "empty"});
  const std::string bin = write_text("empty.bin", "");
  expect_input_error([&] { Dataset::load(bin, 0.1); }, {bin, "empty"});
}

TEST_F(Data, GlobMatchingNothing) {
  const std::string pattern = path("fineweb_train_*.bin");
  expect_input_error([&] { Dataset::load(pattern, 0.1); }, {pattern, "matches no files"});
}

TEST_F(Data, WrongMagic) {
  const std::string p = write_shard("m.bin", {1, 2, 3}, with_magic(20240801));
  expect_input_error([&] { Dataset::load(p, 0.1); }, {p, "wrong magic 20240801", "20240520"});
}

TEST_F(Data, WrongVersion) {
  const std::string p = write_shard("v.bin", {1, 2, 3}, with_version(2));
  expect_input_error([&] { Dataset::load(p, 0.1); }, {p, "wrong version 2"});
}

TEST_F(Data, SizeDisagreesWithTokenCount) {
  const std::string longer = write_shard("long.bin", {1, 2, 3}, {}, 1);
  expect_input_error([&] { Dataset::load(longer, 0.1); }, {longer, "1031 bytes", "token count 3", "1030"});
  const std::string shorter = write_shard("short.bin", {1, 2, 3}, with_count(4));
  expect_input_error([&] { Dataset::load(shorter, 0.1); }, {shorter, "token count 4"});
  const std::string negative = write_shard("neg.bin", {1, 2, 3}, with_count(-5));
  expect_input_error([&] { Dataset::load(negative, 0.1); }, {negative, "token count -5"});
  const std::string stub = write_text("stub.bin", std::string(100, 'x'));
  expect_input_error([&] { Dataset::load(stub, 0.1); }, {stub, "too short", "header"});
}

TEST_F(Data, TokenOutsideVocabularyNamesFileIndexAndValue) {
  write_shard("a_0.bin", {1, 2, 3});
  const std::string bad = write_shard("a_1.bin", {4, 5, 50256, 50257, 65535});
  expect_input_error([&] { Dataset::load(path("a_*.bin"), 0.1); }, {bad, "token 50257", "index 3"});
}

TEST_F(Data, BadShardLaterInGlobIsNamed) {
  write_shard("b_0.bin", {1, 2, 3});
  const std::string bad = write_shard("b_1.bin", {1, 2, 3}, with_version(7));
  expect_input_error([&] { Dataset::load(path("b_*.bin"), 0.1); }, {bad, "wrong version 7"});
}

TEST_F(Data, ValFractionOutsideUnitInterval) {
  const std::string p = write_text("t.txt", "abcdef");
  for (const double f : {-0.1, 1.0, 1.5, std::numeric_limits<double>::quiet_NaN()})
    expect_input_error([&] { Dataset::load(p, f); }, {p, "val_fraction"});
}

TEST_F(Data, CheckSequenceLength) {
  const std::string p = write_text("t.txt", std::string(100, 'q'));
  const Dataset d = Dataset::load(p, 0.1);  // train 90, val 10
  EXPECT_NO_THROW(d.check_sequence_length(89, false));
  expect_input_error([&] { d.check_sequence_length(90, false); },
                     {p, "training split", "shorter than one sequence"});
  EXPECT_NO_THROW(d.check_sequence_length(9, true));
  expect_input_error([&] { d.check_sequence_length(10, true); },
                     {p, "validation split", "shorter than one sequence"});
  const Dataset no_val = Dataset::load(p, 0.0);
  EXPECT_NO_THROW(no_val.check_sequence_length(8, false));
  expect_input_error([&] { no_val.check_sequence_length(8, true); }, {p, "validation split (0 tokens)"});
  // The batch functions refuse a split that is too short in the same words.
  std::vector<int32_t> a(100), b(100);
  expect_input_error([&] { d.train_batch(1, 0, 1, 0, 1, 90, a.data(), b.data()); },
                     {"shorter than one sequence"});
  expect_input_error([&] { d.val_batch(0, 1, 0, 1, 10, a.data(), b.data()); }, {"shorter than one sequence"});
}

// ---------------------------------------------------------------------------------------------- batches

TEST_F(Data, TrainBatchIsShiftedAndStaysInTheTrainSplit) {
  // Train part: the alphabet repeated; validation part: digits. Any window reaching into the validation
  // split would show a digit.
  std::string content;
  for (int i = 0; i < 750; ++i) content += static_cast<char>('a' + i % 26);
  for (int i = 0; i < 250; ++i) content += static_cast<char>('0' + i % 10);
  const Dataset d = Dataset::load(write_text("t.txt", content), 0.25);
  ASSERT_EQ(d.train_tokens(), 750);
  const int64_t T = 16, G = 64;
  for (int64_t step = 0; step < 20; ++step) {
    const Batch b = train(d, 42, step, G, 0, G, T);
    for (size_t i = 0; i < b.tokens.size(); ++i) {
      ASSERT_TRUE(b.tokens[i] >= 'a' && b.tokens[i] <= 'z') << "step " << step << " at " << i;
      ASSERT_TRUE(b.targets[i] >= 'a' && b.targets[i] <= 'z') << "step " << step << " at " << i;
      ASSERT_EQ(b.targets[i], 'a' + (b.tokens[i] - 'a' + 1) % 26) << "step " << step << " at " << i;
    }
  }
}

TEST_F(Data, TrainOffsetsCoverExactlyTheValidStarts) {
  // Token i is i: a window's first token is its offset. train 150, T 8: offsets 0 .. 150 - 8 - 1 = 141.
  const Dataset d = Dataset::load(write_positions("p.bin", 200), 0.25);
  ASSERT_EQ(d.train_tokens(), 150);
  const int64_t T = 8, G = 12;
  std::set<int32_t> seen;
  for (int64_t step = 0; step < 300; ++step) {
    const Batch b = train(d, 7, step, G, 0, G, T);
    for (int64_t j = 0; j < G; ++j) {
      const int32_t offset = b.tokens[static_cast<size_t>(j * T)];
      for (int64_t t = 0; t < T; ++t) {
        ASSERT_EQ(b.tokens[static_cast<size_t>(j * T + t)], offset + t);
        ASSERT_EQ(b.targets[static_cast<size_t>(j * T + t)], offset + t + 1);
      }
      seen.insert(offset);
    }
  }
  EXPECT_EQ(*seen.begin(), 0);
  EXPECT_EQ(*seen.rbegin(), 141);
  EXPECT_EQ(seen.size(), 142u);  // 3600 draws over 142 starts: every start is hit (miss chance ~ e^-25 each)
}

TEST_F(Data, SampleOffsetIsUnbiased) {
  // range = 1.5 * 2^62: 2^64 = 2 * range + 2^62, so x % range without rejection hits [0, 2^62) three
  // times and the rest twice, putting 9/16 of the draws in the lower half; rejection keeps it at 1/2.
  const int64_t range = int64_t{3} << 61;
  int lower = 0;
  const int n = 20000;
  for (int j = 0; j < n; ++j) lower += Dataset::sample_offset(3, 0, j, range) < range / 2;
  EXPECT_NEAR(static_cast<double>(lower) / n, 0.5, 0.02);
  // Small ranges: every value in [0, range).
  for (int j = 0; j < 1000; ++j) {
    const int64_t o = Dataset::sample_offset(9, j, j, 5);
    ASSERT_GE(o, 0);
    ASSERT_LT(o, 5);
    ASSERT_EQ(Dataset::sample_offset(9, j, j, 1), 0);
  }
}

TEST_F(Data, RankSlicesAssembleTheSameGlobalBatch) {
  std::string content;
  for (int i = 0; i < 5000; ++i) content += static_cast<char>(32 + (i * 31 + i / 7) % 95);
  const Dataset d = Dataset::load(write_text("t.txt", content), 0.1);
  const int64_t T = 10, G = 12;
  for (const int64_t step : {int64_t{0}, int64_t{1}, int64_t{977}}) {
    const Batch whole = train(d, 1234, step, G, 0, G, T);
    for (int64_t N = 1; N <= 4; ++N) {
      Batch assembled;
      for (int64_t r = 0; r < N; ++r) {
        const int64_t first = r * G / N, count = (r + 1) * G / N - first;
        const Batch part = train(d, 1234, step, G, first, count, T);
        assembled.tokens.insert(assembled.tokens.end(), part.tokens.begin(), part.tokens.end());
        assembled.targets.insert(assembled.targets.end(), part.targets.begin(), part.targets.end());
      }
      EXPECT_EQ(assembled, whole) << "N = " << N << ", step " << step;
    }
  }
}

TEST_F(Data, TrainBatchDependsOnSeedAndStepOnly) {
  std::string content;
  for (int i = 0; i < 5000; ++i) content += static_cast<char>(32 + (i * 37 + i / 11) % 95);
  const std::string p = write_text("t.txt", content);
  const Dataset d = Dataset::load(p, 0.1);
  const Dataset again = Dataset::load(p, 0.1);
  const int64_t T = 10, G = 12;
  const Batch b = train(d, 5, 3, G, 0, G, T);
  EXPECT_EQ(train(d, 5, 3, G, 0, G, T), b);
  EXPECT_EQ(train(again, 5, 3, G, 0, G, T), b);
  EXPECT_NE(train(d, 5, 4, G, 0, G, T), b);
  EXPECT_NE(train(d, 6, 3, G, 0, G, T), b);
  // Consecutive steps and seeds do not repeat each other's windows.
  EXPECT_NE(train(d, 5, 2, G, 0, G, T), b);
  EXPECT_NE(train(d, 4, 3, G, 0, G, T), b);
  // Sequences within one batch differ from each other.
  EXPECT_FALSE(std::equal(b.tokens.begin(), b.tokens.begin() + T, b.tokens.begin() + T));
}

TEST_F(Data, BatchArgumentsAreChecked) {
  const Dataset d = Dataset::load(write_text("t.txt", std::string(100, 'a')), 0.5);
  std::vector<int32_t> a(200), b(200);
  EXPECT_THROW(d.train_batch(1, 0, 4, 3, 2, 4, a.data(), b.data()), Error);   // first + count > G
  EXPECT_THROW(d.train_batch(1, 0, 4, -1, 1, 4, a.data(), b.data()), Error);  // first < 0
  EXPECT_THROW(d.train_batch(1, 0, 4, 0, 1, 0, a.data(), b.data()), Error);   // T = 0
  EXPECT_THROW(d.train_batch(1, -1, 4, 0, 1, 4, a.data(), b.data()), Error);  // step < 0
  EXPECT_THROW(d.val_batch(-1, 4, 0, 1, 4, a.data(), b.data()), Error);       // k < 0
  EXPECT_THROW(d.val_batch(0, 4, 2, 3, 4, a.data(), b.data()), Error);        // first + count > G
  EXPECT_NO_THROW(d.train_batch(1, 0, 4, 4, 0, 4, nullptr, nullptr));         // empty slice
}

TEST_F(Data, ValBatchesAreConsecutiveWindowsThatWrap) {
  // Token i is i. Split at 150: validation tokens 150 .. 199, T = 4 -> windows of 5 tokens, 10 of them.
  const Dataset d = Dataset::load(write_positions("p.bin", 200), 0.25);
  const int64_t T = 4, G = 3;
  ASSERT_EQ(d.val_windows(T), 10);
  auto expect_windows = [&](const Batch& b, const std::vector<int64_t>& windows) {
    for (size_t j = 0; j < windows.size(); ++j)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t start = 150 + windows[j] * (T + 1);
        EXPECT_EQ(b.tokens[j * T + static_cast<size_t>(t)], start + t) << "sequence " << j;
        EXPECT_EQ(b.targets[j * T + static_cast<size_t>(t)], start + t + 1) << "sequence " << j;
      }
  };
  expect_windows(val(d, 0, G, 0, G, T), {0, 1, 2});
  expect_windows(val(d, 1, G, 0, G, T), {3, 4, 5});
  expect_windows(val(d, 3, G, 0, G, T), {9, 0, 1});  // wraps around after window 9
  expect_windows(val(d, 4, G, 0, G, T), {2, 3, 4});
  expect_windows(val(d, 3, G, 1, 2, T), {0, 1});  // a rank's slice
  EXPECT_EQ(val(d, 2, G, 0, G, T), val(d, 2, G, 0, G, T));
  // The last window ends exactly at the last token; a partial trailing window is never used.
  const Dataset odd = Dataset::load(write_positions("q.bin", 203), 0.25);  // val 153 .. 202: 50 tokens
  ASSERT_EQ(odd.train_tokens(), 152);
  ASSERT_EQ(odd.val_windows(6), 7);  // 7 * 7 = 49 tokens
  const Batch last = val(odd, 0, 7, 6, 1, 6);
  EXPECT_EQ(last.tokens.front(), 152 + 6 * 7);
  EXPECT_EQ(last.targets.back(), 152 + 7 * 7 - 1);
}

// ---------------------------------------------------------------------------------------------- hash

TEST_F(Data, HashCoversEveryTokenAndTheSplit) {
  std::string content(3000, 'k');
  const uint64_t base = Dataset::load(write_text("a.txt", content), 0.1).hash();
  EXPECT_EQ(Dataset::load(write_text("b.txt", content), 0.1).hash(), base);  // the name does not matter
  content[1777] = 'l';
  EXPECT_NE(Dataset::load(write_text("c.txt", content), 0.1).hash(), base);
  content[1777] = 'k';
  EXPECT_NE(Dataset::load(write_text("d.txt", content), 0.2).hash(), base);

  std::vector<uint16_t> tokens(500, 1000);
  const uint64_t shard = Dataset::load(write_shard("s0.bin", tokens), 0.1).hash();
  tokens[499] = 1256;  // differs only in the high byte
  EXPECT_NE(Dataset::load(write_shard("s1.bin", tokens), 0.1).hash(), shard);
  tokens[499] = 1000;
  EXPECT_EQ(Dataset::load(write_shard("s2.bin", tokens), 0.1).hash(), shard);
  EXPECT_NE(Dataset::load(write_shard("s3.bin", tokens), 0.0).hash(), shard);
}

TEST_F(Data, LargeShardsLoadQuickly) {
  // 2 x 4 M tokens (16 MB): one read per file, checked and hashed.
  std::vector<uint16_t> tokens(size_t{1} << 22);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint16_t>((i * 2654435761u) % 50257);
  write_shard("big_0.bin", tokens);
  tokens.back() = 50256;
  write_shard("big_1.bin", tokens);
  const Dataset d = Dataset::load(path("big_*.bin"), 0.01);
  EXPECT_EQ(d.num_tokens(), int64_t{2} << 22);
  EXPECT_EQ(d.token((int64_t{2} << 22) - 1), 50256);
  EXPECT_EQ(d.token((int64_t{1} << 22) - 1),
            static_cast<int32_t>((((size_t{1} << 22) - 1) * 2654435761u) % 50257));
}

TEST_F(Data, ShardHeaderCarriesTheVocabulary) {
  write_shard("v_0.bin", {0, 999, 5, 7}, with_vocab(1000));
  write_shard("v_1.bin", {1, 2, 3, 998}, with_vocab(1000));
  const Dataset d = Dataset::load(path("v_*.bin"), 0.25);
  EXPECT_EQ(d.vocab_size(), 1000);
  EXPECT_EQ(d.token(1), 999);
  // The hash covers the vocabulary: the same tokens under another vocabulary are other data.
  write_shard("w_0.bin", {0, 999, 5, 7}, with_vocab(1001));
  write_shard("w_1.bin", {1, 2, 3, 998}, with_vocab(1001));
  EXPECT_NE(Dataset::load(path("w_*.bin"), 0.25).hash(), d.hash());
  // 65536: every uint16 is a token.
  write_shard("full.bin", {65535, 0}, with_vocab(65536));
  EXPECT_EQ(Dataset::load(path("full.bin"), 0.5).vocab_size(), 65536);
}

TEST_F(Data, TokenOutsideTheHeaderVocabularyAndBadVocabularies) {
  const std::string bad = write_shard("small.bin", {4, 5, 999, 1000, 3}, with_vocab(1000));
  expect_input_error([&] { Dataset::load(bad, 0.1); },
                     {bad, "token 1000 at index 3", "outside the shard's vocabulary of 1000"});
  const std::string huge = write_shard("huge.bin", {1, 2}, with_vocab(65537));
  expect_input_error([&] { Dataset::load(huge, 0.1); }, {huge, "vocabulary size 65537", "slot 3"});
  const std::string negative = write_shard("negative.bin", {1, 2}, with_vocab(-1));
  expect_input_error([&] { Dataset::load(negative, 0.1); }, {negative, "vocabulary size -1"});
  write_shard("m_0.bin", {1, 2}, with_vocab(1000));
  const std::string other = write_shard("m_1.bin", {1, 2}, with_vocab(2000));
  expect_input_error([&] { Dataset::load(path("m_*.bin"), 0.1); }, {other, "2000 differs from", "m_0.bin"});
}

// The epoch order: 2 ranks over one epoch read disjoint windows that cover the train split (each rank its
// part of every global batch, with a batch that changes size as under ramp-up); the order is a function of
// the sample index alone (a fresh Dataset resumes it), the same for any number of ranks, and a new
// permutation in the next epoch.
TEST_F(Data, EpochSamplerCoversTheSplitOncePerEpoch) {
  std::string content;
  for (int i = 0; i < 1000; ++i) content += static_cast<char>('a' + (i * 7) % 26);
  const Dataset d = Dataset::load(write_text("epoch.txt", content), 0.1);  // 900 train tokens
  const int64_t T = 8;
  const int64_t W = d.train_windows(T);
  ASSERT_EQ(W, 100);
  std::vector<int> seen(static_cast<size_t>(W), 0);
  std::vector<int32_t> tokens(64 * T), targets(64 * T);
  const int ranks = 2;
  int64_t consumed = 0;
  for (int64_t step = 0; consumed < W; ++step) {
    const int64_t batch = std::min<int64_t>(step < 3 ? 8 : 16, W - consumed);  // a small ramp; the last batch
    for (int r = 0; r < ranks; ++r) {
      const int64_t per_rank = batch / ranks, first = consumed + r * per_rank;
      d.epoch_batch(1337, first, per_rank, T, tokens.data(), targets.data());
      for (int64_t i = 0; i < per_rank; ++i) {
        const int64_t w = d.epoch_window(1337, first + i, T);
        ++seen[static_cast<size_t>(w)];
        // The tokens are that window's: T + 1 consecutive train tokens from w * (T + 1).
        for (int64_t t = 0; t < T; ++t) {
          ASSERT_EQ(tokens[static_cast<size_t>(i * T + t)], d.token(w * (T + 1) + t));
          ASSERT_EQ(targets[static_cast<size_t>(i * T + t)], d.token(w * (T + 1) + t + 1));
        }
      }
    }
    consumed += batch;
  }
  for (int64_t w = 0; w < W; ++w) EXPECT_EQ(seen[static_cast<size_t>(w)], 1) << "window " << w;
  // A fresh Dataset (a resumed run) gives the same window for the same sample index; epoch 1 is another
  // permutation of the same windows.
  const Dataset again = Dataset::load(write_text("epoch.txt", content), 0.1);
  std::vector<int64_t> first_epoch, second_epoch;
  for (int64_t i = 0; i < W; ++i) {
    first_epoch.push_back(d.epoch_window(1337, i, T));
    second_epoch.push_back(again.epoch_window(1337, W + i, T));
  }
  for (int64_t i = W - 1; i >= 0; --i)
    EXPECT_EQ(again.epoch_window(1337, i, T), first_epoch[static_cast<size_t>(i)]);
  EXPECT_NE(first_epoch, second_epoch);
  std::vector<int64_t> sorted = second_epoch;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < W; ++i) EXPECT_EQ(sorted[static_cast<size_t>(i)], i);
  EXPECT_NE(d.epoch_window(1, 0, T) * 1000 + d.epoch_window(1, 1, T), first_epoch[0] * 1000 + first_epoch[1])
      << "the seed chooses the permutation";
  // Too short for one window.
  const Dataset tiny = Dataset::load(write_text("tiny.txt", "abcdefgh"), 0.0);
  EXPECT_THROW(tiny.epoch_window(1, 0, T), InputError);
}

}  // namespace
}  // namespace mpt
