// safetensors reader/writer: exact round trip, atomic write (no temporary left, the old file intact on
// failure), and a clear InputError naming the file for every kind of damage.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "mptrain/error.hpp"
#include "mptrain/safetensors.hpp"

namespace mpt {
namespace {

class Safetensors : public ::testing::Test {
 protected:
  std::filesystem::path dir = std::filesystem::temp_directory_path() /
                              ("mptrain_st_" + std::to_string(getpid()) + "_" +
                               ::testing::UnitTest::GetInstance()->current_test_info()->name());
  void SetUp() override { std::filesystem::create_directories(dir); }
  void TearDown() override { std::filesystem::remove_all(dir); }
  std::string path(const std::string& name) const { return (dir / name).string(); }

  std::string write_sample(const std::string& name) {
    const std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -0.5f};
    const std::vector<int32_t> b = {1, 2, 3};
    const std::vector<half> c = {half(1.0f), half(65504.0f)};
    const std::string p = path(name);
    write_safetensors(p,
                      {{"a", DType::f32, {2, 3}, a.data()},
                       {"b", DType::i32, {3}, b.data()},
                       {"c", DType::f16, {2}, c.data()}},
                      {{"step", "12"}, {"note", "hello"}});
    return p;
  }
  static void expect_input_error(const std::string& p, const std::string& needle) {
    try {
      read_safetensors(p);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const InputError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(needle), std::string::npos) << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << "one line: " << what;
    }
  }
  static std::vector<char> bytes_of(const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::vector<char>(std::istreambuf_iterator<char>(in), {});
  }
  static void put(const std::string& p, const std::vector<char>& b) {
    std::ofstream(p, std::ios::binary).write(b.data(), static_cast<std::streamsize>(b.size()));
  }
};

TEST_F(Safetensors, RoundTripIsExactAndLeavesNoTemporary) {
  const std::string p = write_sample("x.safetensors");
  EXPECT_FALSE(std::filesystem::exists(p + ".tmp"));
  const SafetensorsFile f = read_safetensors(p);
  EXPECT_EQ(f.metadata.at("step"), "12");
  EXPECT_EQ(f.metadata.at("note"), "hello");
  EXPECT_EQ(f.at("a").shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(f.at("a").as<float>("a"), (std::vector<float>{1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -0.5f}));
  EXPECT_EQ(f.at("b").as<int32_t>("b"), (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(f.at("c").as<half>("c")[1].bits, half(65504.0f).bits);
  EXPECT_THROW(f.at("a").as<double>("a"), InputError);
  EXPECT_THROW(f.at("missing"), InputError);
  // The header is 8-byte aligned, so the data is too.
  const auto b = bytes_of(p);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(b[i])) << (8 * i);
  EXPECT_EQ(n % 8, 0u);
}

TEST_F(Safetensors, FailedWriteLeavesTheOldFile) {
  const std::string p = write_sample("keep.safetensors");
  const auto before = bytes_of(p);
  const std::string bad = (dir / "no_such_dir" / "keep.safetensors").string();
  const float x = 1.0f;
  EXPECT_THROW(write_safetensors(bad, {{"x", DType::f32, {1}, &x}}, {}), Error);
  EXPECT_EQ(bytes_of(p), before);
}

TEST_F(Safetensors, DamageIsAClearInputError) {
  expect_input_error(path("absent.safetensors"), "cannot open");
  expect_input_error(dir.string(), "is a directory");
  const std::string p = write_sample("d.safetensors");
  const auto good = bytes_of(p);

  put(path("short"), std::vector<char>(good.begin(), good.begin() + 5));
  expect_input_error(path("short"), "truncated");
  put(path("cut"), std::vector<char>(good.begin(), good.end() - 3));  // data shorter than the offsets say
  expect_input_error(path("cut"), "truncated: tensor");
  auto huge = good;
  huge[7] = 0x7f;  // header length beyond the file
  put(path("huge"), huge);
  expect_input_error(path("huge"), "header length");
  auto broken = good;
  broken[8] = '!';  // the JSON header no longer parses
  put(path("broken"), broken);
  expect_input_error(path("broken"), "malformed");
  std::string text(good.begin() + 8, good.end());
  const auto at = text.find("\"F32\"");
  ASSERT_NE(at, std::string::npos);
  auto dtype = good;
  dtype[8 + at + 1] = 'Q';
  put(path("dtype"), dtype);
  expect_input_error(path("dtype"), "unsupported dtype");
}

/// A file holding `header` (its length as 8 little-endian bytes first) and 8 data bytes.
void write_raw(const std::string& p, const std::string& header) {
  std::vector<char> b(8);
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), 8, '\0');
  std::ofstream(p, std::ios::binary).write(b.data(), static_cast<std::streamsize>(b.size()));
}

TEST_F(Safetensors, HeaderNumbersMustBeIntegersInRange) {
  // Floats, negatives and out-of-range integers where sizes and offsets go: nlohmann's get<> would cast
  // them with static_cast (undefined for 12e32 -> uint64_t; found by the fuzzer).
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"t":{"dtype":"I32","shape":[2],"data_offsets":[12e32]}})", "malformed data_offsets"},
      {R"({"t":{"dtype":"I32","shape":[2],"data_offsets":[0,8.5]}})", "malformed data_offsets"},
      {R"({"t":{"dtype":"I32","shape":[2],"data_offsets":[-8,8]}})", "malformed data_offsets"},
      {R"({"t":{"dtype":"I32","shape":[2],"data_offsets":"0,8"}})", "malformed data_offsets"},
      {R"({"t":{"dtype":"I32","shape":[1.5],"data_offsets":[0,8]}})", "malformed shape"},
      {R"({"t":{"dtype":"I32","shape":[-2],"data_offsets":[0,8]}})", "malformed shape"},
      {R"({"t":{"dtype":"I32","shape":[1e300],"data_offsets":[0,8]}})", "malformed shape"},
      {R"({"t":{"dtype":"I32","shape":[18446744073709551615],"data_offsets":[0,8]}})", "malformed shape"},
      {R"({"t":{"dtype":"I32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", "too large"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    std::string name = std::to_string(i);  // (not "h" + ...: GCC 12 -Werror=restrict false positive)
    name += ".safetensors";
    const std::string p = path(name);
    write_raw(p, cases[i].first);
    expect_input_error(p, cases[i].second);
  }
  write_raw(path("ok"), R"({"t":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})");
  EXPECT_EQ(read_safetensors(path("ok")).tensors.at("t").bytes.size(), 8u);
}

}  // namespace
}  // namespace mpt
