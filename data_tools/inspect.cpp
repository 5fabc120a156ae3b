#include "inspect.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include <fmt/format.h>
#include <zlib.h>

#include "core/check.h"
#include "data/shard.h"
#include "tokenize.h"

namespace switcht5::data_tools {

namespace {

// crc32 of every byte after the header, read with stdio (the reader was opened without
// verification so that a bad checksum can be shown rather than thrown).
uint32_t file_checksum(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  SWT_USER_CHECK(f != nullptr, "{}: cannot open: {}", path, std::strerror(errno));
  std::vector<unsigned char> buf(1 << 20);
  uLong crc = ::crc32(0, nullptr, 0);
  bool ok = std::fseek(f, long(kShardHeaderBytes), SEEK_SET) == 0;
  size_t got;
  while (ok && (got = std::fread(buf.data(), 1, buf.size(), f)) > 0)
    crc = ::crc32(crc, buf.data(), static_cast<uInt>(got));
  ok = ok && !std::ferror(f);
  std::fclose(f);
  SWT_USER_CHECK(ok, "{}: read error", path);
  return static_cast<uint32_t>(crc);
}

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

bool inspect_shard(const InspectOptions& opts, std::FILE* out) {
  SWT_USER_CHECK(!opts.shard.empty(), "inspect: SHARD is required");
  SWT_USER_CHECK(opts.docs >= 0, "inspect: --docs must be >= 0, got {}", opts.docs);
  const ShardReader r(opts.shard, /*verify_checksum=*/false);
  const ShardHeader& h = r.header();
  const uint32_t crc = file_checksum(opts.shard);
  fmt::print(out, "shard: {}\n", opts.shard);
  fmt::print(out, "format: version {}, {}-byte tokens (uint{}), vocab_size {}\n", h.version,
             h.token_bytes, 8 * h.token_bytes, h.vocab_size);
  fmt::print(out, "documents: {}\ntokens: {}\n", h.num_documents, h.num_tokens);
  if (crc == h.checksum)
    fmt::print(out, "checksum: OK (crc32 {:08x})\n", crc);
  else
    fmt::print(out, "checksum: BAD (header {:08x}, data {:08x})\n", h.checksum, crc);
  if (h.num_documents > 0) {
    uint64_t lo = UINT64_MAX, hi = 0;
    for (uint64_t d = 0; d < h.num_documents; ++d) {
      lo = std::min(lo, r.doc_length(d));
      hi = std::max(hi, r.doc_length(d));
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
    const uint64_t len = r.doc_length(d);
    std::vector<int32_t> ids(len);
    r.copy_tokens(r.doc_begin(d), len, ids.data());
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
  return crc == h.checksum;
}

}  // namespace switcht5::data_tools
