// The run lock (include/mptrain/run_lock.hpp): who holds it, what a second attempt sees, what the release
// leaves behind, a holder killed with SIGKILL, and file systems without flock.
#include "mptrain/run_lock.hpp"

#include <gtest/gtest.h>
#include <sys/file.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>

#include "mptrain/error.hpp"

namespace fs = std::filesystem;

namespace {

class RunLockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char name[] = "/tmp/mptrain_run_lock_XXXXXX";
    ASSERT_NE(::mkdtemp(name), nullptr);
    dir_ = name;
  }
  void TearDown() override { fs::remove_all(dir_); }

  static std::string read(const fs::path& p) {
    std::ifstream in(p);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
  static void write(const fs::path& p, const std::string& text) {
    std::ofstream out(p);
    out << text;
  }

  fs::path dir_;
};

TEST_F(RunLockTest, HolderTextRoundTripsAndRejectsOtherText) {
  const mpt::LockHolder h{"node7", 4242, 1700000000};
  const auto back = mpt::LockHolder::parse(h.to_text());
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->host, "node7");
  EXPECT_EQ(back->pid, 4242);
  EXPECT_EQ(back->since_unix_seconds, 1700000000);
  EXPECT_NE(h.to_text().find("\"since\":\"2023-11-14T22:13:20Z\""), std::string::npos) << h.to_text();
  EXPECT_FALSE(mpt::LockHolder::parse(""));
  EXPECT_FALSE(mpt::LockHolder::parse("{\"host\":\"a\",\"pid\":1"));  // torn write
  EXPECT_FALSE(mpt::LockHolder::parse("{\"host\":\"a\",\"pid\":\"1\",\"since_unix_seconds\":2}"));
  EXPECT_FALSE(mpt::LockHolder::parse("[1,2]"));
}

TEST_F(RunLockTest, DescribeGivesTheTimeTodayAndTheDateOtherwise) {
  const std::time_t now = std::time(nullptr);
  std::tm local{};
  ::localtime_r(&now, &local);
  char hms[16];
  std::strftime(hms, sizeof(hms), "%H:%M:%S", &local);
  EXPECT_EQ((mpt::LockHolder{"vm", 1234, now}.describe()), std::string("host vm, pid 1234, since ") + hms);
  const std::time_t old = now - 3 * 86400;
  ::localtime_r(&old, &local);
  char full[32];
  std::strftime(full, sizeof(full), "%Y-%m-%d %H:%M:%S", &local);
  EXPECT_EQ((mpt::LockHolder{"vm", 1234, old}.describe()), std::string("host vm, pid 1234, since ") + full);
}

TEST_F(RunLockTest, FirstHoldsSecondSeesTheHolderAndChangesNothing) {
  const fs::path path = dir_ / "runs" / "same" / "lock";
  mpt::RunLock first = mpt::RunLock::try_acquire(path);
  ASSERT_EQ(first.state(), mpt::RunLock::State::held);
  EXPECT_FALSE(first.previous_holder());
  const auto written = mpt::LockHolder::parse(read(path));
  ASSERT_TRUE(written);
  EXPECT_EQ(written->pid, ::getpid());
  const std::string text = read(path);
  const auto mtime = fs::last_write_time(path);
  {
    // flock locks belong to the open file: a second open in the same process conflicts like another job.
    mpt::RunLock second = mpt::RunLock::try_acquire(path);
    EXPECT_EQ(second.state(), mpt::RunLock::State::in_use);
    ASSERT_TRUE(second.holder());
    EXPECT_EQ(second.holder()->pid, ::getpid());
    EXPECT_EQ(second.holder()->host, mpt::LockHolder::current().host);
  }
  EXPECT_EQ(read(path), text);
  EXPECT_EQ(fs::last_write_time(path), mtime);
  EXPECT_EQ(first.state(), mpt::RunLock::State::held);
  EXPECT_EQ(mpt::RunLock::try_acquire(path).state(), mpt::RunLock::State::in_use);  // still held by `first`
}

TEST_F(RunLockTest, AnUnkeptAttemptRemovesWhatItCreated) {
  fs::create_directory(dir_ / "runs");
  {
    EXPECT_EQ(mpt::RunLock::try_acquire(dir_ / "runs" / "a" / "b" / "lock").state(),
              mpt::RunLock::State::held);
  }
  EXPECT_TRUE(fs::exists(dir_ / "runs"));  // it existed before
  EXPECT_FALSE(fs::exists(dir_ / "runs" / "a"));
}

TEST_F(RunLockTest, AnUnkeptAttemptRestoresAFileThatExisted) {
  const fs::path path = dir_ / "lock";
  const std::string stale = mpt::LockHolder{"old", 99, 1700000000}.to_text();
  write(path, stale);
  const auto mtime = fs::last_write_time(path) - std::chrono::hours(5);
  fs::last_write_time(path, mtime);
  {
    mpt::RunLock lock = mpt::RunLock::try_acquire(path);
    ASSERT_EQ(lock.state(), mpt::RunLock::State::held);
    ASSERT_TRUE(lock.previous_holder());
    EXPECT_EQ(lock.previous_holder()->pid, 99);
    EXPECT_EQ(mpt::LockHolder::parse(read(path))->pid, ::getpid());
  }
  EXPECT_EQ(read(path), stale);
  EXPECT_EQ(fs::last_write_time(path), mtime);
}

