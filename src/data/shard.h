// Token shards: the on-disk format between `switcht5-data tokenize` and the training loader.
//
// One shard holds the tokenized documents of one input file, read at any offset without parsing.
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

// What one pass over a shard's data finds (ShardReader::scan).
struct ShardScan {
  uint32_t checksum = 0;   // zlib crc32 of every byte after the header
  uint64_t max_token = 0;  // the largest token id (0 when the shard has no tokens)
};

// A token shard opened for reading. Opening checks that the path is a regular file, the header
// (magic, version, token width against vocab_size), the file's size against the header and the
// document offsets; with verify_contents also the crc32 and that every token id is below
// vocab_size (scan() + check_scan()). Any failure throws UserError naming the file and what is
// wrong, e.g. "data/x.shard: bad magic (not a switcht5 token shard)". These are the only checks
// of a shard: the training loader and `switcht5-data inspect` both run them, so both give the
// same verdict.
//
// Reads go through pread() on the descriptor opened here, not through a memory map: a shard
// truncated while a run reads it is then a UserError naming it ("... changed while in use"),
// where a map would take SIGBUS and end the process without a word. check_unchanged() compares
// the file's size and modification time with those at open, so a shard changed in place
// (truncated, or rewritten with the same size) is caught too; the reads of the scan, the offsets
// and single tokens call it, copy_tokens() leaves it to its caller (the loader checks once per
// batch, after the batch's reads: a syscall per read cost a third of the loader's time). A shard
// replaced by rename (tokenize writes a new file and renames it) does not disturb an open
// reader: it keeps reading the file it opened. Const methods may run on several threads at once.
class ShardReader {
 public:
  explicit ShardReader(const std::string& path, bool verify_contents = true);
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;
  ShardReader(ShardReader&&) noexcept;
  ShardReader& operator=(ShardReader&&) noexcept;

  const std::string& path() const { return path_; }
  const ShardHeader& header() const { return header_; }
  uint64_t num_documents() const { return header_.num_documents; }
  uint64_t num_tokens() const { return header_.num_tokens; }
  // The document offsets, num_documents + 1 token indices: document d is tokens
  // [offsets[d], offsets[d+1]). One read of the table.
  std::vector<uint64_t> read_offsets() const;
  // Tokens of document d: [doc_begin(d), doc_begin(d+1)). Each call reads the file: for many
  // documents, read_offsets() once.
  uint64_t doc_begin(uint64_t d) const;
  uint64_t doc_length(uint64_t d) const;
  // Token i of the shard (0 <= i < num_tokens); one read of the file.
  int32_t token(uint64_t i) const;
  // Copies tokens [begin, begin + n) into out. A read of a part cut off since the open fails;
  // call check_unchanged() after a set of reads to know the file did not change under them.
  void copy_tokens(uint64_t begin, uint64_t n, int32_t* out) const;
  // Throws UserError "<path>: the token shard changed while in use (...)" when the file's size
  // or modification time differs from those at open.
  void check_unchanged() const;

  // Reads every byte after the header once: the crc32 and the largest token id.
  ShardScan scan() const;
  // Throws the UserError opening with verify_contents throws when `s` (this shard's scan())
  // disagrees with the header: a checksum mismatch, or a token id >= vocab_size.
  void check_scan(const ShardScan& s) const;

 private:
  // Reads bytes [offset, offset + n) of the file; a short read (the file was cut) is a UserError.
  void read_at(uint64_t offset, void* out, size_t n) const;
  void check_offsets() const;

  std::string path_;
  ShardHeader header_;
  int fd_ = -1;
  uint64_t file_bytes_ = 0;  // size and modification time at open (ns since the epoch)
  int64_t mtime_ns_ = 0;
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
