// Checkpoints (DESIGN.md "Formats"): safetensors with the unpadded, named FP32 master weights, Adam m and v
// ("master.<tensor>", "adam_m.<tensor>", "adam_v.<tensor>"), so a run can resume with any number of ranks;
// the step, Adam's t, the loss-scaler state, the seed (the data order depends only on seed and step) and the
// effective config in the metadata, plus an FNV-1a 64 checksum of all tensor bytes and metadata. Written
// atomically by rank 0 (temporary name, fsync, rename, directory fsync); the newest `keep` are kept.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "mptrain/engine.hpp"
#include "mptrain/safetensors.hpp"

namespace mpt {

/// Gathers the optimizer state (collective) and writes `dir`/ckpt_<step, 8 digits>.safetensors on rank 0 with
/// `metadata` plus the step, Adam's t, the scaler state and the checksum; then deletes all but the newest
/// `keep` checkpoints in `dir`. Returns the path. Throws mpt::Error on an I/O failure (on rank 0 only).
std::string save_checkpoint(MixedPrecisionEngine& engine, const std::string& dir, int64_t step, int keep,
                            const std::map<std::string, std::string>& metadata);

/// Reads `path` and verifies its format and checksum. Throws mpt::InputError naming the path for a missing,
/// truncated or damaged file, or one that is not an mptrain checkpoint.
SafetensorsFile read_checkpoint(const std::string& path);

/// The newest checkpoint in `dir` that reads and verifies, or "" when `dir` holds no checkpoint (a damaged
/// newer one is skipped, with a line on stderr when `verbose`). Throws mpt::InputError when `dir` holds
/// checkpoints and none verifies.
std::string find_latest_checkpoint(const std::string& dir, bool verbose);

/// True when `dir` holds any file named like a checkpoint.
bool has_checkpoints(const std::string& dir);

/// Loads a verified checkpoint into the engine (master, m, v, Adam's t, scaler). The caller checks the model
/// shape first. Returns the checkpoint's step (optimizer steps taken, skipped ones included).
int64_t restore_checkpoint(MixedPrecisionEngine& engine, const SafetensorsFile& checkpoint);

/// Integer metadata field `key` of a checkpoint; throws mpt::InputError naming the file and key.
int64_t checkpoint_int(const SafetensorsFile& checkpoint, const std::string& key);

}  // namespace mpt
