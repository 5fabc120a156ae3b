#include "core/input_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "core/check.h"

namespace switcht5 {

namespace {

const char* kind_of(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISSOCK(mode)) return "a socket";
  return "something else";
}

[[noreturn]] void fail_open(const std::string& path, const std::string& what, int err) {
  // A dangling symbolic link reports ENOENT, as a missing file does; say which it is.
  struct stat link {};
  if (err == ENOENT && ::lstat(path.c_str(), &link) == 0 && S_ISLNK(link.st_mode))
    throw UserError(fmt::format("{} {}: cannot open (a symbolic link to a missing file)", what, path));
  throw UserError(fmt::format("{} {}: cannot open ({})", what, path, std::strerror(err)));
}

void check_kind(const std::string& path, const std::string& what, mode_t mode) {
  SWT_USER_CHECK(S_ISREG(mode), "{} {}: expected a regular file, got {}", what, path, kind_of(mode));
}

}  // namespace

void require_regular_file(const std::string& path, const std::string& what) {
  SWT_USER_CHECK(!path.empty(), "{}: the path is empty", what);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) fail_open(path, what, errno);
  check_kind(path, what, st.st_mode);
}

int open_regular_file(const std::string& path, const std::string& what) {
  require_regular_file(path, what);
  // O_NONBLOCK: open() of a FIFO swapped in after the check returns at once instead of waiting
  // for a writer; the fstat below then refuses it. O_NOCTTY: a terminal never becomes ours.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) fail_open(path, what, errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail_open(path, what, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    check_kind(path, what, st.st_mode);
  }
  // Reads of a regular file do not block either way; the descriptor is handed out as a plain one.
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}

std::string read_regular_file(const std::string& path, const std::string& what, uint64_t max_bytes) {
  const int fd = open_regular_file(path, what);
  std::string text;
  struct stat st {};
  uint64_t size = ::fstat(fd, &st) == 0 ? uint64_t(st.st_size) : 0;
  int err = 0;
  if (size <= max_bytes) {
    // Read to the end, but never past one byte over the limit: a file that grew since the
    // fstat is caught too.
    text.reserve(size_t(size) + 1);
    char chunk[65536];
    for (;;) {
      const size_t want = size_t(std::min<uint64_t>(sizeof chunk, max_bytes + 1 - text.size()));
      const ssize_t n = ::read(fd, chunk, want);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) err = errno;
      if (n <= 0) break;
      text.append(chunk, size_t(n));
      if (text.size() > max_bytes) break;
    }
    size = text.size();
  }
  ::close(fd);
  SWT_USER_CHECK(err == 0, "{} {}: cannot read ({})", what, path, std::strerror(err));
  SWT_USER_CHECK(size <= max_bytes, "{} {}: {} bytes, more than the {} bytes a {} may have", what,
                 path, size, max_bytes, what);
  return text;
}

}  // namespace switcht5
