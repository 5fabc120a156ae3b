// `switcht5-data tokenize`: C4-style JSON lines (gzip or plain) -> SentencePiece ids + EOS ->
// one token shard (src/data/shard.h) per input file.
//
// Work split: the calling thread reads lines and cuts them into batches; with threads > 1 a pool
// of workers parses and encodes the batches; the calling thread takes the results back in batch
// order and writes them. Documents therefore keep file order and the shard bytes do not depend
// on the thread count or the batch size.
#pragma once
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace switcht5::data_tools {

// The largest SentencePiece model read (256 MiB; T5's 32,000 pieces take 0.8 MB).
inline constexpr uint64_t kMaxSentencePieceModelBytes = uint64_t(256) << 20;

// A loaded SentencePiece model that appends EOS. encode() is const and safe to call from
// several threads at once (SentencePieceProcessor::Encode is const).
class Tokenizer {
 public:
  // A missing or unreadable model, anything but a regular file of at most
  // kMaxSentencePieceModelBytes, or a model without an EOS piece, is a UserError.
  explicit Tokenizer(const std::string& model_path);
  ~Tokenizer();
  int vocab_size() const { return vocab_size_; }
  int eos_id() const { return eos_id_; }
  // ids = SentencePiece(text), without EOS.
  void encode(std::string_view text, std::vector<int>* ids) const;
  std::string decode(const std::vector<int>& ids) const;
  const sentencepiece::SentencePieceProcessor& processor() const { return *sp_; }

 private:
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  int vocab_size_ = 0;
  int eos_id_ = -1;
};

// Counts malformed input lines, reports each one as "path:line: reason" on the log, and throws
// UserError once there are more than `limit` in total.
class BadLineCounter {
 public:
  BadLineCounter(int64_t limit, std::FILE* log) : limit_(limit), log_(log) {}
  void report(const std::string& path, uint64_t line, const std::string& reason);
  int64_t count() const { return count_; }

 private:
  int64_t limit_;
  std::FILE* log_;
  int64_t count_ = 0;
};

// The input files named by the globs, in glob order, each glob's matches sorted; a path matched
// twice is kept once. A glob matching nothing or a path that is not a regular file is a UserError.
std::vector<std::string> expand_inputs(const std::vector<std::string>& globs);

// DIR/<name>.shard, where <name> is the input's file name without .json.gz, .jsonl.gz, .jsonl,
// .json or .gz.
std::string shard_path_for(const std::string& input_path, const std::string& output_dir);

struct TokenizeOptions {
  std::string spm_model;
  std::vector<std::string> input_globs;
  std::string output_dir;
  int threads = 1;
  int64_t max_bad_lines = 100;
  bool quiet = false;          // no progress and no per-file lines (warnings and summary stay)
  size_t batch_lines = 64;     // lines per work item (at most; batches also stop at 8 MB)
  bool force = false;          // replace shards that exist (otherwise: refused before any work)
};

struct TokenizeSummary {
  int64_t files = 0;
  int64_t documents = 0;
  int64_t tokens = 0;          // EOS included
  int64_t bad_lines = 0;
  uint64_t text_bytes = 0;     // UTF-8 bytes of the "text" strings
  uint64_t input_bytes = 0;    // size of the input files on disk
  double seconds = 0;          // reading, encoding and writing (loading the model excluded)
  std::vector<std::string> shards;
};

// Tokenizes every input file into output_dir (created if missing). Progress, warnings and
// malformed lines go to `log`, per-file lines and the summary to `out`. Blank lines are skipped
// without counting as malformed. Any error leaves no partial shard behind (shards of the files
// finished before it stay).
TokenizeSummary tokenize_inputs(const TokenizeOptions& opts, std::FILE* out, std::FILE* log);

}  // namespace switcht5::data_tools
