// The files a user names as inputs (a config, a token shard, a SentencePiece model, a text file
// to tokenize) are read only when they are regular files. Anything else ends at once with one
// line (UserError, exit code 2) instead of blocking or reading forever: open() of a FIFO blocks
// until a writer appears, /dev/zero never ends, a directory cannot be read as a file.
//
// Messages name the input, the path and what is wrong, e.g.
//   config /dev/zero: expected a regular file, got a character device
//   token shard data/x.shard: cannot open (No such file or directory)
//   config big.yaml: 5000000 bytes, more than the 1048576 a config may have
#pragma once
#include <cstdint>
#include <string>

namespace switcht5 {

// Throws UserError unless `path` (symbolic links followed) is an existing regular file.
// `what` names the input in the message ("config", "token shard", ...).
void require_regular_file(const std::string& path, const std::string& what);

// Opens `path` read-only after the checks of require_regular_file and returns the descriptor
// (close-on-exec; the caller closes it). The descriptor itself is checked again, so a FIFO put
// in the file's place between the check and the open is refused too, never waited on.
int open_regular_file(const std::string& path, const std::string& what);

// The whole content of a regular file of at most `max_bytes` bytes; a larger file is refused
// before it is read.
std::string read_regular_file(const std::string& path, const std::string& what, uint64_t max_bytes);

}  // namespace switcht5