TEST_F(RunLockTest, AKeptLockRemovesItsFileAndLeavesTheDirectory) {
  const fs::path path = dir_ / "run" / "lock";
  {
    mpt::RunLock lock = mpt::RunLock::try_acquire(path);
    lock.keep();
    mpt::RunLock moved = std::move(lock);  // the moved-from lock releases nothing
    EXPECT_TRUE(fs::exists(path));
  }
  EXPECT_FALSE(fs::exists(path));
  EXPECT_TRUE(fs::is_directory(dir_ / "run"));
  EXPECT_EQ(mpt::RunLock::try_acquire(path).state(), mpt::RunLock::State::held);
}

TEST_F(RunLockTest, AHolderKilledWithSigkillLeavesALockTheNextJobTakesOver) {
  const fs::path path = dir_ / "run" / "lock";
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    mpt::RunLock lock = mpt::RunLock::try_acquire(path);
    lock.keep();
    const char state = lock.state() == mpt::RunLock::State::held ? 'h' : 'x';
    (void)!::write(ready[1], &state, 1);
    for (;;) ::pause();
  }
  char state = 0;
  ASSERT_EQ(::read(ready[0], &state, 1), 1);
  ASSERT_EQ(state, 'h');
  {
    mpt::RunLock busy = mpt::RunLock::try_acquire(path);
    EXPECT_EQ(busy.state(), mpt::RunLock::State::in_use);
    ASSERT_TRUE(busy.holder());
    EXPECT_EQ(busy.holder()->pid, child);
  }
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  ::close(ready[0]);
  ::close(ready[1]);
  EXPECT_TRUE(fs::exists(path));  // no destructor ran: the file stays, the kernel dropped the lock
  mpt::RunLock next = mpt::RunLock::try_acquire(path);
  ASSERT_EQ(next.state(), mpt::RunLock::State::held);
  ASSERT_TRUE(next.previous_holder());
  EXPECT_EQ(next.previous_holder()->pid, child);
}

int fake_flock_enolck(int, int) {
  errno = ENOLCK;
  return -1;
}
int fake_flock_eio(int, int) {
  errno = EIO;
  return -1;
}

TEST_F(RunLockTest, AFileSystemWithoutFlockIsReportedNotFatal) {
  const fs::path path = dir_ / "nfs" / "lock";
  {
    mpt::RunLock lock = mpt::RunLock::try_acquire(path, fake_flock_enolck);
    EXPECT_EQ(lock.state(), mpt::RunLock::State::unsupported);
    EXPECT_EQ(lock.unsupported_reason(), std::strerror(ENOLCK));
    EXPECT_EQ(mpt::LockHolder::parse(read(path))->pid, ::getpid());
  }
  EXPECT_FALSE(fs::exists(dir_ / "nfs"));
}

TEST_F(RunLockTest, OtherFailuresThrowNamingTheFile) {
  const fs::path path = dir_ / "lock";
  try {
    mpt::RunLock::try_acquire(path, fake_flock_eio);
    FAIL() << "no error";
  } catch (const mpt::InputError& e) {
    EXPECT_NE(std::string(e.what()).find(path.string() + ": cannot lock"), std::string::npos) << e.what();
  }
  write(dir_ / "file", "x");
  EXPECT_THROW(mpt::RunLock::try_acquire(dir_ / "file" / "lock"), mpt::InputError);
}

// The holder removes its file between our open and our flock: the lock we get is on a file no longer at the
// path, so the attempt must open the path again (or two jobs would both think they hold the run).
fs::path g_removed_path;
int g_flock_calls = 0;
int flock_after_the_holder_left(int fd, int operation) {
  if (g_flock_calls++ == 0) fs::remove(g_removed_path);
  return ::flock(fd, operation);
}

TEST_F(RunLockTest, AFileRemovedBeforeTheFlockIsOpenedAgain) {
  g_removed_path = dir_ / "lock";
  g_flock_calls = 0;
  write(g_removed_path, mpt::LockHolder{"old", 99, 1700000000}.to_text());
  mpt::RunLock lock = mpt::RunLock::try_acquire(g_removed_path, flock_after_the_holder_left);
  EXPECT_EQ(lock.state(), mpt::RunLock::State::held);
  EXPECT_EQ(g_flock_calls, 2);
  EXPECT_FALSE(lock.previous_holder());  // the new file named nobody
  EXPECT_EQ(mpt::RunLock::try_acquire(g_removed_path).state(), mpt::RunLock::State::in_use);
}

}  // namespace
