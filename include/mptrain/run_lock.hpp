// The exclusive lock of a training run: one job at a time writes a run's checkpoints and metrics.
//
// The lock is flock(2) on a file (runs/NAME/lock, or DIR/lock for --checkpoint-dir DIR). The kernel drops it
// when the holding process ends in any way, so a crashed job never blocks a restart; the file itself names
// the holder (host, pid, start time) so that a second job can say which job it collided with. A file
// system without working flock (some network file systems) is reported, not fatal.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

namespace mpt {

/// The job that holds (or last held) a run lock, as its lock file records it.
struct LockHolder {
  std::string host;
  int64_t pid = 0;
  int64_t since_unix_seconds = 0;  ///< when the job took the lock (seconds since the epoch, UTC)

  /// "host vm, pid 1234, since 12:00:03": the time in local time, with the date in front when it is not
  /// today's ("since 2026-12-05 12:00:03"). Never throws.
  std::string describe() const;
  /// The lock file's contents: one JSON object on one line ({"host","pid","since_unix_seconds","since"};
  /// "since" is the UTC time in ISO 8601 for people reading the file).
  std::string to_text() const;
  /// Parses to_text()'s output; std::nullopt for anything else (an empty file, a torn write, other text).
  static std::optional<LockHolder> parse(std::string_view text);
  /// This process: gethostname(2), getpid(2) and the time now.
  static LockHolder current();
};

/// The flock(2) entry point RunLock calls: ::flock, or a stand-in in tests (a file system without locks).
using FlockCall = int (*)(int fd, int operation);

/// One attempt at a run's lock. Move-only; the destructor releases what the attempt took (see keep()).
class RunLock {
 public:
  enum class State {
    held,         ///< this process holds the lock; the file names this process
    in_use,       ///< another process holds it; holder() says which when its file says so
    unsupported,  ///< flock failed with ENOLCK, EOPNOTSUPP, ENOSYS or EINVAL: no lock, the run goes on
  };

  /// Tries once, without waiting, to take an exclusive flock on `path`, creating the file and its missing
  /// parent directories. held: the file now holds LockHolder::current() (the previous contents, if they
  /// named a job, are in previous_holder()). in_use: nothing is created or changed (the file already
  /// existed). unsupported: the file is created as for held; unsupported_reason() is strerror's text.
  /// A file replaced or removed between open and flock (another job giving up its attempt) is opened
  /// again. Throws mpt::InputError naming `path` when the directories or the file cannot be created or
  /// opened, or flock fails otherwise.
  static RunLock try_acquire(const std::filesystem::path& path, FlockCall flock_call = nullptr);

  RunLock(RunLock&& other) noexcept;
  RunLock& operator=(RunLock&& other) noexcept;
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;
  /// Releases the attempt. After keep(): removes the lock file (a clean end leaves no lock file behind; a
  /// crash leaves one that the next job takes over). Without keep(): undoes the attempt, so that a job that
  /// stops in its set-up leaves the run as it found it: a lock file it created is removed with the parent
  /// directories it created (when empty), a file that existed gets its contents and mtime back. Never
  /// throws; a failure is logged to stderr.
  ~RunLock();

  State state() const { return state_; }
  const std::filesystem::path& path() const { return path_; }
  /// The job named by the file when the state is in_use (std::nullopt when the file names none).
  const std::optional<LockHolder>& holder() const { return holder_; }
  /// held: the job named by the file before this one took it over (a job that was killed), if any.
  const std::optional<LockHolder>& previous_holder() const { return previous_; }
  /// unsupported: flock's error text ("No locks available").
  const std::string& unsupported_reason() const { return unsupported_reason_; }
  /// Marks the run as started: from now on the destructor removes the lock file instead of undoing.
  void keep() { kept_ = true; }

 private:
  RunLock() = default;
  void release() noexcept;

  std::filesystem::path path_;
  int fd_ = -1;
  State state_ = State::in_use;
  bool kept_ = false;
  bool created_file_ = false;
  std::filesystem::path created_dirs_from_;  ///< the outermost directory this attempt created (empty: none)
  std::string old_text_;                     ///< the file's contents before this job wrote its own
  struct timespec old_times_[2] = {};        ///< the file's atime and mtime before
  std::optional<LockHolder> holder_, previous_;
  std::string unsupported_reason_;
};

}  // namespace mpt
