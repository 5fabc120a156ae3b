// Token shards: the on-disk format between `switcht5-data tokenize` and the training loader.
//
// One shard holds the tokenized documents of one input file, readable by mmap without parsing.
// Format version 1, all integers little-endian:
//
//   offset  size  field
//   0       8     magic "SWT5TOK\0"
//   8       4     version (1)
//   12      4     token_bytes: 2 (uint16 tokens) when vocab_size <= 65536, else 4 (uint32)
//   16      8     vocab_size
//   24      8     num_documents
//   32      8     num_tokens
//   40      8     checksum: zlib crc32 of every byte after the header (offsets, then tokens)
//   48      16    reserved, zero
//   64      8*(num_documents+1)   document offsets, in tokens: document d is
//                                 tokens[offsets[d], offsets[d+1]); offsets[0] = 0,
//                                 offsets[num_documents] = num_tokens
//   ...     token_bytes*num_tokens tokens (each document ends with EOS; the tokenizer adds it)
//
// A writer writes to "<path>.tmp" and renames to <path> only when complete, so a half-written
// shard never has the final name.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace switcht5 {

inline constexpr char kShardMagic[8] = {'S', 'W', 'T', '5', 'T', 'O', 'K', '\0'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 64;

struct ShardHeader {
  uint32_t version = kShardVersion;
  uint32_t token_bytes = 2;
  uint64_t vocab_size = 0;
  uint64_t num_documents = 0;
  uint64_t num_tokens = 0;
  uint64_t checksum = 0;
};

// Read-only, memory-mapped shard. Opening validates magic, version, sizes (against the file
// length) and, when verify_checksum, the crc32; any failure throws UserError naming the file and
// what is wrong (e.g. "data/x.shard: bad magic (not a switcht5 token shard)").
class ShardReader {
 public:
  explicit ShardReader(const std::string& path, bool verify_checksum = true);
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;
  ShardReader(ShardReader&&) noexcept;
  ShardReader& operator=(ShardReader&&) noexcept;

  const std::string& path() const { return path_; }
  const ShardHeader& header() const { return header_; }
  uint64_t num_documents() const { return header_.num_documents; }
  uint64_t num_tokens() const { return header_.num_tokens; }
  // Tokens of document d: [doc_begin(d), doc_begin(d+1)).
  uint64_t doc_begin(uint64_t d) const { return offsets_[d]; }
  uint64_t doc_length(uint64_t d) const { return offsets_[d + 1] - offsets_[d]; }
  // Token i of the shard (0 <= i < num_tokens).
  int32_t token(uint64_t i) const {
    return header_.token_bytes == 2 ? int32_t(tokens16_[i]) : int32_t(tokens32_[i]);
  }
  // Copies tokens [begin, begin + n) into out.
  void copy_tokens(uint64_t begin, uint64_t n, int32_t* out) const;

 private:
  std::string path_;
  ShardHeader header_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const uint64_t* offsets_ = nullptr;
  const uint16_t* tokens16_ = nullptr;
  const uint32_t* tokens32_ = nullptr;
};

// Streams documents into a shard. add_document() takes the tokens of one document (EOS
// included by the caller); finish() writes the header with counts and checksum and renames the
// temporary file into place. Destroying an unfinished writer removes the temporary file.
class ShardWriter {
 public:
  ShardWriter(const std::string& path, uint64_t vocab_size);
  ~ShardWriter();
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  void add_document(const int32_t* tokens, size_t n);
  void add_document(const std::vector<int32_t>& tokens) { add_document(tokens.data(), tokens.size()); }
  void finish();

 private:
  struct Impl;
  Impl* impl_;
};

// Expands a glob pattern (e.g. "data/train/*.shard") to the sorted list of matching paths.
// No match is a UserError naming the pattern (and `what`, e.g. "data.train_glob").
std::vector<std::string> expand_glob(const std::string& pattern, const std::string& what);

}  // namespace switcht5
