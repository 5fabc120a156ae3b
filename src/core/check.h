// One error path (STYLE habit 6): SWT_CHECK throws switcht5::Error carrying file:line and a message
// a user can act on; main() catches it, prints it (tagged with the rank once there are ranks) and
// exits non-zero. User-input errors (config, CLI, data files) throw UserError, which main maps to
// exit code 2.
#pragma once
#include <stdexcept>
#include <string>

#include <fmt/format.h>

namespace switcht5 {

// An internal invariant broke or a runtime operation failed.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The user gave something invalid (config key, CLI flag, input file). Exit code 2.
struct UserError : Error {
  using Error::Error;
};

// A UserError that every rank raises together, having agreed on it through a collective (the
// run directory is locked, a location is not writable): rank 0 alone reports it, and every
// rank exits 2 on its own, with no abort of the job.
struct AgreedUserError : UserError {
  using UserError::UserError;
};

[[noreturn]] void throw_check_failure(const char* file, int line, const char* cond, const std::string& msg);

}  // namespace switcht5

// SWT_CHECK(cond, "fmt {}", args...): internal invariant, reported with file:line.
#define SWT_CHECK(cond, ...)                                                                   \
  do {                                                                                         \
    if (!(cond)) ::switcht5::throw_check_failure(__FILE__, __LINE__, #cond,                     \
                                                 ::fmt::format(__VA_ARGS__));                  \
  } while (0)

// SWT_USER_CHECK(cond, "fmt", args...): a bad user input; the message alone is shown to the user.
#define SWT_USER_CHECK(cond, ...)                                                              \
  do {                                                                                         \
    if (!(cond)) throw ::switcht5::UserError(::fmt::format(__VA_ARGS__));                      \
  } while (0)
