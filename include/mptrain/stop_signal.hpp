// The graceful-stop signals: SIGUSR1 (what `mpirun` forwards and `sbatch --signal=USR1@T` sends) always, and
// SIGTERM under srun (SLURM_JOB_ID and SLURM_STEP_ID set), where it is the deadline warning. Under mpirun
// SIGTERM keeps its default action: mpirun kills the ranks a moment later anyway.
//
// No thread that computes ever runs a signal handler. The signals are blocked in main() before MPI and
// OpenMP start their threads, so every thread inherits the block, and one thread of our own takes them with
// sigwait(2). The reason is oneDNN: its f32 GEMM kernels (gemm:jit) point the stack pointer into a heap
// buffer while they run, so a signal frame the kernel pushes on an interrupted compute thread lands on the
// heap and corrupts it ("corrupted size vs. prev_size", about one signal in two during such a GEMM, see
// tests/reliability/faults.py's sigusr1_storm and tests/test_stop_signal.cpp).
#pragma once

namespace mpt {

/// Blocks the graceful-stop signals (SIGUSR1, and SIGTERM under srun) in the calling thread with
/// pthread_sigmask(2), so also in every thread it creates afterwards. Call it first in main(), before
/// MPI_Init and the first OpenMP region start threads. A signal that arrives while blocked stays pending:
/// watch_stop_signals() later turns it into a stop request (a graceful stop after the first step). One that
/// arrives before main() (the first ~0.1 s of a rank, while the dynamic loader and the libraries'
/// constructors run) still meets its default action: the rank ends. Never throws.
void block_stop_signals();

/// Undoes block_stop_signals() in the calling thread, for the commands that do not train (eval, sample,
/// export): the signals' default action (the process ends) applies again. Never throws.
void unblock_stop_signals();

/// Starts the one thread that waits for the graceful-stop signals (sigwait) and records the first one for
/// stop_signal(); also blocks them in the calling thread, and installs a handler that records them for any
/// thread that did not block them (one created before main()). Idempotent. Throws mpt::Error when the
/// handler cannot be installed or the thread cannot start.
void watch_stop_signals();

/// The number of the graceful-stop signal received so far (SIGUSR1 or SIGTERM), or 0 for none. Safe from any
/// thread; never throws.
int stop_signal();

/// "SIGUSR1", "SIGTERM", or "signal" for any other number. Never throws.
const char* stop_signal_name(int signal_number);

}  // namespace mpt
