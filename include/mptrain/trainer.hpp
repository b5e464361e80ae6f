// The mptrain subcommands: train, eval and sample (DESIGN.md "The step" and "Output a user sees").
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "mptrain/comm.hpp"
#include "mptrain/config.hpp"
#include "mptrain/error.hpp"

namespace mpt {

/// Exit codes (main.cpp): a usage error (flags, config file, world size, ranks started differently) is 2; a
/// file the user named that cannot be used (data, checkpoint, tokenizer: missing, unreadable, damaged, or not
/// fitting the run) is 1, like any other failure.
inline constexpr int kExitUsage = 2;
inline constexpr int kExitBadFile = 1;

/// An mpt::InputError about a file the user named rather than about the flags: exit code kExitBadFile.
class FileInputError : public InputError {
 public:
  explicit FileInputError(const std::string& what) : InputError(what) {}
};

/// Runs `fn` and rethrows an mpt::InputError it throws as FileInputError (same message): for code that
/// reads and checks the user's files.
template <typename F>
decltype(auto) about_files(F&& fn) {
  try {
    return fn();
  } catch (const FileInputError&) {
    throw;
  } catch (const InputError& e) {
    throw FileInputError(e.what());
  }
}

/// Exit request agreed by every rank (input errors found during set-up): the ranks that saw the error
/// printed it; main() returns `code` on every rank.
struct AgreedExit {
  int code;
};

/// Runs `setup` on every rank; when it throws mpt::InputError on any rank, the lowest such rank prints its
/// message (one line) and every rank throws AgreedExit with that rank's code (kExitBadFile for a
/// FileInputError, else kExitUsage). Collective: a problem only some ranks see (a file
/// missing on one node, a flag given to one rank) stops the whole job instead of hanging it.
void agree_on_setup(Communicator& comm, const std::function<void()>& setup);

/// Throws mpt::InputError on every rank when the ranks' `hash` values differ (naming the first rank that
/// differs from rank 0 and `what` was compared). Collective.
void check_ranks_agree(Communicator& comm, uint64_t hash, const std::string& what);

/// `mptrain train`: data-parallel mixed-precision training with logging, evaluation, checkpoints and resume.
/// Collective over `comm`. Returns the process exit code (0). Throws mpt::InputError (same on every rank),
/// AgreedExit (set-up errors seen by some ranks), mpt::NumericsError (the loss scale stuck at its minimum).
int run_train(const RunConfig& config, Communicator& comm);

/// `mptrain eval`: the validation loss of --checkpoint on --data (--eval-batches batches of --global-batch
/// sequences), printed by rank 0 as "val_loss <value>" and as JSON. Collective over `comm`.
int run_eval(const RunConfig& config, Communicator& comm);

/// `mptrain export`: --checkpoint's FP32 master weights as a transformers GPT-2 directory --out
/// (export_hf: config.json, model.safetensors in --dtype; tokenizer.json: --tokenizer copied, or the
/// byte-level one for a 256-token model). Rank 0 writes. Throws mpt::InputError (agreed by every rank) for
/// an unusable checkpoint or tokenizer.
int run_export(const RunConfig& config, Communicator& comm);

/// `mptrain sample`: --sample-tokens tokens from --checkpoint after --prompt (rank 0 computes and prints).
int run_sample(const RunConfig& config, Communicator& comm);

}  // namespace mpt
