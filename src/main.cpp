// mptrain: the executable. `mpirun -n N build/mptrain train [flags]` (or eval, sample); see --help.
//
// Exit codes: 0 success; 2 a usage error (flags, config file, world size, ranks started with different
// flags or data); 1 a file that cannot be used (data, checkpoint, tokenizer: missing, unreadable, damaged,
// not fitting the run) or a run that cannot continue (loss scale stuck at its minimum). Input errors are
// reported in one line by one rank (rank 0 when it sees the problem), every rank exiting together. A failure
// only one rank sees mid-run (an I/O error) aborts the whole job through MPI_Abort, as does the collective
// watchdog (--collective-timeout) when a rank freezes; it guards the first collective too, where Open MPI
// connects the ranks and hangs when it picks an interface that does not connect the hosts. SIGUSR1 (and
// SIGTERM under srun) stops training gracefully: a checkpoint at the next step boundary, exit 0. Those
// signals are blocked before MPI starts its threads and taken by one thread of our own
// (mptrain/stop_signal.hpp).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>

#include "mptrain/backend.hpp"
#include "mptrain/comm_mpi.hpp"
#include "mptrain/error.hpp"
#include "mptrain/hash.hpp"
#include "mptrain/stop_signal.hpp"
#include "mptrain/trainer.hpp"

namespace {

/// Debug hook for the start-up watchdog's test: MPTRAIN_DEBUG_DELAY_FIRST_COLLECTIVE=RANK:SECONDS makes that
/// rank sleep before the first collective, as a rank that starts late or cannot be reached would look to
/// the others. Throws mpt::InputError for a malformed value.
void debug_delay_first_collective(int rank) {
  const char* spec = std::getenv("MPTRAIN_DEBUG_DELAY_FIRST_COLLECTIVE");
  if (!spec) return;
  const std::string text = spec;
  const auto colon = text.find(':');
  int delayed_rank = -1;
  double seconds = -1;
  try {
    size_t used_rank = 0, used_seconds = 0;
    if (colon != std::string::npos) {
      delayed_rank = std::stoi(text.substr(0, colon), &used_rank);
      seconds = std::stod(text.substr(colon + 1), &used_seconds);
    }
    if (used_rank != colon || used_seconds != text.size() - colon - 1) seconds = -1;
  } catch (const std::exception&) {
    seconds = -1;
  }
  MPT_INPUT_CHECK(delayed_rank >= 0 && seconds >= 0 && seconds < 1e6,
                  "MPTRAIN_DEBUG_DELAY_FIRST_COLLECTIVE must be RANK:SECONDS, got '{}'", text);
  if (rank == delayed_rank) std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
}

}  // namespace

int main(int argc, char** argv) {
  // First, before MPI_Init and OpenMP start threads: every thread then inherits the block, and no compute
  // thread runs a signal handler (in oneDNN's GEMM kernels its frame would land on the heap).
  mpt::block_stop_signals();
  mpt::MpiSession mpi(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  // Parse on every rank alone first: the flags hold the watchdog's timeout, which already guards the first
  // collective (the communicator's duplication, where Open MPI connects the ranks). An error waits for the
  // agreement below, so a bad flag or --help given to some ranks only does not leave the others waiting.
  mpt::RunConfig config;
  bool help = false;
  std::exception_ptr setup_error;
  try {
    help = !mpt::parse_command_line(argc, argv, config);
    if (!help) {
      config.validate();
      mpt::check_cpu_backend_environment();
    }
    debug_delay_first_collective(rank);
  } catch (...) {
    setup_error = std::current_exception();
  }
  const double first_timeout =
      setup_error || help ? mpt::RunConfig{}.collective_timeout : config.collective_timeout;
  try {
    mpt::MpiCommunicator comm(MPI_COMM_WORLD, first_timeout);
    mpt::agree_on_setup(comm, [&] {
      if (setup_error) std::rethrow_exception(setup_error);
    });
    mpt::check_ranks_agree(comm, help ? 0 : mpt::fnv1a(config.to_json().dump()),
                           "command line or config file");
    if (help) return 0;
    // The agreed timeout from here on (the same value: the ranks agree on the flags).
    comm.set_timeout_seconds(config.collective_timeout);
    if (config.command != "train") mpt::unblock_stop_signals();  // their default action: the process ends
    if (config.command == "eval") return mpt::run_eval(config, comm);
    if (config.command == "sample") return mpt::run_sample(config, comm);
    if (config.command == "export") return mpt::run_export(config, comm);
    return mpt::run_train(config, comm);
  } catch (const mpt::AgreedExit& e) {
    return e.code;
  } catch (const mpt::FileInputError& e) {
    // A file every rank reads alike (the same message everywhere): one line from rank 0, exit 1.
    if (rank == 0) std::fprintf(stderr, "mptrain: error: %s\n", e.what());
    return mpt::kExitBadFile;
  } catch (const mpt::InputError& e) {
    // The same on every rank (same flags, same files): one line from rank 0, exit 2 everywhere.
    if (rank == 0) std::fprintf(stderr, "mptrain: error: %s\n", e.what());
    return 2;
  } catch (const mpt::NumericsError& e) {
    if (rank == 0) std::fprintf(stderr, "mptrain: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mptrain: rank %d: fatal: %s\n", rank, e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
}
