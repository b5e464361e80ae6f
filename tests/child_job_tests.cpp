// The child-job machinery of tests/child_job.hpp, linked into test_comm_mpi and test_comm_nccl: the launcher
// found at run time starts a 2-rank job of this executable from inside this one, with the environment the
// NCCL watchdog tests give theirs. Needs no GPU, so a machine without one (and the GPU suite's offline check,
// with only the bundle's libraries and its mpiexec) proves that the watchdog tests can start their job.
#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include <gtest/gtest.h>

#include "child_job.hpp"

namespace mpt {
namespace {

// The child job's side: reports its rank and the job size (skipped unless started by the test below).
TEST(ChildJobChild, ReportsRankAndSize) {
  if (!std::getenv("MPT_CHILD_JOB")) GTEST_SKIP() << "runs only as the child job of ChildJob tests";
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  std::printf("child job: rank %d of %d\n", rank, size);
  std::fflush(stdout);
}

TEST(ChildJob, TheLauncherStartsAJobFromInsideThisOne) {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size != 1) GTEST_SKIP() << "starts its own job; runs as a single rank";
  std::string why_not;
  const std::string launcher = test::child_launcher(&why_not);
  if (launcher.empty()) GTEST_SKIP() << why_not;
  const test::ChildJobResult run = test::run_child_job(launcher, 2, "ChildJobChild.*", "MPT_CHILD_JOB=1", 60);
  ASSERT_TRUE(run.exited) << launcher << " was still running after 60 s\n" << run.output;
  EXPECT_TRUE(WIFEXITED(run.status) && WEXITSTATUS(run.status) == 0) << launcher << "\n" << run.output;
  EXPECT_NE(run.output.find("child job: rank 0 of 2"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("child job: rank 1 of 2"), std::string::npos) << run.output;
}

}  // namespace
}  // namespace mpt
