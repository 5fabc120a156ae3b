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

// Prints the report on `out` and returns whether the checksum matches. A shard whose checksum
// does not match is reported as BAD (its documents still shown, to help find the damage); any
// other format error is a UserError.
bool inspect_shard(const InspectOptions& opts, std::FILE* out);

}  // namespace switcht5::data_tools
