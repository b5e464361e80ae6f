// Message formatting for mptrain's error macros (rank and host of the failing process).
#include "mptrain/error.hpp"

#include <unistd.h>

#include <mpi.h>

namespace mpt::detail {

std::string host_name() {
  char host[256] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0) return "?";
  try {
    return host;
  } catch (...) {
    return "?";
  }
}

std::string where_am_i() {
  int initialized = 0;
  int finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  int rank = -1;
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  try {
    return fmt::format("rank {} on {}", rank, host_name());
  } catch (...) {
    return "rank ? on ?";
  }
}

std::string library_error_message(const char* library, const char* file, int line, const char* call,
                                  const std::string& message) {
  try {
    return fmt::format("{} error at {}:{} ({}): {}: {}", library, file, line, where_am_i(), call, message);
  } catch (...) {
    return "library error (message formatting failed)";
  }
}

void throw_mpi_error(int code, const char* file, int line, const char* call) {
  char text[MPI_MAX_ERROR_STRING] = {0};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
  throw LibraryError(library_error_message("MPI", file, line, call, std::string(text, length)));
}

}  // namespace mpt::detail
