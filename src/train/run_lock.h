// One run per directory: rank 0 of a training run holds an exclusive advisory lock (flock) on
// RUN_DIR/.switcht5.lock from before it writes anything there until the run ends, so a second
// trainer started on the same directory by mistake stops with a clear error instead of
// interleaving metrics.jsonl and overwriting the first one's checkpoints. The file holds the
// holder's PID and host name, for the message. The lock goes with the process (a crashed or
// killed run leaves no stale lock; the file itself stays and is reused).
#pragma once
#include <string>

namespace switcht5 {

class RunDirLock {
 public:
  // Takes the lock on `run_dir` (which must exist), or throws UserError naming the directory
  // and the PID and host that hold it.
  explicit RunDirLock(const std::string& run_dir);
  ~RunDirLock();
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;

  static constexpr const char* kFileName = ".switcht5.lock";

 private:
  int fd_ = -1;
};

}  // namespace switcht5
