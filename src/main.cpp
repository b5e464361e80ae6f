// mptrain: the executable. `mpirun -n N build/mptrain train [flags]` (or eval, sample); see --help.
//
// Exit codes: 0 success; 2 a usage error (flags, config file, world size, ranks started with different
// flags or data); 1 a file that cannot be used (data, checkpoint, tokenizer: missing, unreadable, damaged,
// not fitting the run) or a run that cannot continue (loss scale stuck at its minimum). Input errors are
// reported in one line by one rank (rank 0 when it sees the problem), every rank exiting together. A failure
// only one rank sees mid-run (an I/O error) aborts the whole job through MPI_Abort, as does the collective
// watchdog (--collective-timeout) when a rank freezes. SIGUSR1 (and SIGTERM under srun) stops training
// gracefully: a checkpoint at the next step boundary, exit 0.
#include <cstdio>
#include <exception>

#include "mptrain/comm_mpi.hpp"
#include "mptrain/error.hpp"
#include "mptrain/hash.hpp"
#include "mptrain/trainer.hpp"

int main(int argc, char** argv) {
  mpt::MpiSession mpi(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  try {
    mpt::MpiCommunicator comm;
    mpt::RunConfig config;
    // Parse on every rank and agree before anything else: a bad flag or --help given to some ranks only
    // must not leave the others waiting in a collective.
    bool help = false;
    mpt::agree_on_setup(comm, [&] {
      help = !mpt::parse_command_line(argc, argv, config);
      if (!help) config.validate();
    });
    mpt::check_ranks_agree(comm, help ? 0 : mpt::fnv1a(config.to_json().dump()),
                           "command line or config file");
    if (help) return 0;
    // The collective watchdog guards everything after the agreed set-up.
    comm.set_timeout_seconds(config.collective_timeout);
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
