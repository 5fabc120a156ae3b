// Reads a text file line by line, gzip-compressed or plain: zlib's gzread passes a file that
// does not start with the gzip magic through unchanged, and reads concatenated gzip members.
// A truncated or corrupt gzip stream is a UserError naming the file, e.g.
// "c4/x.json.gz: truncated gzip stream (unexpected end of file)".
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace switcht5::data_tools {

class LineReader {
 public:
  // Opens path; a missing or unreadable file, or anything but a regular file, is a UserError.
  explicit LineReader(const std::string& path);
  ~LineReader();
  LineReader(const LineReader&) = delete;
  LineReader& operator=(const LineReader&) = delete;

  // The next line without its '\n' (a trailing '\r' is kept: JSON treats it as whitespace).
  // Returns false at the end of the file; a last line without '\n' is still returned.
  bool next(std::string* line);
  // 1-based number of the line last returned by next().
  uint64_t line_number() const { return line_number_; }
  // Bytes of the file (compressed, for gzip) consumed so far: progress against the file size.
  uint64_t file_bytes_read() const;
  const std::string& path() const { return path_; }

 private:
  bool refill();

  std::string path_;
  void* gz_ = nullptr;  // gzFile
  std::vector<char> buf_;
  size_t begin_ = 0, end_ = 0;
  bool eof_ = false;
  uint64_t line_number_ = 0;
};

}  // namespace switcht5::data_tools
