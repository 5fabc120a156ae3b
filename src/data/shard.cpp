// Token shard reader (pread), writer (temporary file + rename) and glob expansion; the format is
// described in shard.h.
#include "data/shard.h"

#include <fcntl.h>
#include <glob.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <utility>

#include <zlib.h>

#include "core/check.h"
#include "core/input_file.h"

namespace switcht5 {

static_assert(std::endian::native == std::endian::little,
              "token shards are little-endian and read without byte swapping");

namespace {

// Header layout (shard.h): byte offsets of the fields.
constexpr size_t kVersionAt = 8, kTokenBytesAt = 12, kVocabAt = 16, kDocsAt = 24, kTokensAt = 32,
                 kChecksumAt = 40;

template <class T>
T load(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <class T>
void store(unsigned char* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}

// zlib's crc32 takes a uInt length; feed it in chunks so any size works.
uint32_t crc32_update(uint32_t crc, const void* data, size_t n) {
  const auto* p = static_cast<const Bytef*>(data);
  while (n > 0) {
    const uInt chunk = static_cast<uInt>(std::min<size_t>(n, 1u << 30));
    crc = static_cast<uint32_t>(::crc32(crc, p, chunk));
    p += chunk;
    n -= chunk;
  }
  return crc;
}

uint32_t token_bytes_for_vocab(uint64_t vocab_size) { return vocab_size <= 65536 ? 2 : 4; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// ShardReader

namespace {

int64_t mtime_ns(const struct stat& st) {
  return int64_t(st.st_mtim.tv_sec) * 1000000000 + int64_t(st.st_mtim.tv_nsec);
}

// What scan() and check_offsets() read at once.
constexpr size_t kReadChunkBytes = size_t(1) << 20;

}  // namespace

ShardReader::ShardReader(const std::string& path, bool verify_contents) : path_(path) {
  fd_ = open_regular_file(path, "token shard");
  try {
    struct stat st {};
    SWT_USER_CHECK(::fstat(fd_, &st) == 0, "{}: cannot stat the token shard: {}", path,
                   std::strerror(errno));
    file_bytes_ = static_cast<uint64_t>(st.st_size);
    mtime_ns_ = mtime_ns(st);
    SWT_USER_CHECK(file_bytes_ >= kShardHeaderBytes,
                   "{}: truncated file ({} bytes, shorter than the {}-byte header)", path,
                   file_bytes_, kShardHeaderBytes);
    unsigned char base[kShardHeaderBytes];
    read_at(0, base, sizeof(base));
    SWT_USER_CHECK(std::memcmp(base, kShardMagic, sizeof(kShardMagic)) == 0,
                   "{}: bad magic (not a switcht5 token shard)", path);
    header_.version = load<uint32_t>(base + kVersionAt);
    header_.token_bytes = load<uint32_t>(base + kTokenBytesAt);
    header_.vocab_size = load<uint64_t>(base + kVocabAt);
    header_.num_documents = load<uint64_t>(base + kDocsAt);
    header_.num_tokens = load<uint64_t>(base + kTokensAt);
    header_.checksum = load<uint64_t>(base + kChecksumAt);
    SWT_USER_CHECK(header_.version == kShardVersion,
                   "{}: unsupported shard version {} (this build reads version {})", path,
                   header_.version, kShardVersion);
    SWT_USER_CHECK(header_.token_bytes == 2 || header_.token_bytes == 4,
                   "{}: token_bytes is {} (must be 2 or 4)", path, header_.token_bytes);
    SWT_USER_CHECK(header_.vocab_size > 0 && header_.token_bytes == token_bytes_for_vocab(header_.vocab_size),
                   "{}: token_bytes {} does not fit vocab_size {} (2 when vocab_size <= 65536, else 4)",
                   path, header_.token_bytes, header_.vocab_size);
    // Expected size, guarding against overflow from a corrupt header.
    const uint64_t max_count = std::numeric_limits<uint64_t>::max() / 16;
    SWT_USER_CHECK(header_.num_documents < max_count && header_.num_tokens < max_count,
                   "{}: truncated file (header claims {} documents and {} tokens, file has {} bytes)",
                   path, header_.num_documents, header_.num_tokens, file_bytes_);
    const uint64_t offsets_bytes = 8 * (header_.num_documents + 1);
    const uint64_t tokens_bytes = uint64_t(header_.token_bytes) * header_.num_tokens;
    const uint64_t expected = kShardHeaderBytes + offsets_bytes + tokens_bytes;
    SWT_USER_CHECK(file_bytes_ == expected,
                   "{}: {} file (size {} bytes does not match the header's {} documents and {} "
                   "tokens, which need {} bytes)",
                   path, file_bytes_ < expected ? "truncated" : "oversized", file_bytes_,
                   header_.num_documents, header_.num_tokens, expected);
    // Offsets are checked always (cheap); the checksum and token ids only with verify_contents,
    // which reads every byte.
    check_offsets();
    if (verify_contents) check_scan(scan());
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

ShardReader::~ShardReader() {
  if (fd_ >= 0) ::close(fd_);
}

ShardReader::ShardReader(ShardReader&& o) noexcept
    : path_(std::move(o.path_)),
      header_(o.header_),
      fd_(std::exchange(o.fd_, -1)),
      file_bytes_(o.file_bytes_),
      mtime_ns_(o.mtime_ns_) {}

ShardReader& ShardReader::operator=(ShardReader&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    path_ = std::move(o.path_);
    header_ = o.header_;
    fd_ = std::exchange(o.fd_, -1);
    file_bytes_ = o.file_bytes_;
    mtime_ns_ = o.mtime_ns_;
  }
  return *this;
}

void ShardReader::read_at(uint64_t offset, void* out, size_t n) const {
  auto* dst = static_cast<unsigned char*>(out);
  size_t got = 0;
  while (got < n) {
    const ssize_t r = ::pread(fd_, dst + got, n - got, off_t(offset + got));
    if (r < 0 && errno == EINTR) continue;
    SWT_USER_CHECK(r >= 0, "{}: read error at byte {} of the token shard: {}", path_, offset + got,
                   std::strerror(errno));
    if (r == 0) break;
    got += size_t(r);
  }
  // A read of a part cut off since the open comes back short.
  if (got < n) check_unchanged();
  SWT_CHECK(got == n, "{}: short read of an unchanged token shard ({} of {} bytes at {})", path_,
            got, n, offset);
}

void ShardReader::check_unchanged() const {
  struct stat st {};
  const bool stat_ok = ::fstat(fd_, &st) == 0;
  const auto now = static_cast<uint64_t>(st.st_size);
  if (stat_ok && now == file_bytes_ && mtime_ns(st) == mtime_ns_) return;
  SWT_USER_CHECK(stat_ok, "{}: cannot stat the token shard: {}", path_, std::strerror(errno));
  throw UserError(fmt::format(
      "{}: the token shard changed while in use ({}); a shard must stay as it is while a run "
      "reads it",
      path_,
      now < file_bytes_   ? fmt::format("truncated to {} bytes from {}", now, file_bytes_)
      : now != file_bytes_ ? fmt::format("{} bytes now, {} when opened", now, file_bytes_)
                           : std::string("rewritten since it was opened")));
}

void ShardReader::check_offsets() const {
  // In chunks of the table, carrying the previous offset across chunk borders.
  const uint64_t D = header_.num_documents;
  std::vector<uint64_t> chunk(kReadChunkBytes / 8);
  uint64_t previous = 0;
  for (uint64_t first = 0; first <= D; first += chunk.size()) {
    const uint64_t n = std::min<uint64_t>(chunk.size(), D + 1 - first);
    read_at(kShardHeaderBytes + 8 * first, chunk.data(), 8 * n);
    if (first == 0)
      SWT_USER_CHECK(chunk[0] == 0, "{}: corrupt document offsets (offsets[0] = {}, must be 0)",
                     path_, chunk[0]);
    for (uint64_t i = 0; i < n; ++i) {
      SWT_USER_CHECK(previous <= chunk[i],
                     "{}: corrupt document offsets (not monotonic at document {}: {} > {})", path_,
                     first + i - 1, previous, chunk[i]);
      previous = chunk[i];
    }
  }
  SWT_USER_CHECK(previous == header_.num_tokens,
                 "{}: corrupt document offsets (last offset {} != num_tokens {})", path_, previous,
                 header_.num_tokens);
  check_unchanged();
}

std::vector<uint64_t> ShardReader::read_offsets() const {
  std::vector<uint64_t> offsets(header_.num_documents + 1);
  read_at(kShardHeaderBytes, offsets.data(), 8 * offsets.size());
  check_unchanged();
  return offsets;
}

uint64_t ShardReader::doc_begin(uint64_t d) const {
  SWT_CHECK(d <= header_.num_documents, "{}: document {} of {}", path_, d, header_.num_documents);
  uint64_t begin = 0;
  read_at(kShardHeaderBytes + 8 * d, &begin, 8);
  check_unchanged();
  return begin;
}

uint64_t ShardReader::doc_length(uint64_t d) const {
  SWT_CHECK(d < header_.num_documents, "{}: document {} of {}", path_, d, header_.num_documents);
  uint64_t range[2];
  read_at(kShardHeaderBytes + 8 * d, range, sizeof(range));
  check_unchanged();
  return range[1] - range[0];
}

int32_t ShardReader::token(uint64_t i) const {
  int32_t t = 0;
  copy_tokens(i, 1, &t);
  check_unchanged();
  return t;
}

void ShardReader::copy_tokens(uint64_t begin, uint64_t n, int32_t* out) const {
  SWT_CHECK(begin <= header_.num_tokens && n <= header_.num_tokens - begin,
            "{}: tokens [{}, {}) are outside the shard's {} tokens", path_, begin, begin + n,
            header_.num_tokens);
  const uint64_t tokens_at = kShardHeaderBytes + 8 * (header_.num_documents + 1);
  const size_t width = header_.token_bytes;
  // The file's tokens land in the first n * width bytes of `out` and widen to int32 in place.
  // For width 2 that goes from the last token down: token i's int32 takes bytes [4i, 4i + 4),
  // and the tokens not yet widened all lie below byte 2i.
  auto* bytes = reinterpret_cast<unsigned char*>(out);
  read_at(tokens_at + begin * width, bytes, size_t(n) * width);
  if (width == 2) {
    for (uint64_t i = n; i-- > 0;) out[i] = int32_t(load<uint16_t>(bytes + 2 * i));
  } else {
    for (uint64_t i = 0; i < n; ++i) out[i] = int32_t(load<uint32_t>(bytes + 4 * i));
  }
}

ShardScan ShardReader::scan() const {
  ShardScan s;
  uint32_t crc = static_cast<uint32_t>(::crc32(0, nullptr, 0));
  const uint64_t tokens_at = kShardHeaderBytes + 8 * (header_.num_documents + 1);
  std::vector<unsigned char> chunk(kReadChunkBytes);
  // Chunks start kShardHeaderBytes + k * kReadChunkBytes into the file; the offsets table is a
  // multiple of 8 bytes, so every chunk's tokens start on a token boundary.
  for (uint64_t at = kShardHeaderBytes; at < file_bytes_; at += chunk.size()) {
    const size_t n = size_t(std::min<uint64_t>(chunk.size(), file_bytes_ - at));
    read_at(at, chunk.data(), n);
    crc = crc32_update(crc, chunk.data(), n);
    if (at + n <= tokens_at) continue;
    const size_t from = size_t(std::max(at, tokens_at) - at);
    if (header_.token_bytes == 2) {
      for (size_t i = from; i < n; i += 2)
        s.max_token = std::max<uint64_t>(s.max_token, load<uint16_t>(chunk.data() + i));
    } else {
      for (size_t i = from; i < n; i += 4)
        s.max_token = std::max<uint64_t>(s.max_token, load<uint32_t>(chunk.data() + i));
    }
  }
  check_unchanged();
  s.checksum = crc;
  return s;
}

void ShardReader::check_scan(const ShardScan& s) const {
  SWT_USER_CHECK(s.checksum == header_.checksum,
                 "{}: checksum mismatch (header {:08x}, data {:08x}): the file is corrupt", path_,
                 header_.checksum, s.checksum);
  SWT_USER_CHECK(header_.num_tokens == 0 || s.max_token < header_.vocab_size,
                 "{}: token id {} is outside the vocabulary (vocab_size {})", path_, s.max_token,
                 header_.vocab_size);
}

// ---------------------------------------------------------------------------------------------
// ShardWriter
//
// The offsets table precedes the tokens but its length is known only at the end, so tokens are
// streamed to a side file "<path>.tmp.tokens" while the offsets stay in memory (8 bytes per
// document). finish() writes header + offsets to "<path>.tmp", appends the tokens, fsyncs and
// renames. Memory stays bounded for C4-sized shards (~150M tokens per file).

struct ShardWriter::Impl {
  std::string path, tmp_path, tokens_path;
  uint64_t vocab_size = 0;
  uint32_t token_bytes = 2;
  std::vector<uint64_t> offsets{0};
  std::FILE* tokens_file = nullptr;
  std::vector<unsigned char> buffer;  // one document's tokens at token width
  bool finished = false;

  void remove_temporaries() {
    if (tokens_file) std::fclose(tokens_file);
    tokens_file = nullptr;
    std::remove(tokens_path.c_str());
    std::remove(tmp_path.c_str());
  }
};

namespace {

// A failed write (a full disk, a quota, a storage error) is for the user to fix: UserError.
void write_all(std::FILE* f, const void* data, size_t n, const std::string& path) {
  if (n > 0 && std::fwrite(data, 1, n, f) != n)
    throw UserError(fmt::format("{}: write failed: {}", path, std::strerror(errno)));
}

}  // namespace

ShardWriter::ShardWriter(const std::string& path, uint64_t vocab_size) : impl_(new Impl) {
  SWT_CHECK(vocab_size > 0 && vocab_size <= (uint64_t(1) << 32), "{}: vocab_size {} out of range",
            path, vocab_size);
  impl_->path = path;
  impl_->tmp_path = path + ".tmp";
  impl_->tokens_path = path + ".tmp.tokens";
  impl_->vocab_size = vocab_size;
  impl_->token_bytes = token_bytes_for_vocab(vocab_size);
  impl_->tokens_file = std::fopen(impl_->tokens_path.c_str(), "wb");
  if (!impl_->tokens_file) {
    const std::string err = std::strerror(errno);
    delete impl_;
    SWT_USER_CHECK(false, "{}: cannot create {}: {}", path, path + ".tmp.tokens", err);
  }
}

ShardWriter::~ShardWriter() {
  if (!impl_->finished) impl_->remove_temporaries();
  delete impl_;
}

void ShardWriter::add_document(const int32_t* tokens, size_t n) {
  Impl& s = *impl_;
  SWT_CHECK(!s.finished, "{}: add_document after finish", s.path);
  for (size_t i = 0; i < n; ++i)
    SWT_CHECK(tokens[i] >= 0 && uint64_t(tokens[i]) < s.vocab_size,
              "{}: token id {} (document {}, position {}) is outside the vocabulary [0, {})", s.path,
              tokens[i], s.offsets.size() - 1, i, s.vocab_size);
  s.buffer.resize(n * s.token_bytes);
  if (s.token_bytes == 2) {
    for (size_t i = 0; i < n; ++i) store<uint16_t>(s.buffer.data() + 2 * i, uint16_t(tokens[i]));
  } else {
    for (size_t i = 0; i < n; ++i) store<uint32_t>(s.buffer.data() + 4 * i, uint32_t(tokens[i]));
  }
  write_all(s.tokens_file, s.buffer.data(), s.buffer.size(), s.tokens_path);
  s.offsets.push_back(s.offsets.back() + n);
}

void ShardWriter::finish() {
  Impl& s = *impl_;
  SWT_CHECK(!s.finished, "{}: finish called twice", s.path);
  if (std::fclose(s.tokens_file) != 0) {
    s.tokens_file = nullptr;
    throw UserError(fmt::format("{}: write failed: {}", s.tokens_path, std::strerror(errno)));
  }
  s.tokens_file = nullptr;

  std::FILE* out = std::fopen(s.tmp_path.c_str(), "wb");
  SWT_USER_CHECK(out != nullptr, "{}: cannot create {}: {}", s.path, s.tmp_path, std::strerror(errno));
  std::FILE* in = nullptr;
  try {
    const uint64_t num_documents = s.offsets.size() - 1;
    const uint64_t num_tokens = s.offsets.back();
    unsigned char header[kShardHeaderBytes] = {};
    write_all(out, header, sizeof(header), s.tmp_path);  // placeholder until the checksum is known
    const size_t offsets_bytes = 8 * s.offsets.size();
    uint32_t crc = crc32_update(static_cast<uint32_t>(::crc32(0, nullptr, 0)), s.offsets.data(),
                                offsets_bytes);
    write_all(out, s.offsets.data(), offsets_bytes, s.tmp_path);

    in = std::fopen(s.tokens_path.c_str(), "rb");
    SWT_USER_CHECK(in != nullptr, "cannot reopen {}: {}", s.tokens_path, std::strerror(errno));
    std::vector<unsigned char> chunk(1 << 20);
    uint64_t copied = 0;
    size_t got;
    while ((got = std::fread(chunk.data(), 1, chunk.size(), in)) > 0) {
      crc = crc32_update(crc, chunk.data(), got);
      write_all(out, chunk.data(), got, s.tmp_path);
      copied += got;
    }
    SWT_USER_CHECK(!std::ferror(in) && copied == num_tokens * s.token_bytes,
              "{}: read back {} token bytes, expected {}", s.tokens_path, copied,
              num_tokens * s.token_bytes);
    std::fclose(in);
    in = nullptr;

    std::memcpy(header, kShardMagic, sizeof(kShardMagic));
    store<uint32_t>(header + kVersionAt, kShardVersion);
    store<uint32_t>(header + kTokenBytesAt, s.token_bytes);
    store<uint64_t>(header + kVocabAt, s.vocab_size);
    store<uint64_t>(header + kDocsAt, num_documents);
    store<uint64_t>(header + kTokensAt, num_tokens);
    store<uint64_t>(header + kChecksumAt, crc);
    if (std::fseek(out, 0, SEEK_SET) != 0)
      throw UserError(fmt::format("{}: seek failed: {}", s.tmp_path, std::strerror(errno)));
    write_all(out, header, sizeof(header), s.tmp_path);
    if (std::fflush(out) != 0 || ::fsync(::fileno(out)) != 0)
      throw UserError(fmt::format("{}: write failed: {}", s.tmp_path, std::strerror(errno)));
    const int close_rc = std::fclose(out);
    out = nullptr;
    if (close_rc != 0) throw UserError(fmt::format("{}: write failed: {}", s.tmp_path, std::strerror(errno)));
    if (std::rename(s.tmp_path.c_str(), s.path.c_str()) != 0)
      throw UserError(fmt::format("cannot rename {} to {}: {}", s.tmp_path, s.path, std::strerror(errno)));
  } catch (...) {
    if (in) std::fclose(in);
    if (out) std::fclose(out);
    s.remove_temporaries();
    s.finished = true;  // nothing left to clean up in the destructor
    throw;
  }
  std::remove(s.tokens_path.c_str());
  s.finished = true;
}

// ---------------------------------------------------------------------------------------------

std::vector<std::string> expand_glob(const std::string& pattern, const std::string& what) {
  const std::string label = what.empty() ? "" : what + ": ";
  glob_t g{};
  const int rc = ::glob(pattern.c_str(), GLOB_NOSORT, nullptr, &g);
  std::vector<std::string> paths;
  if (rc == 0)
    for (size_t i = 0; i < g.gl_pathc; ++i) paths.emplace_back(g.gl_pathv[i]);
  ::globfree(&g);
  SWT_USER_CHECK(rc != GLOB_NOMATCH, "{}no files match \"{}\"", label, pattern);
  SWT_USER_CHECK(rc == 0, "{}cannot expand \"{}\" ({})", label, pattern,
                 rc == GLOB_ABORTED ? "a directory could not be read" : "out of memory");
  std::sort(paths.begin(), paths.end());  // byte order, independent of the locale
  return paths;
}

}  // namespace switcht5
