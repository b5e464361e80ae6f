// The graceful-stop signals, taken by one thread of our own with sigwait(2) (see stop_signal.hpp for why no
// compute thread may run a handler).
#include "mptrain/stop_signal.hpp"

#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <system_error>
#include <thread>

#include "mptrain/error.hpp"

namespace mpt {

namespace {

/// The first graceful-stop signal received (0: none). Lock-free, so also safe to store from the fallback
/// handler below.
std::atomic<int> g_stop_signal{0};
static_assert(std::atomic<int>::is_always_lock_free);

extern "C" void record_stop_signal(int signal_number) {
  int none = 0;
  g_stop_signal.compare_exchange_strong(none, signal_number);
}

sigset_t stop_signal_set() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  if (std::getenv("SLURM_JOB_ID") && std::getenv("SLURM_STEP_ID")) sigaddset(&set, SIGTERM);
  return set;
}

}  // namespace

void block_stop_signals() {
  const sigset_t set = stop_signal_set();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
}

void unblock_stop_signals() {
  const sigset_t set = stop_signal_set();
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
}

void watch_stop_signals() {
  static std::once_flag started;
  std::call_once(started, [] {
    const sigset_t set = stop_signal_set();
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    // A thread that a library started before main() blocked the signals would otherwise meet their default
    // action (the process ends); none does today, and such a thread runs none of our kernels.
    struct sigaction action {};
    action.sa_handler = record_stop_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    for (const int signal_number : {SIGUSR1, SIGTERM})
      if (sigismember(&set, signal_number) == 1)
        MPT_CHECK(sigaction(signal_number, &action, nullptr) == 0, "cannot install the {} handler",
                  stop_signal_name(signal_number));
    // Started with the signals blocked (it inherits this thread's mask), as sigwait requires; detached: it
    // only ever touches g_stop_signal, and ends with the process.
    try {
      std::thread([set] {
        pthread_setname_np(pthread_self(), "mpt-stop-signal");  // 15 characters, the most a name may have
        for (;;) {
          int signal_number = 0;
          if (sigwait(&set, &signal_number) == 0) record_stop_signal(signal_number);
        }
      }).detach();
    } catch (const std::system_error& e) {
      MPT_CHECK(false, "cannot start the thread that waits for stop signals: {}", e.what());
    }
  });
}

int stop_signal() {
  return g_stop_signal.load();
}

const char* stop_signal_name(int signal_number) {
  if (signal_number == SIGUSR1) return "SIGUSR1";
  if (signal_number == SIGTERM) return "SIGTERM";
  return "signal";
}

}  // namespace mpt
