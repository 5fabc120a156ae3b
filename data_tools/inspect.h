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

// Prints the report on `out`. A shard whose checksum does not match is reported as BAD (and its
// documents still shown); any other format error is a UserError.
void inspect_shard(const InspectOptions& opts, std::FILE* out);

}  // namespace switcht5::data_tools
