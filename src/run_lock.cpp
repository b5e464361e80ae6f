// The exclusive run lock (include/mptrain/run_lock.hpp): flock(2) on a file that names its holder.
#include "mptrain/run_lock.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <nlohmann/json.hpp>
#include <thread>
#include <utility>

#include "mptrain/error.hpp"

namespace mpt {

namespace {

std::string errno_text(int error) {
  return std::strerror(error);
}

/// The whole file behind `fd` from offset 0 (empty on a read error).
std::string read_all(int fd) {
  std::string text;
  char buffer[4096];
  for (off_t at = 0;;) {
    const ssize_t n = ::pread(fd, buffer, sizeof(buffer), at);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    text.append(buffer, static_cast<size_t>(n));
    at += n;
  }
  return text;
}

bool write_all(int fd, const std::string& text) {
  if (::ftruncate(fd, 0) != 0) return false;
  for (size_t at = 0; at < text.size();) {
    const ssize_t n = ::pwrite(fd, text.data() + at, text.size() - at, static_cast<off_t>(at));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    at += static_cast<size_t>(n);
  }
  return true;
}

/// The same file: `fd` is still the file at `path` (not one removed or replaced since it was opened).
bool still_at(int fd, const std::filesystem::path& path) {
  struct stat by_fd {};
  struct stat by_path {};
  return ::fstat(fd, &by_fd) == 0 && ::stat(path.c_str(), &by_path) == 0 && by_fd.st_dev == by_path.st_dev &&
         by_fd.st_ino == by_path.st_ino;
}

/// The outermost missing ancestor of `dir` (empty when `dir` exists).
std::filesystem::path outermost_missing(const std::filesystem::path& dir) {
  std::filesystem::path missing;
  std::error_code ec;
  for (std::filesystem::path p = dir; !p.empty() && !std::filesystem::exists(p, ec); p = p.parent_path()) {
    missing = p;
    if (p == p.parent_path()) break;
  }
  return missing;
}

/// The holder a lock file names, read a few times over ~0.5 s: the holder may have taken the lock a moment
/// ago and not yet written its name.
std::optional<LockHolder> read_holder(int fd) {
  for (int attempt = 0; attempt < 10; ++attempt) {
    if (auto holder = LockHolder::parse(read_all(fd))) return holder;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return std::nullopt;
}

bool means_unsupported(int error) {
  return error == ENOLCK || error == EOPNOTSUPP || error == ENOSYS || error == EINVAL;
}

}  // namespace

std::string LockHolder::describe() const {
  try {
    const std::time_t since = static_cast<std::time_t>(since_unix_seconds);
    const std::time_t now = std::time(nullptr);
    std::tm then_tm{};
    std::tm now_tm{};
    ::localtime_r(&since, &then_tm);
    ::localtime_r(&now, &now_tm);
    const bool today = then_tm.tm_year == now_tm.tm_year && then_tm.tm_yday == now_tm.tm_yday;
    char when[64];
    std::strftime(when, sizeof(when), today ? "%H:%M:%S" : "%Y-%m-%d %H:%M:%S", &then_tm);
    return fmt::format("host {}, pid {}, since {}", host, pid, when);
  } catch (...) {
    return "an unnamed job";
  }
}

std::string LockHolder::to_text() const {
  const std::time_t since = static_cast<std::time_t>(since_unix_seconds);
  std::tm utc{};
  ::gmtime_r(&since, &utc);
  char iso[32];
  std::strftime(iso, sizeof(iso), "%Y-%m-%dT%H:%M:%SZ", &utc);
  const nlohmann::json j = {
      {"host", host}, {"pid", pid}, {"since_unix_seconds", since_unix_seconds}, {"since", iso}};
  return j.dump() + "\n";
}

std::optional<LockHolder> LockHolder::parse(std::string_view text) {
  const auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return std::nullopt;
  const auto host = j.find("host");
  const auto pid = j.find("pid");
  const auto since = j.find("since_unix_seconds");
  if (host == j.end() || !host->is_string() || pid == j.end() || !pid->is_number_integer() ||
      since == j.end() || !since->is_number_integer())
    return std::nullopt;
  return LockHolder{host->get<std::string>(), pid->get<int64_t>(), since->get<int64_t>()};
}

LockHolder LockHolder::current() {
  char host[256] = {0};
  if (::gethostname(host, sizeof(host) - 1) != 0) std::snprintf(host, sizeof(host), "?");
  return LockHolder{host, static_cast<int64_t>(::getpid()), static_cast<int64_t>(std::time(nullptr))};
}

RunLock RunLock::try_acquire(const std::filesystem::path& path, FlockCall flock_call) {
  if (flock_call == nullptr) flock_call = ::flock;
  RunLock lock;
  lock.path_ = path;
  lock.created_dirs_from_ = outermost_missing(path.parent_path());
  std::error_code ec;
  if (!path.parent_path().empty()) std::filesystem::create_directories(path.parent_path(), ec);
  MPT_INPUT_CHECK(!ec, "{}: cannot create the directory of the run's lock file ({})", path.string(),
                  ec.message());
  for (;;) {
    // O_EXCL first, so that the undo knows whether this attempt created the file.
    lock.fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    lock.created_file_ = lock.fd_ >= 0;
    if (lock.fd_ < 0 && errno == EEXIST) lock.fd_ = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (lock.fd_ < 0 && errno == ENOENT) continue;  // removed between the two opens
    MPT_INPUT_CHECK(lock.fd_ >= 0, "{}: cannot open the run's lock file ({})", path.string(),
                    errno_text(errno));
    int rc = 0;
    while ((rc = flock_call(lock.fd_, LOCK_EX | LOCK_NB)) != 0 && errno == EINTR) {
    }
    const int error = rc == 0 ? 0 : errno;
    if (error == EWOULDBLOCK) {
      lock.state_ = State::in_use;
      lock.holder_ = read_holder(lock.fd_);
      return lock;  // the destructor closes the file without touching it
    }
    if (error != 0 && !means_unsupported(error))
      throw InputError(
          fmt::format("{}: cannot lock the run's lock file ({})", path.string(), errno_text(error)));
    if (error == 0 && !still_at(lock.fd_, path)) {
      // The holder we waited on removed its file when it let go; the lock of this old file guards nothing.
      ::close(lock.fd_);
      lock.fd_ = -1;
      continue;
    }
    lock.state_ = error == 0 ? State::held : State::unsupported;
    lock.unsupported_reason_ = error == 0 ? "" : errno_text(error);
    break;
  }
  struct stat before {};
  if (::fstat(lock.fd_, &before) == 0) {
    lock.old_times_[0] = before.st_atim;
    lock.old_times_[1] = before.st_mtim;
  }
  lock.old_text_ = read_all(lock.fd_);
  lock.previous_ = LockHolder::parse(lock.old_text_);
  MPT_INPUT_CHECK(write_all(lock.fd_, LockHolder::current().to_text()),
                  "{}: cannot write the run's lock file ({})", path.string(), errno_text(errno));
  return lock;
}

RunLock::RunLock(RunLock&& other) noexcept
    : path_(std::move(other.path_)),
      fd_(std::exchange(other.fd_, -1)),
      state_(other.state_),
      kept_(other.kept_),
      created_file_(other.created_file_),
      created_dirs_from_(std::move(other.created_dirs_from_)),
      old_text_(std::move(other.old_text_)),
      holder_(std::move(other.holder_)),
      previous_(std::move(other.previous_)),
      unsupported_reason_(std::move(other.unsupported_reason_)) {
  old_times_[0] = other.old_times_[0];
  old_times_[1] = other.old_times_[1];
}

RunLock& RunLock::operator=(RunLock&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    fd_ = std::exchange(other.fd_, -1);
    state_ = other.state_;
    kept_ = other.kept_;
    created_file_ = other.created_file_;
    created_dirs_from_ = std::move(other.created_dirs_from_);
    old_text_ = std::move(other.old_text_);
    old_times_[0] = other.old_times_[0];
    old_times_[1] = other.old_times_[1];
    holder_ = std::move(other.holder_);
    previous_ = std::move(other.previous_);
    unsupported_reason_ = std::move(other.unsupported_reason_);
  }
  return *this;
}

RunLock::~RunLock() {
  release();
}

void RunLock::release() noexcept {
  if (fd_ < 0) return;
  if (state_ != State::in_use) {
    // Removed or restored while still locked: a job that opened the file meanwhile finds, once it gets the
    // lock, that its file is no longer the one at the path (still_at) and opens again.
    bool ok = true;
    if (kept_ || created_file_) {
      ok = ::unlink(path_.c_str()) == 0;
    } else {
      ok = write_all(fd_, old_text_) && ::futimens(fd_, old_times_) == 0;
    }
    if (!ok)
      std::fprintf(stderr, "mptrain: warning: %s: cannot release the run's lock file (%s)\n", path_.c_str(),
                   std::strerror(errno));
    if (!kept_ && !created_dirs_from_.empty()) {
      std::error_code ec;
      for (std::filesystem::path dir = path_.parent_path(); !dir.empty(); dir = dir.parent_path()) {
        if (!std::filesystem::remove(dir, ec) || ec || dir == created_dirs_from_) break;
      }
    }
  }
  ::close(fd_);
  fd_ = -1;
}

}  // namespace mpt
