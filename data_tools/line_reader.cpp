#include "line_reader.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <zlib.h>

#include "core/check.h"
#include "core/input_file.h"

namespace switcht5::data_tools {

namespace {
constexpr size_t kChunk = 1 << 20;  // decompressed bytes per gzread
}

LineReader::LineReader(const std::string& path) : path_(path), buf_(kChunk) {
  // Only a regular file: a FIFO or a device in a glob's matches fails here instead of blocking.
  const int fd = open_regular_file(path, "input");
  errno = 0;
  gzFile gz = ::gzdopen(fd, "rb");  // owns fd from here: gzclose_r closes it
  if (gz == nullptr) {
    const int err = errno;
    ::close(fd);
    SWT_USER_CHECK(false, "input {}: cannot open ({})", path,
                   err ? std::strerror(err) : "out of memory");
  }
  ::gzbuffer(gz, 256 * 1024);
  gz_ = gz;
}

LineReader::~LineReader() {
  if (gz_) ::gzclose_r(static_cast<gzFile>(gz_));
}

uint64_t LineReader::file_bytes_read() const {
  const z_off_t off = ::gzoffset(static_cast<gzFile>(gz_));
  return off < 0 ? 0 : uint64_t(off);
}

// Moves the unread tail to the front and appends the next chunk; false at end of file.
bool LineReader::refill() {
  if (eof_) return false;
  if (begin_ > 0) {
    std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  if (buf_.size() - end_ < kChunk) buf_.resize(end_ + kChunk);  // a line longer than a chunk
  auto* gz = static_cast<gzFile>(gz_);
  const int got = ::gzread(gz, buf_.data() + end_, static_cast<unsigned>(kChunk));
  int err = Z_OK;
  std::string msg = ::gzerror(gz, &err);
  if (got < 0 || (err != Z_OK && err != Z_STREAM_END)) {
    // zlib prefixes its name for the file, "<fd:3>" for one opened by gzdopen; ours is the path.
    if (msg.rfind("<fd:", 0) == 0 && msg.find(">: ") != std::string::npos)
      msg.erase(0, msg.find(">: ") + 3);
    if (err == Z_ERRNO)
      SWT_USER_CHECK(false, "{}: read error: {}", path_, std::strerror(errno));
    if (err == Z_BUF_ERROR)
      SWT_USER_CHECK(false, "{}: truncated gzip stream ({})", path_, msg);
    SWT_USER_CHECK(false, "{}: corrupt gzip stream ({})", path_, msg);
  }
  if (got == 0) {
    eof_ = true;
    return false;
  }
  end_ += size_t(got);
  return true;
}

bool LineReader::next(std::string* line) {
  size_t scan_from = begin_;
  for (;;) {
    const void* nl = std::memchr(buf_.data() + scan_from, '\n', end_ - scan_from);
    if (nl) {
      const size_t at = static_cast<const char*>(nl) - buf_.data();
      line->assign(buf_.data() + begin_, at - begin_);
      begin_ = at + 1;
      ++line_number_;
      return true;
    }
    const size_t scanned = end_ - begin_;
    if (!refill()) {
      if (begin_ == end_) return false;
      line->assign(buf_.data() + begin_, end_ - begin_);  // last line, no '\n'
      begin_ = end_;
      ++line_number_;
      return true;
    }
    scan_from = begin_ + scanned;
  }
}

}  // namespace switcht5::data_tools
