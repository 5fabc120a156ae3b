// `switcht5-data inspect`: a token shard's header, checksum, document length statistics and its
// first documents (token ids, and the decoded text when a SentencePiece model is given).
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

namespace switcht5::data_tools {

struct InspectOptions {
  std::string shard;
  int64_t docs = 3;        // documents to print
  std::string spm_model;   // optional: decode the printed documents
};

// Prints the report on `out`, then fails as opening the shard for training fails (ShardReader:
// the same checks, the same UserError): a shard the loader refuses fails here too. A structural
// error (bad magic, wrong size, bad offsets) throws before the report; a checksum mismatch or a
// token id outside the vocabulary after it, so the damage can be looked at.
void inspect_shard(const InspectOptions& opts, std::FILE* out);

}  // namespace switcht5::data_tools
