// A fuzz input as a file: the readers under test take paths, so each input is written to a per-process
// temporary file first (tests/fuzz).
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace mpt::fuzz {

/// Writes `size` bytes to a file named /tmp/mptrain_fuzz_<pid><suffix> and returns its path (the same path
/// every call of this process, so no files pile up). Aborts when the file cannot be written: that is a
/// broken harness, not a finding.
inline std::string write_input(const uint8_t* data, size_t size, const std::string& suffix) {
  const char* dir = std::getenv("TMPDIR");
  const std::string path = std::string(dir && *dir ? dir : "/tmp") + "/mptrain_fuzz_" +
                           std::to_string(static_cast<long>(::getpid())) + suffix;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || (size > 0 && std::fwrite(data, 1, size, f) != size) || std::fclose(f) != 0)
    std::abort();
  return path;
}

}  // namespace mpt::fuzz
