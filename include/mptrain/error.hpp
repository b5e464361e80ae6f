// Error types and checking macros shared by every part of mptrain.
//
// Library code reports failures by throwing mpt::Error (or a subclass). Input errors (flags, config, data,
// checkpoints) are InputError, which the executables turn into one line on rank 0 and exit code 2 on every
// rank. The *_CHECK macros evaluate their argument exactly once and report rank, host, file:line, the call as
// text and the library's own message.
#pragma once

#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
// nvcc's host pass cannot compile fmt 9's constexpr format machinery, so .cu files format messages with a
// small run-time "{}" substitution instead (same format strings, no format specs).
#include <sstream>
#include <string_view>
#define MPT_FORMAT(...) ::mpt::detail::format_simple(__VA_ARGS__)
#else
#include <fmt/format.h>
#define MPT_FORMAT(...) ::fmt::format(__VA_ARGS__)
#endif

namespace mpt {

/// Base class of every exception mptrain throws.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

/// Bad user input (flags, config file, data file, checkpoint, world size). Executables exit with code 2.
class InputError : public Error {
 public:
  explicit InputError(const std::string& what) : Error(what) {}
};

/// A numerical condition the run cannot recover from (for example: overflow repeated at the minimum loss
/// scale). Raised identically on every rank because the state that triggers it is replicated.
class NumericsError : public Error {
 public:
  explicit NumericsError(const std::string& what) : Error(what) {}
};

/// A failed call into MPI, CUDA, NCCL or cuBLAS.
class LibraryError : public Error {
 public:
  explicit LibraryError(const std::string& what) : Error(what) {}
};

namespace detail {
/// This machine's host name (gethostname), or "?" when it cannot be read. Never throws.
std::string host_name();
/// "rank R on HOST" for messages; rank is -1 before MPI is initialised. Never throws.
std::string where_am_i();
/// Formats "LIBRARY error at FILE:LINE (rank R on HOST): CALL: MESSAGE". Never throws.
std::string library_error_message(const char* library, const char* file, int line, const char* call,
                                  const std::string& message);
/// Throws LibraryError for a failed MPI call with MPI_Error_string's text for `code`.
[[noreturn]] void throw_mpi_error(int code, const char* file, int line, const char* call);

#if defined(__CUDACC__)
inline void format_simple_into(std::ostringstream& out, std::string_view f) {
  out << f;
}
template <typename A, typename... Rest>
void format_simple_into(std::ostringstream& out, std::string_view f, const A& a, const Rest&... rest) {
  const size_t at = f.find("{}");
  if (at == std::string_view::npos) {
    out << f;
    return;
  }
  out << f.substr(0, at) << a;
  format_simple_into(out, f.substr(at + 2), rest...);
}
/// Replaces each "{}" in `f` by the next argument (operator<<).
template <typename... A>
std::string format_simple(std::string_view f, const A&... args) {
  std::ostringstream out;
  format_simple_into(out, f, args...);
  return out.str();
}
#endif
}  // namespace detail

}  // namespace mpt

/// Throws mpt::Error with a formatted message ({} placeholders) when `cond` is false. Used for internal
/// invariants and argument checks in launchers ("name the bad argument").
#define MPT_CHECK(cond, ...)                                  \
  do {                                                        \
    if (!(cond)) throw ::mpt::Error(MPT_FORMAT(__VA_ARGS__)); \
  } while (0)

/// Throws mpt::InputError with a formatted message when `cond` is false.
#define MPT_INPUT_CHECK(cond, ...)                                 \
  do {                                                             \
    if (!(cond)) throw ::mpt::InputError(MPT_FORMAT(__VA_ARGS__)); \
  } while (0)

/// Evaluates an MPI call once; on anything but MPI_SUCCESS throws mpt::LibraryError naming rank, host,
/// file:line, the call and MPI's message. Requires MPI_ERRORS_RETURN on the communicator used.
#define MPT_MPI_CHECK(call)                                                                       \
  do {                                                                                            \
    const int mpt_mpi_rc_ = (call);                                                               \
    if (mpt_mpi_rc_ != 0) ::mpt::detail::throw_mpi_error(mpt_mpi_rc_, __FILE__, __LINE__, #call); \
  } while (0)
