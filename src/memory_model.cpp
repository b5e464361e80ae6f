// The memory model (include/mptrain/memory_model.hpp): the engine's and the model's allocation plans summed
// without allocating, and what a rank can use on the device or the host.
#include "mptrain/memory_model.hpp"

#include <algorithm>
#include <fstream>
#include <limits>
#include <sstream>
#include <vector>

#include "mptrain/error.hpp"

namespace mpt {

MemoryEstimate estimate_memory(const GPTConfig& model, const EngineConfig& engine, int world_size,
                               Recompute recompute, int64_t B, int64_t T, Backend& backend) {
  MemoryEstimate e;
  e.micro_batch = B;
  e.engine = MixedPrecisionEngine::predict_memory(gpt_tensors(model), engine, world_size);
  e.activations = GPT::activation_bytes_for(model, engine.dtype, recompute, B, T, backend);
  e.model_scratch = sizeof(double);  // GPT's loss accumulator
  // The backend's scratch grows to its largest op: the model's GEMMs and the attention.
  const int64_t BT = B * T, C = model.channels, Vp = model.padded_vocab_size();
  const DType dt = engine.dtype;
  const std::pair<int64_t, int64_t> gemms[] = {{C, 3 * C}, {C, C}, {C, 4 * C}, {4 * C, C}, {C, Vp}};
  for (const auto& [IC, OC] : gemms)
    e.workspace = std::max(e.workspace, backend.matmul_workspace_bytes(BT, IC, OC, dt));
  e.workspace = std::max(e.workspace, backend.attention_workspace_bytes(B, T, C, model.num_heads, dt));
  return e;
}

int64_t largest_micro_batch(const std::function<MemoryEstimate(int64_t)>& estimate, size_t budget_bytes,
                            int64_t max_B, int64_t must_divide) {
  const auto fits = [&](int64_t B) { return estimate(B).total() <= budget_bytes; };
  if (must_divide > 0) {
    std::vector<int64_t> divisors;
    for (int64_t d = 1; d * d <= must_divide; ++d)
      if (must_divide % d == 0) divisors.insert(divisors.end(), {d, must_divide / d});
    std::sort(divisors.rbegin(), divisors.rend());
    for (int64_t d : divisors)
      if (d <= max_B && fits(d)) return d;
    return 0;
  }
  if (max_B < 1 || !fits(1)) return 0;
  int64_t lo = 1, hi = max_B;  // fits(lo); find the largest
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (fits(mid))
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

namespace {

/// A /proc/meminfo field in bytes (0 when absent).
size_t meminfo_bytes(const std::string& key) {
  std::ifstream in("/proc/meminfo");
  for (std::string line; std::getline(in, line);) {
    if (!line.starts_with(key + ":")) continue;
    std::istringstream fields(line.substr(key.size() + 1));
    size_t kib = 0;
    fields >> kib;
    return kib * 1024;
  }
  return 0;
}

/// The first number in `path`, or nullopt (absent, "max", unreadable).
std::optional<size_t> read_number(const std::string& path) {
  std::ifstream in(path);
  size_t value = 0;
  if (!(in >> value)) return std::nullopt;
  return value;
}

/// The cgroup's limit minus its usage, or nullopt without a limit (v2, then v1; a limit of 2^60 or more
/// is no limit).
std::optional<size_t> cgroup_room() {
  const std::pair<const char*, const char*> files[] = {
      {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"},
      {"/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"}};
  for (const auto& [limit_file, usage_file] : files) {
    const auto limit = read_number(limit_file);
    if (!limit || *limit >= (size_t{1} << 60)) continue;
    const size_t usage = read_number(usage_file).value_or(0);
    return *limit > usage ? *limit - usage : 0;
  }
  return std::nullopt;
}

}  // namespace

UsableMemory usable_memory(const Backend& backend, int ranks_on_node) {
  if (const auto free_bytes = backend.device_free_bytes()) return {*free_bytes, "free device memory"};
  const int ranks = std::max(ranks_on_node, 1);
  size_t bytes = meminfo_bytes("MemAvailable");
  std::string what = "MemAvailable";
  if (const auto room = cgroup_room(); room && *room < bytes) {
    bytes = *room;
    what = "the cgroup's memory limit minus its usage";
  }
  return {bytes / static_cast<size_t>(ranks),
          ranks > 1 ? fmt::format("{} / {} ranks on this node", what, ranks) : what};
}

UsableMemory default_memory_budget(const Backend& backend, int ranks_on_node) {
  if (const auto free_bytes = backend.device_free_bytes()) return {*free_bytes, "free device memory"};
  const int ranks = std::max(ranks_on_node, 1);
  return {meminfo_bytes("MemTotal") / 2 / static_cast<size_t>(ranks),
          fmt::format("half the physical memory / {} rank(s) on this node", ranks)};
}

std::string format_gib(double bytes) {
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
  if (bytes < kGiB) return fmt::format("{:.1f} MiB", bytes / (1024.0 * 1024.0));
  if (bytes < 1024.0 * kGiB) return fmt::format("{:.1f} GiB", bytes / kGiB);
  return fmt::format("{:.1f} TiB", bytes / (1024.0 * kGiB));
}

std::string memory_refusal(const std::string& flag, const MemoryEstimate& need, const UsableMemory& usable,
                           int64_t largest, const MemoryEstimate& smallest) {
  std::string line = fmt::format("{} needs {} per rank (activations {}), {} available ({})", flag,
                                 format_gib(static_cast<double>(need.total())),
                                 format_gib(static_cast<double>(need.activations)),
                                 format_gib(static_cast<double>(usable.bytes)), usable.source);
  if (largest > 0) return line + fmt::format("; the largest micro-batch that fits is {}", largest);
  return line + fmt::format("; nothing fits: micro-batch 1 needs {}",
                            format_gib(static_cast<double>(smallest.total())));
}

}  // namespace mpt
