// Token shard reader (mmap), writer (temporary file + rename) and glob expansion; the format is
// described in shard.h.
#include "data/shard.h"

#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
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

namespace switcht5 {

static_assert(std::endian::native == std::endian::little,
              "token shards are little-endian and read by mmap without byte swapping");

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

ShardReader::ShardReader(const std::string& path, bool verify_checksum) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  SWT_USER_CHECK(fd >= 0, "{}: cannot open token shard: {}", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    SWT_USER_CHECK(false, "{}: not a regular file", path);
  }
  const auto file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < kShardHeaderBytes) {
    ::close(fd);
    SWT_USER_CHECK(false, "{}: truncated file ({} bytes, shorter than the {}-byte header)", path,
                   file_bytes, kShardHeaderBytes);
  }
  void* map = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  SWT_CHECK(map != MAP_FAILED, "{}: mmap of {} bytes failed: {}", path, file_bytes,
            std::strerror(map_errno));
  map_ = map;
  map_bytes_ = file_bytes;
  try {
    const auto* base = static_cast<const unsigned char*>(map_);
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
                   path, header_.num_documents, header_.num_tokens, file_bytes);
    const uint64_t offsets_bytes = 8 * (header_.num_documents + 1);
    const uint64_t tokens_bytes = uint64_t(header_.token_bytes) * header_.num_tokens;
    const uint64_t expected = kShardHeaderBytes + offsets_bytes + tokens_bytes;
    SWT_USER_CHECK(file_bytes == expected,
                   "{}: {} file (size {} bytes does not match the header's {} documents and {} "
                   "tokens, which need {} bytes)",
                   path, file_bytes < expected ? "truncated" : "oversized", file_bytes,
                   header_.num_documents, header_.num_tokens, expected);
    if (verify_checksum) {
      const uint32_t crc = crc32_update(static_cast<uint32_t>(::crc32(0, nullptr, 0)),
                                        base + kShardHeaderBytes, file_bytes - kShardHeaderBytes);
      SWT_USER_CHECK(crc == header_.checksum,
                     "{}: checksum mismatch (header {:08x}, data {:08x}): the file is corrupt", path,
                     header_.checksum, crc);
    }
    offsets_ = reinterpret_cast<const uint64_t*>(base + kShardHeaderBytes);
    const unsigned char* tokens = base + kShardHeaderBytes + offsets_bytes;
    if (header_.token_bytes == 2) tokens16_ = reinterpret_cast<const uint16_t*>(tokens);
    else tokens32_ = reinterpret_cast<const uint32_t*>(tokens);
    // Offsets are checked always (cheap); token ids only with the checksum pass, which reads
    // every byte anyway.
    SWT_USER_CHECK(offsets_[0] == 0, "{}: corrupt document offsets (offsets[0] = {}, must be 0)", path,
                   offsets_[0]);
    for (uint64_t d = 0; d < header_.num_documents; ++d)
      SWT_USER_CHECK(offsets_[d] <= offsets_[d + 1],
                     "{}: corrupt document offsets (not monotonic at document {}: {} > {})", path, d,
                     offsets_[d], offsets_[d + 1]);
    SWT_USER_CHECK(offsets_[header_.num_documents] == header_.num_tokens,
                   "{}: corrupt document offsets (last offset {} != num_tokens {})", path,
                   offsets_[header_.num_documents], header_.num_tokens);
    if (verify_checksum) {
      uint64_t max_token = 0;
      for (uint64_t i = 0; i < header_.num_tokens; ++i)
        max_token = std::max<uint64_t>(max_token, tokens16_ ? tokens16_[i] : tokens32_[i]);
      SWT_USER_CHECK(header_.num_tokens == 0 || max_token < header_.vocab_size,
                     "{}: token id {} is outside the vocabulary (vocab_size {})", path, max_token,
                     header_.vocab_size);
    }
  } catch (...) {
    ::munmap(map_, map_bytes_);
    map_ = nullptr;
    throw;
  }
}

ShardReader::~ShardReader() {
  if (map_) ::munmap(map_, map_bytes_);
}

ShardReader::ShardReader(ShardReader&& o) noexcept
    : path_(std::move(o.path_)),
      header_(o.header_),
      map_(std::exchange(o.map_, nullptr)),
      map_bytes_(std::exchange(o.map_bytes_, 0)),
      offsets_(std::exchange(o.offsets_, nullptr)),
      tokens16_(std::exchange(o.tokens16_, nullptr)),
      tokens32_(std::exchange(o.tokens32_, nullptr)) {}

ShardReader& ShardReader::operator=(ShardReader&& o) noexcept {
  if (this != &o) {
    if (map_) ::munmap(map_, map_bytes_);
    path_ = std::move(o.path_);
    header_ = o.header_;
    map_ = std::exchange(o.map_, nullptr);
    map_bytes_ = std::exchange(o.map_bytes_, 0);
    offsets_ = std::exchange(o.offsets_, nullptr);
    tokens16_ = std::exchange(o.tokens16_, nullptr);
    tokens32_ = std::exchange(o.tokens32_, nullptr);
  }
  return *this;
}

void ShardReader::copy_tokens(uint64_t begin, uint64_t n, int32_t* out) const {
  SWT_CHECK(begin <= header_.num_tokens && n <= header_.num_tokens - begin,
            "{}: tokens [{}, {}) are outside the shard's {} tokens", path_, begin, begin + n,
            header_.num_tokens);
  if (tokens16_) {
    const uint16_t* src = tokens16_ + begin;
    for (uint64_t i = 0; i < n; ++i) out[i] = int32_t(src[i]);
  } else {
    const uint32_t* src = tokens32_ + begin;
    for (uint64_t i = 0; i < n; ++i) out[i] = int32_t(src[i]);
  }
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

void write_all(std::FILE* f, const void* data, size_t n, const std::string& path) {
  if (n > 0 && std::fwrite(data, 1, n, f) != n)
    throw Error(fmt::format("{}: write failed: {}", path, std::strerror(errno)));
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
    throw Error(fmt::format("{}: write failed: {}", s.tokens_path, std::strerror(errno)));
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
    SWT_CHECK(in != nullptr, "cannot reopen {}: {}", s.tokens_path, std::strerror(errno));
    std::vector<unsigned char> chunk(1 << 20);
    uint64_t copied = 0;
    size_t got;
    while ((got = std::fread(chunk.data(), 1, chunk.size(), in)) > 0) {
      crc = crc32_update(crc, chunk.data(), got);
      write_all(out, chunk.data(), got, s.tmp_path);
      copied += got;
    }
    SWT_CHECK(!std::ferror(in) && copied == num_tokens * s.token_bytes,
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
      throw Error(fmt::format("{}: seek failed: {}", s.tmp_path, std::strerror(errno)));
    write_all(out, header, sizeof(header), s.tmp_path);
    if (std::fflush(out) != 0 || ::fsync(::fileno(out)) != 0)
      throw Error(fmt::format("{}: write failed: {}", s.tmp_path, std::strerror(errno)));
    const int close_rc = std::fclose(out);
    out = nullptr;
    if (close_rc != 0) throw Error(fmt::format("{}: write failed: {}", s.tmp_path, std::strerror(errno)));
    if (std::rename(s.tmp_path.c_str(), s.path.c_str()) != 0)
      throw Error(fmt::format("cannot rename {} to {}: {}", s.tmp_path, s.path, std::strerror(errno)));
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
