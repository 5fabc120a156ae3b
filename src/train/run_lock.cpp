#include "train/run_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "core/check.h"

namespace switcht5 {

RunDirLock::RunDirLock(const std::string& run_dir) {
  const std::string path = run_dir + "/" + kFileName;
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  SWT_USER_CHECK(fd_ >= 0, "{}: cannot create the run directory's lock file: {}", path,
                 std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char holder[256] = {};
    const ssize_t n = ::pread(fd_, holder, sizeof holder - 1, 0);
    ::close(fd_);
    fd_ = -1;
    std::string who = n > 0 ? std::string(holder, size_t(n)) : std::string();
    while (!who.empty() && (who.back() == '\n' || who.back() == ' ')) who.pop_back();
    SWT_USER_CHECK(err != EWOULDBLOCK,
                   "run directory {} is in use by another switcht5 train ({}; lock file {}): use "
                   "another --run-dir, or stop that run first",
                   run_dir, who.empty() ? "holder unknown" : who, path);
    SWT_USER_CHECK(false, "{}: cannot lock the run directory: {}", path, std::strerror(err));
  }
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  const std::string me = "pid " + std::to_string(::getpid()) + " on " + host + "\n";
  // Best effort: the lock is what matters, the text only names the holder in a message.
  if (::ftruncate(fd_, 0) == 0) (void)!::pwrite(fd_, me.data(), me.size(), 0);
}

RunDirLock::~RunDirLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

}  // namespace switcht5
