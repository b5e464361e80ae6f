// The memory model of a training run: the bytes per rank of weights, gradients, the FP32 shard, activations
// (for the recompute mode) and backend scratch, computed before anything is allocated from the same plans the
// engine and the model allocate from. The trainer uses it to refuse a micro-batch that cannot fit (one line,
// exit 2, nothing allocated), to pick `--micro-batch auto`, and prints it next to the bytes actually
// allocated after the first step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "mptrain/backend.hpp"
#include "mptrain/engine.hpp"
#include "mptrain/model.hpp"

namespace mpt {

/// Bytes per rank of one training set-up at one micro-batch.
struct MemoryEstimate {
  int64_t micro_batch = 0;
  /// weights, gradients (+ FP32 accumulation; ZeRO-2: the gradient shard and the staging pool),
  /// master/m/v shard, engine scratch
  MemoryReport engine;
  size_t activations = 0;    ///< GPT::activation_bytes_for (forward activations + backward scratch)
  size_t model_scratch = 0;  ///< the model's own buffers outside the activations (loss accumulator)
  size_t workspace = 0;  ///< backend scratch outside allocate(): the largest op's need (not in bytes_in_use)

  /// What Backend::bytes_in_use() counts once the first step has run.
  size_t allocated() const {
    return engine.state_bytes() + engine.scratch_bytes + activations + model_scratch;
  }
  /// allocated() + workspace: the need compared with the memory a rank can use.
  size_t total() const { return allocated() + workspace; }
};

/// The estimate for `model` trained by an engine with `engine` on `world_size` ranks, `recompute`,
/// micro-batch B of T tokens, on `backend` (which answers attention_saved_bytes and the workspace sizes;
/// nothing is allocated). Throws mpt::InputError for a bad config.
MemoryEstimate estimate_memory(const GPTConfig& model, const EngineConfig& engine, int world_size,
                               Recompute recompute, int64_t B, int64_t T, Backend& backend);

/// The largest micro-batch B in [1, max_B] whose estimate(B).total() is at most `budget_bytes`, or 0 when
/// none fits; with `must_divide` > 0 only B that divide it count. estimate(B).total() must grow with B.
int64_t largest_micro_batch(const std::function<MemoryEstimate(int64_t)>& estimate, size_t budget_bytes,
                            int64_t max_B, int64_t must_divide = 0);

/// Memory one rank may use, with the words that say where the figure comes from.
struct UsableMemory {
  size_t bytes = 0;
  std::string source;  ///< e.g. "free device memory", "MemAvailable / 2 ranks on this node"
};

/// What a rank can use now: the free device memory (cudaMemGetInfo) for a device backend; on the CPU the
/// lower of /proc/meminfo's MemAvailable and the cgroup's limit minus its usage (v2 memory.max/current, v1
/// memory.limit_in_bytes/usage_in_bytes), divided by `ranks_on_node`.
UsableMemory usable_memory(const Backend& backend, int ranks_on_node);

/// The default --memory-budget of --micro-batch auto: the free device memory, or on the CPU half the
/// physical RAM (MemTotal) divided by `ranks_on_node`.
UsableMemory default_memory_budget(const Backend& backend, int ranks_on_node);

/// "348.1 GiB" (one decimal; MiB below 1 GiB, TiB from 1024 GiB).
std::string format_gib(double bytes);

/// One line for a run whose micro-batch `need.micro_batch` needs more than `usable`: the need, the
/// activations, what is available and the largest micro-batch that fits (`largest`, 0: none).
std::string memory_refusal(const std::string& flag, const MemoryEstimate& need, const UsableMemory& usable,
                           int64_t largest, const MemoryEstimate& smallest);

}  // namespace mpt
