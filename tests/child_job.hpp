// A child MPI job started from inside a test (the NCCL watchdog tests, tests/child_job_tests.cpp): the
// launcher is found at run time, and the child gets this process's environment minus what describes the
// enclosing job, with the variables that locate a relocated Open MPI (the GPU suite's bundle) kept.
#pragma once

#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "mptrain/error.hpp"

extern char** environ;

namespace mpt::test {

/// The MPI launcher of a child job: $MPT_TEST_MPIEXEC when set (the GPU suite points it at the bundle's
/// mpiexec; throws mpt::Error when it names no executable file), else the launcher CMake found at configure
/// time (MPT_MPIEXEC) when it exists on this machine, else "" with the reason in *why_not (the caller skips).
inline std::string child_launcher(std::string* why_not) {
  if (const char* set = std::getenv("MPT_TEST_MPIEXEC"); set != nullptr && *set != '\0') {
    if (access(set, X_OK) != 0) throw Error(std::string("MPT_TEST_MPIEXEC=") + set + " is not an executable");
    return set;
  }
#ifdef MPT_MPIEXEC
  if (access(MPT_MPIEXEC, X_OK) == 0) return MPT_MPIEXEC;
  *why_not =
      "no MPI launcher: " MPT_MPIEXEC " (found at configure time) is not here and MPT_TEST_MPIEXEC is unset";
#else
  *why_not = "no MPI launcher: MPT_TEST_MPIEXEC is unset";
#endif
  return "";
}

/// Whether the environment entry "NAME=value" goes to a child job. Dropped: what the enclosing launcher or
/// MPI_Init set to describe this job (OMPI_*, PMIX_*, ORTE_*, OPAL_*, PRTE_*; a fresh mpiexec must not see
/// them) and `drop_prefix`. Kept: Open MPI's and PMIx's relocation variables (OPAL_PREFIX, OPAL_*DIR,
/// PMIX_PREFIX, PMIX_*DIR, ...: benchmarks/gpu/env.sh sets them for the bundle's relocated prefix, without
/// them the bundle's mpiexec cannot find its components) and the user settings the tests' runs need (run as
/// root, no single-copy, oversubscribe).
inline bool keep_in_child_env(const std::string& entry, const std::string& drop_prefix) {
  static const char* const kept[] = {
      "OMPI_ALLOW_RUN_AS_ROOT=", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=",
      "OMPI_MCA_btl_vader_single_copy_mechanism=", "OMPI_MCA_rmaps_base_oversubscribe=",
      // Open MPI's installation directories (opal/mca/installdirs/env) and PMIx's
      // (pmix/mca/pinstalldirs/env).
      "OPAL_PREFIX=", "OPAL_EXEC_PREFIX=", "OPAL_BINDIR=", "OPAL_SBINDIR=", "OPAL_LIBEXECDIR=",
      "OPAL_DATAROOTDIR=", "OPAL_DATADIR=", "OPAL_SYSCONFDIR=", "OPAL_SHAREDSTATEDIR=", "OPAL_LOCALSTATEDIR=",
      "OPAL_LIBDIR=", "OPAL_INCLUDEDIR=", "OPAL_INFODIR=", "OPAL_MANDIR=", "OPAL_PKGDATADIR=",
      "OPAL_PKGLIBDIR=", "OPAL_PKGINCLUDEDIR=", "PMIX_PREFIX=", "PMIX_EXEC_PREFIX=", "PMIX_BINDIR=",
      "PMIX_SBINDIR=", "PMIX_LIBEXECDIR=", "PMIX_DATAROOTDIR=", "PMIX_DATADIR=", "PMIX_SYSCONFDIR=",
      "PMIX_SHAREDSTATEDIR=", "PMIX_LOCALSTATEDIR=", "PMIX_LIBDIR=", "PMIX_INCLUDEDIR=", "PMIX_INFODIR=",
      "PMIX_MANDIR=", "PMIX_PKGDATADIR=", "PMIX_PKGLIBDIR=", "PMIX_PKGINCLUDEDIR="};
  for (const char* k : kept)
    if (entry.rfind(k, 0) == 0) return true;
  if (!drop_prefix.empty() && entry.rfind(drop_prefix, 0) == 0) return false;
  for (const char* prefix : {"OMPI_", "PMIX_", "ORTE_", "OPAL_", "PRTE_"})
    if (entry.rfind(prefix, 0) == 0) return false;
  return true;
}

/// How a child job ended.
struct ChildJobResult {
  std::string output;   ///< stdout and stderr of every rank, merged
  bool exited = false;  ///< false: killed after the time limit
  int status = 0;       ///< waitpid status of the launcher
};

/// Runs `launcher -n ranks --oversubscribe --bind-to none <this executable> --gtest_filter=<filter>` with
/// this process's environment (keep_in_child_env, dropping `marker`'s name) plus `marker` ("NAME=value",
/// which the child's test reads). `on_line` sees each complete output line when it arrives. The job (its
/// process group) is killed when it outlives `limit_seconds`. Throws mpt::Error when the launcher cannot be
/// started.
inline ChildJobResult run_child_job(const std::string& launcher, int ranks, const std::string& filter,
                                    const std::string& marker, double limit_seconds,
                                    const std::function<void(const std::string&)>& on_line = {}) {
  ChildJobResult run;
  char self[4096] = {};
  const ssize_t len = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (len <= 0) throw Error("cannot read /proc/self/exe");
  std::vector<std::string> args = {launcher, "-n", std::to_string(ranks),     "--oversubscribe", "--bind-to",
                                   "none",   self, "--gtest_filter=" + filter};
  const std::string marker_name = marker.substr(0, marker.find('=') + 1);
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e)
    if (keep_in_child_env(*e, marker_name)) env.emplace_back(*e);
  env.push_back(marker);
  std::vector<char*> argv, envp;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);

  int fds[2];
  if (pipe(fds) != 0) throw Error("pipe failed");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
  posix_spawn_file_actions_adddup2(&actions, fds[1], 2);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  posix_spawn_file_actions_addclose(&actions, fds[1]);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
  posix_spawnattr_setpgroup(&attr, 0);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, argv[0], &actions, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    throw Error("posix_spawn of " + launcher + " failed: " + std::strerror(rc));
  }

  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto seconds = [&] { return std::chrono::duration<double>(Clock::now() - start).count(); };
  size_t scanned = 0;
  while (seconds() < limit_seconds) {
    pollfd p{fds[0], POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    char chunk[4096];
    const ssize_t got = read(fds[0], chunk, sizeof(chunk));
    if (got <= 0) break;
    run.output.append(chunk, static_cast<size_t>(got));
    for (size_t nl; (nl = run.output.find('\n', scanned)) != std::string::npos; scanned = nl + 1)
      if (on_line) on_line(run.output.substr(scanned, nl - scanned));
  }
  close(fds[0]);
  // The pipe closes when the last process of the job exits; give the launcher itself a few seconds more.
  int status = 0;
  while (seconds() < limit_seconds + 10) {
    if (waitpid(pid, &status, WNOHANG) == pid) {
      run.exited = true;
      run.status = status;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (!run.exited) {
    kill(-pid, SIGKILL);
    waitpid(pid, &status, 0);
  }
  return run;
}

}  // namespace mpt::test
