// Checkpoint writing, verification and restoring (include/mptrain/checkpoint.hpp).
#include "mptrain/checkpoint.hpp"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <filesystem>

#include "mptrain/error.hpp"
#include "mptrain/hash.hpp"

namespace mpt {

namespace {

constexpr const char* kFormat = "mptrain-checkpoint-v1";
const char* const kKinds[] = {"master.", "adam_m.", "adam_v."};

/// FNV-1a 64 over the tensors' names and bytes in name order (the order a reader's map gives), then every
/// metadata entry but the checksum itself, so a damaged step count or scaler field is caught too.
uint64_t checksum(const std::map<std::string, std::pair<const std::byte*, size_t>>& tensors,
                  const std::map<std::string, std::string>& metadata) {
  uint64_t h = kFnv1aOffset;
  auto mix = [&](const void* p, size_t n) { h = fnv1a(p, n, h); };
  for (const auto& [name, data] : tensors) {
    mix(name.data(), name.size());
    mix(data.first, data.second);
  }
  for (const auto& [key, value] : metadata) {
    if (key == "checksum") continue;
    mix(key.data(), key.size() + 1);  // with the terminating NUL: "ab"+"c" differs from "a"+"bc"
    mix(value.data(), value.size() + 1);
  }
  return h;
}

std::vector<std::filesystem::path> checkpoints_in(const std::string& dir) {
  std::vector<std::filesystem::path> files;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.starts_with("ckpt_") && name.ends_with(".safetensors")) files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());  // zero-padded step numbers: name order is step order
  return files;
}

}  // namespace

int64_t checkpoint_int(const SafetensorsFile& checkpoint, const std::string& key) {
  const auto it = checkpoint.metadata.find(key);
  MPT_INPUT_CHECK(it != checkpoint.metadata.end(), "checkpoint {}: metadata has no '{}'", checkpoint.path,
                  key);
  int64_t value = 0;
  const auto [end, ec] = std::from_chars(it->second.data(), it->second.data() + it->second.size(), value);
  MPT_INPUT_CHECK(ec == std::errc() && end == it->second.data() + it->second.size(),
                  "checkpoint {}: metadata '{}' is not an integer: '{}'", checkpoint.path, key, it->second);
  return value;
}

std::string save_checkpoint(MixedPrecisionEngine& engine, const std::string& dir, int64_t step, int keep,
                            const std::map<std::string, std::string>& metadata) {
  using Kind = MixedPrecisionEngine::ShardState;
  const std::vector<std::vector<float>> states[3] = {engine.gather_tensors(Kind::master),
                                                     engine.gather_tensors(Kind::adam_m),
                                                     engine.gather_tensors(Kind::adam_v)};
  const std::string path = fmt::format("{}/ckpt_{:08d}.safetensors", dir, step);
  if (engine.rank() != 0) return path;
  std::filesystem::create_directories(dir);
  std::vector<TensorToWrite> tensors;
  std::map<std::string, std::pair<const std::byte*, size_t>> for_checksum;
  const auto& placements = engine.layout().tensors();
  for (int kind = 0; kind < 3; ++kind)
    for (size_t k = 0; k < placements.size(); ++k) {
      const std::string name = kKinds[kind] + placements[k].spec.name;
      tensors.push_back({name, DType::f32, placements[k].spec.shape, states[kind][k].data()});
      for_checksum[name] = {reinterpret_cast<const std::byte*>(states[kind][k].data()),
                            states[kind][k].size() * sizeof(float)};
    }
  std::map<std::string, std::string> meta = metadata;
  for (const auto& [key, value] : engine.scaler().serialize()) meta[key] = value;
  for (const auto& [key, value] : engine.noise_metadata()) meta[key] = value;
  meta["format"] = kFormat;
  meta["step"] = std::to_string(step);
  meta["applied_steps"] = std::to_string(engine.applied_steps());
  meta["applied_samples"] = std::to_string(engine.applied_samples());
  meta["checksum"] = fmt::format("{:016x}", checksum(for_checksum, meta));
  write_safetensors(path, tensors, meta);
  const auto files = checkpoints_in(dir);
  for (size_t i = 0; i + static_cast<size_t>(keep) < files.size(); ++i) std::filesystem::remove(files[i]);
  return path;
}

SafetensorsFile read_checkpoint(const std::string& path) {
  SafetensorsFile file;
  try {
    file = read_safetensors(path);
  } catch (const InputError& e) {
    throw InputError(fmt::format("checkpoint {}", e.what()));  // the reader's message starts with the path
  }
  const auto format = file.metadata.find("format");
  MPT_INPUT_CHECK(format != file.metadata.end() && format->second == kFormat,
                  "checkpoint {}: not an mptrain checkpoint (format '{}')", path,
                  format == file.metadata.end() ? "" : format->second);
  std::map<std::string, std::pair<const std::byte*, size_t>> for_checksum;
  for (const auto& [name, t] : file.tensors) for_checksum[name] = {t.bytes.data(), t.bytes.size()};
  const std::string expected = fmt::format("{:016x}", checksum(for_checksum, file.metadata));
  const auto stored = file.metadata.find("checksum");
  MPT_INPUT_CHECK(stored != file.metadata.end() && stored->second == expected,
                  "checkpoint {}: checksum mismatch (file damaged: stored {}, computed {})", path,
                  stored == file.metadata.end() ? "none" : stored->second, expected);
  return file;
}

std::string find_latest_checkpoint(const std::string& dir, bool verbose) {
  auto files = checkpoints_in(dir);
  std::string last_error;
  for (auto it = files.rbegin(); it != files.rend(); ++it) {
    try {
      read_checkpoint(it->string());
      return it->string();
    } catch (const InputError& e) {
      last_error = e.what();
      if (verbose) std::fprintf(stderr, "mptrain: skipping damaged checkpoint: %s\n", e.what());
    }
  }
  // Checkpoints that all fail to verify are not "no checkpoint": starting over would overwrite them.
  MPT_INPUT_CHECK(files.empty(), "--resume auto: none of the {} checkpoints in {} verifies (last: {})",
                  files.size(), dir, last_error);
  return "";
}

bool has_checkpoints(const std::string& dir) {
  return !checkpoints_in(dir).empty();
}

int64_t restore_checkpoint(MixedPrecisionEngine& engine, const SafetensorsFile& checkpoint) {
  std::vector<std::vector<float>> states[3];
  for (int kind = 0; kind < 3; ++kind)
    for (const TensorPlacement& t : engine.layout().tensors()) {
      const std::string name = kKinds[kind] + t.spec.name;
      const LoadedTensor& loaded = checkpoint.at(name);
      MPT_INPUT_CHECK(loaded.shape == t.spec.shape,
                      "checkpoint {}: tensor '{}' has another shape than the model", checkpoint.path, name);
      states[kind].push_back(loaded.as<float>(name));
    }
  engine.load_state(states[0], states[1], states[2], checkpoint_int(checkpoint, "applied_steps"),
                    checkpoint.metadata);
  return checkpoint_int(checkpoint, "step");
}

}  // namespace mpt
