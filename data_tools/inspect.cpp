#include "inspect.h"

#include <algorithm>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "core/check.h"
#include "data/shard.h"
#include "tokenize.h"

namespace switcht5::data_tools {

namespace {

// At most max_bytes of UTF-8 text, cut on a character boundary, with newlines and tabs escaped.
std::string preview(const std::string& text, size_t max_bytes) {
  size_t n = std::min(text.size(), max_bytes);
  while (n < text.size() && n > 0 && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80) --n;
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    if (text[i] == '\n') out += "\\n";
    else if (text[i] == '\t') out += "\\t";
    else out += text[i];
  }
  if (n < text.size()) out += fmt::format(" ... ({} more bytes)", text.size() - n);
  return out;
}

}  // namespace

void inspect_shard(const InspectOptions& opts, std::FILE* out) {
  SWT_USER_CHECK(!opts.shard.empty(), "inspect: SHARD is required");
  SWT_USER_CHECK(opts.docs >= 0, "inspect: --docs must be >= 0, got {}", opts.docs);
  // The checks of opening a shard for training (ShardReader), in two parts: the structure now
  // (a failure throws before anything is printed), the contents after the report, so that a
  // damaged shard is still shown whole.
  const ShardReader r(opts.shard, /*verify_contents=*/false);
  const ShardHeader& h = r.header();
  const ShardScan scan = r.scan();
  fmt::print(out, "shard: {}\n", opts.shard);
  fmt::print(out, "format: version {}, {}-byte tokens (uint{}), vocab_size {}\n", h.version,
             h.token_bytes, 8 * h.token_bytes, h.vocab_size);
  fmt::print(out, "documents: {}\ntokens: {}\n", h.num_documents, h.num_tokens);
  if (scan.checksum == h.checksum)
    fmt::print(out, "checksum: OK (crc32 {:08x})\n", scan.checksum);
  else
    fmt::print(out, "checksum: BAD (header {:08x}, data {:08x})\n", h.checksum, scan.checksum);
  if (h.num_tokens > 0)
    fmt::print(out, "largest token id: {} ({} vocab_size {})\n", scan.max_token,
               scan.max_token < h.vocab_size ? "below" : "NOT below", h.vocab_size);
  const std::vector<uint64_t> offsets = r.read_offsets();
  if (h.num_documents > 0) {
    uint64_t lo = UINT64_MAX, hi = 0;
    for (uint64_t d = 0; d < h.num_documents; ++d) {
      lo = std::min(lo, offsets[d + 1] - offsets[d]);
      hi = std::max(hi, offsets[d + 1] - offsets[d]);
    }
    fmt::print(out, "document length in tokens (EOS included): min {}, mean {:.1f}, max {}\n", lo,
               double(h.num_tokens) / double(h.num_documents), hi);
  }
  std::unique_ptr<Tokenizer> tok;
  if (!opts.spm_model.empty()) {
    tok = std::make_unique<Tokenizer>(opts.spm_model);
    if (uint64_t(tok->vocab_size()) != h.vocab_size)
      fmt::print(out, "warning: {} has {} pieces but the shard's vocab_size is {}\n",
                 opts.spm_model, tok->vocab_size(), h.vocab_size);
  }
  const uint64_t show = std::min<uint64_t>(uint64_t(opts.docs), h.num_documents);
  constexpr uint64_t kIdsShown = 32;
  for (uint64_t d = 0; d < show; ++d) {
    const uint64_t len = offsets[d + 1] - offsets[d];
    std::vector<int32_t> ids(len);
    r.copy_tokens(offsets[d], len, ids.data());
    std::string list;
    for (uint64_t i = 0; i < std::min(len, kIdsShown); ++i)
      list += fmt::format("{}{}", i ? ", " : "", ids[i]);
    fmt::print(out, "doc {}: {} tokens: [{}{}]\n", d, len, list, len > kIdsShown ? ", ..." : "");
    if (tok) {
      std::vector<int> body(ids.begin(), ids.end());
      if (!body.empty() && body.back() == tok->eos_id()) body.pop_back();
      const bool in_vocab = std::all_of(body.begin(), body.end(),
                                        [&](int t) { return t >= 0 && t < tok->vocab_size(); });
      if (in_vocab) fmt::print(out, "  text: {}\n", preview(tok->decode(body), 400));
      else fmt::print(out, "  text: (not decoded: ids outside the model's vocabulary)\n");
    }
  }
  std::fflush(out);
  r.check_scan(scan);
}

}  // namespace switcht5::data_tools
