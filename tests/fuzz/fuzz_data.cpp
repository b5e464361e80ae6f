// libFuzzer target: the data readers (a byte-level text file, an llm.c token shard) on arbitrary bytes. The
// first byte picks the kind (even: text, odd: shard) and the sequence length; the rest is the file. A file
// that loads is then sampled from, like training and evaluation do.
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_input_file.hpp"
#include "mptrain/data.hpp"
#include "mptrain/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool shard = (data[0] & 1) != 0;
  const int64_t T = 1 + ((data[0] >> 1) & 15);
  const std::string path = mpt::fuzz::write_input(data + 1, size - 1, shard ? ".bin" : ".txt");
  try {
    const mpt::Dataset d = mpt::Dataset::load(path, 0.25);
    d.check_sequence_length(T, true);
    constexpr int64_t kBatch = 2;
    std::vector<int32_t> tokens(static_cast<size_t>(kBatch * T)), targets(tokens.size());
    for (int64_t step = 0; step < 2; ++step) {
      d.train_batch(1337, step, kBatch, 0, kBatch, T, tokens.data(), targets.data());
      d.val_batch(step, kBatch, 0, kBatch, T, tokens.data(), targets.data());
      for (size_t i = 0; i < tokens.size(); ++i)
        if (tokens[i] < 0 || tokens[i] >= d.vocab_size() || targets[i] < 0 || targets[i] >= d.vocab_size())
          __builtin_trap();  // a token outside the vocabulary reached the model
    }
    (void)d.decode(tokens.data(), static_cast<int64_t>(tokens.size()));
  } catch (const mpt::InputError&) {
  }
  return 0;
}
