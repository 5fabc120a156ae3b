// Token shards (src/data/shard.h): writer -> reader round trips at both token widths, atomic
// replacement, and one clear error per kind of damage (magic, version, size, checksum, offsets,
// token width), plus expand_glob. Reads are pread()s: a shard changed under an open reader is an
// error naming it, not a SIGBUS.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <zlib.h>

#include "core/check.h"
#include "data/shard.h"

namespace {

using namespace switcht5;
namespace fs = std::filesystem;

// A fresh, empty directory for the running test, removed afterwards.
struct TestDir {
  fs::path path;
  TestDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() /
           ("switcht5_test_shard_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TestDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::vector<std::string> dir_entries(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::vector<unsigned char> read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<unsigned char>(std::istreambuf_iterator<char>(f), {});
}

void write_bytes(const fs::path& p, const std::vector<unsigned char>& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
}

// Rewrites the header checksum to match the (edited) body, so that a later check is reached.
void fix_checksum(std::vector<unsigned char>& b) {
  const uLong crc = ::crc32(::crc32(0, nullptr, 0), b.data() + kShardHeaderBytes,
                            static_cast<uInt>(b.size() - kShardHeaderBytes));
  const uint64_t c = crc;
  std::memcpy(b.data() + 40, &c, 8);
}

// The error message when opening path, or "" when it opens.
std::string open_error(const fs::path& p, bool verify = true) {
  try {
    ShardReader r(p.string(), verify);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

const std::vector<std::vector<int32_t>> kDocs = {{5, 6, 7, 1}, {1}, {}, {31999, 0, 1}};

fs::path write_sample(const fs::path& dir, uint64_t vocab = 32000) {
  const fs::path p = dir / "sample.shard";
  ShardWriter w(p.string(), vocab);
  for (const auto& d : kDocs) w.add_document(d);
  w.finish();
  return p;
}

TEST(Shard, RoundTripUint16) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = write_sample(dir);
  EXPECT_EQ(dir_entries(dir), std::vector<std::string>{"sample.shard"}) << "no temporaries left";
  ShardReader r(p.string());
  EXPECT_EQ(r.header().version, 1u);
  EXPECT_EQ(r.header().token_bytes, 2u);
  EXPECT_EQ(r.header().vocab_size, 32000u);
  ASSERT_EQ(r.num_documents(), kDocs.size());
  EXPECT_EQ(r.num_tokens(), 8u);
  EXPECT_EQ(fs::file_size(p), kShardHeaderBytes + 8 * (kDocs.size() + 1) + 2 * 8);
  for (size_t d = 0; d < kDocs.size(); ++d) {
    ASSERT_EQ(r.doc_length(d), kDocs[d].size());
    std::vector<int32_t> got(r.doc_length(d));
    r.copy_tokens(r.doc_begin(d), got.size(), got.data());
    EXPECT_EQ(got, kDocs[d]) << "document " << d;
    for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(r.token(r.doc_begin(d) + i), kDocs[d][i]);
  }
  EXPECT_THROW(r.copy_tokens(7, 2, std::vector<int32_t>(2).data()), Error);
}

TEST(Shard, Uint32TokensWhenVocabAbove65536) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = dir / "wide.shard";
  const std::vector<int32_t> doc = {0, 65535, 65536, 99999, 1};
  {
    ShardWriter w(p.string(), 100000);
    w.add_document(doc);
    w.finish();
  }
  ShardReader r(p.string());
  EXPECT_EQ(r.header().token_bytes, 4u);
  EXPECT_EQ(r.header().vocab_size, 100000u);
  EXPECT_EQ(fs::file_size(p), kShardHeaderBytes + 8 * 2 + 4 * doc.size());
  std::vector<int32_t> got(doc.size());
  r.copy_tokens(0, got.size(), got.data());
  EXPECT_EQ(got, doc);

  // 65536 is the largest vocabulary with 2-byte tokens.
  const fs::path p2 = dir / "edge.shard";
  {
    ShardWriter w(p2.string(), 65536);
    w.add_document({65535, 0});
    w.finish();
  }
  ShardReader r2(p2.string());
  EXPECT_EQ(r2.header().token_bytes, 2u);
  EXPECT_EQ(r2.token(0), 65535);
}

TEST(Shard, EmptyShard) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = dir / "empty.shard";
  {
    ShardWriter w(p.string(), 32000);
    w.finish();
  }
  ShardReader r(p.string());
  EXPECT_EQ(r.num_documents(), 0u);
  EXPECT_EQ(r.num_tokens(), 0u);
}

TEST(Shard, WriterRejectsTokensOutsideVocabulary) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  {
    ShardWriter w((dir / "x.shard").string(), 1000);
    w.add_document({1, 2});
    try {
      w.add_document({3, 1000});
      ADD_FAILURE() << "token 1000 with vocab 1000 accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("1000"), std::string::npos) << e.what();
    }
    EXPECT_THROW(w.add_document({-1}), Error);
  }
  EXPECT_TRUE(dir_entries(dir).empty()) << "an unfinished writer leaves no files";
}

TEST(Shard, UnfinishedWriterKeepsTheOldShard) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = write_sample(dir);
  const auto before = read_bytes(p);
  {
    ShardWriter w(p.string(), 32000);
    w.add_document({9, 9, 9});
    ShardReader r(p.string());  // the complete shard is readable while a new one is written
    EXPECT_EQ(r.num_documents(), kDocs.size());
  }
  EXPECT_EQ(read_bytes(p), before);
  EXPECT_EQ(dir_entries(dir), std::vector<std::string>{"sample.shard"});

  // A finished writer replaces it.
  {
    ShardWriter w(p.string(), 32000);
    w.add_document({9, 9, 9});
    w.finish();
  }
  ShardReader r(p.string());
  EXPECT_EQ(r.num_documents(), 1u);
  EXPECT_EQ(r.token(2), 9);
  EXPECT_EQ(dir_entries(dir), std::vector<std::string>{"sample.shard"});
}

TEST(Shard, MoveKeepsTheOpenFile) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = write_sample(dir);
  ShardReader a(p.string());
  ShardReader b(std::move(a));
  EXPECT_EQ(b.num_tokens(), 8u);
  EXPECT_EQ(b.token(7), 1);
  ShardReader c(write_sample(dir, 40000).string());
  c = std::move(b);
  EXPECT_EQ(c.token(0), 5);
  EXPECT_EQ(c.path(), p.string());
}

TEST(ShardErrors, BadMagic) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = write_sample(dir);
  auto b = read_bytes(p);
  b[0] = 'X';
  write_bytes(p, b);
  const std::string e = open_error(p);
  EXPECT_NE(e.find(p.string() + ": bad magic"), std::string::npos) << e;

  const fs::path text = dir / "notes.txt";
  std::ofstream(text) << "this is not a shard, but it is longer than sixty-four bytes, surely it is\n";
  EXPECT_NE(open_error(text).find("bad magic"), std::string::npos) << open_error(text);
}

TEST(ShardErrors, UnsupportedVersion) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = write_sample(dir);
  auto b = read_bytes(p);
  b[8] = 7;
  write_bytes(p, b);
  const std::string e = open_error(p);
  EXPECT_NE(e.find("unsupported shard version 7"), std::string::npos) << e;
  EXPECT_EQ(e.rfind(p.string(), 0), 0u) << "names the file first: " << e;
}

TEST(ShardErrors, BadTokenWidth) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = write_sample(dir);
  auto b = read_bytes(p);
  b[12] = 3;
  write_bytes(p, b);
  EXPECT_NE(open_error(p).find("token_bytes is 3 (must be 2 or 4)"), std::string::npos)
      << open_error(p);
  b[12] = 4;  // 4-byte tokens with a 32000 vocabulary: not what a writer makes
  write_bytes(p, b);
  EXPECT_NE(open_error(p).find("does not fit vocab_size"), std::string::npos) << open_error(p);
}

TEST(ShardErrors, ChecksumMismatch) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = write_sample(dir);
  auto b = read_bytes(p);
  b[b.size() - 3] ^= 0x01;  // a token byte
  write_bytes(p, b);
  const std::string e = open_error(p);
  EXPECT_NE(e.find(p.string() + ": checksum mismatch"), std::string::npos) << e;
  EXPECT_EQ(open_error(p, /*verify=*/false), "") << "opens without verification";
}

TEST(ShardErrors, TruncatedOrOversized) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = write_sample(dir);
  const auto good = read_bytes(p);
  auto b = good;
  b.pop_back();
  write_bytes(p, b);
  std::string e = open_error(p, false);
  EXPECT_NE(e.find(p.string() + ": truncated file"), std::string::npos) << e;
  b.resize(40);
  write_bytes(p, b);
  e = open_error(p);
  EXPECT_NE(e.find("truncated file (40 bytes"), std::string::npos) << e;
  write_bytes(p, {});
  EXPECT_NE(open_error(p).find("truncated file (0 bytes"), std::string::npos) << open_error(p);
  b = good;
  b.push_back(0);
  write_bytes(p, b);
  e = open_error(p);
  EXPECT_NE(e.find("oversized file"), std::string::npos) << e;
  // A header claiming an absurd document count must not overflow the size arithmetic.
  b = good;
  std::memset(b.data() + 24, 0xff, 8);
  write_bytes(p, b);
  EXPECT_NE(open_error(p).find("truncated file"), std::string::npos) << open_error(p);
}

TEST(ShardErrors, OffsetsNotMonotonic) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = write_sample(dir);
  auto b = read_bytes(p);
  const uint64_t bad = 6;  // offsets are 0 4 5 5 8: offsets[2] = 6 > offsets[3] = 5
  std::memcpy(b.data() + kShardHeaderBytes + 8 * 2, &bad, 8);
  fix_checksum(b);
  write_bytes(p, b);
  const std::string e = open_error(p);
  EXPECT_NE(e.find("not monotonic at document 2"), std::string::npos) << e;
}

TEST(ShardErrors, LastOffsetNotNumTokens) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = write_sample(dir);
  auto b = read_bytes(p);
  const uint64_t bad = 7;
  std::memcpy(b.data() + kShardHeaderBytes + 8 * kDocs.size(), &bad, 8);
  fix_checksum(b);
  write_bytes(p, b);
  const std::string e = open_error(p);
  EXPECT_NE(e.find("last offset 7 != num_tokens 8"), std::string::npos) << e;
}

TEST(ShardErrors, TokenOutsideVocabulary) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const fs::path p = write_sample(dir);
  auto b = read_bytes(p);
  const uint16_t bad = 40000;
  std::memcpy(b.data() + b.size() - 2, &bad, 2);
  fix_checksum(b);
  write_bytes(p, b);
  EXPECT_NE(open_error(p).find("token id 40000 is outside the vocabulary"), std::string::npos)
      << open_error(p);
}

TEST(ShardErrors, MissingFile) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  const std::string e = open_error(dir / "nope.shard");
  EXPECT_NE(e.find("nope.shard: cannot open"), std::string::npos) << e;
}

// Only a regular file is a shard: a FIFO is refused at once (opening it for reading would wait
// for a writer), a directory and a device too, each named in the message.
TEST(ShardErrors, NotARegularFile) {
  const TestDir tmp;
  const fs::path fifo = tmp.path / "fifo.shard";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_NE(open_error(fifo).find("token shard " + fifo.string() +
                                  ": expected a regular file, got a FIFO (named pipe)"),
            std::string::npos)
      << open_error(fifo);
  EXPECT_NE(open_error(tmp.path).find("expected a regular file, got a directory"), std::string::npos)
      << open_error(tmp.path);
  EXPECT_NE(open_error("/dev/zero").find("got a character device"), std::string::npos)
      << open_error("/dev/zero");
}

// A shard changed in place after it was opened: a read of a part cut off fails, and
// check_unchanged() notices a truncation or a rewrite of the same size, naming the shard (a
// memory map took SIGBUS on the cut-off part instead). A shard replaced by rename is not a
// change: the reader keeps the file it opened.
TEST(ShardErrors, ChangedWhileOpen) {
  const TestDir tmp;
  const fs::path p = write_sample(tmp.path);
  const auto good = read_bytes(p);
  std::vector<int32_t> got(8);
  {
    ShardReader r(p.string());
    r.copy_tokens(0, 8, got.data());
    r.check_unchanged();
    fs::resize_file(p, good.size() - 4);  // the last two tokens are gone
    try {
      r.copy_tokens(6, 2, got.data());
      ADD_FAILURE() << "a read past the cut succeeded";
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(p.string() + ": the token shard changed while in use "
                                            "(truncated to " + std::to_string(good.size() - 4) +
                                            " bytes from " + std::to_string(good.size()) + ")"),
                std::string::npos)
          << e.what();
    }
    r.copy_tokens(0, 2, got.data());  // still readable before the cut, but the file changed:
    EXPECT_THROW(r.check_unchanged(), UserError);
  }
  write_bytes(p, good);
  {
    ShardReader r(p.string());
    auto other = good;
    other[other.size() - 1] ^= 0x01;
    // Same size, later modification time (a second apart: any file system keeps that apart).
    const auto opened = fs::last_write_time(p);
    write_bytes(p, other);
    fs::last_write_time(p, opened + std::chrono::seconds(1));
    try {
      r.check_unchanged();
      ADD_FAILURE() << "a rewrite went unnoticed";
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find("changed while in use (rewritten since it was opened)"),
                std::string::npos)
          << e.what();
    }
  }
  write_bytes(p, good);
  {
    ShardReader r(p.string());
    const fs::path next = tmp.path / "next.shard";
    {
      ShardWriter w(next.string(), 32000);
      w.add_document({7, 7, 1});
      w.finish();
    }
    fs::rename(next, p);  // as tokenize replaces a shard
    r.copy_tokens(0, 8, got.data());
    r.check_unchanged();
    EXPECT_EQ(got, (std::vector<int32_t>{5, 6, 7, 1, 1, 31999, 0, 1}));
  }
}

// scan() reads what opening with verification checks; check_scan() is that check.
TEST(Shard, ScanIsTheContentCheck) {
  const TestDir tmp;
  const fs::path p = write_sample(tmp.path);
  ShardReader r(p.string(), /*verify_contents=*/false);
  const ShardScan s = r.scan();
  EXPECT_EQ(s.checksum, r.header().checksum);
  EXPECT_EQ(s.max_token, 31999u);
  EXPECT_NO_THROW(r.check_scan(s));
  EXPECT_THROW(r.check_scan(ShardScan{s.checksum ^ 1u, s.max_token}), UserError);
  EXPECT_THROW(r.check_scan(ShardScan{s.checksum, 32000}), UserError);
}

TEST(ExpandGlob, SortedMatchesAndNoMatch) {
  const TestDir tmp;
  const fs::path& dir = tmp.path;
  for (const char* n : {"b.shard", "a.shard", "c.shard", "B.shard", "a.txt", "a10.shard", "a2.shard"})
    std::ofstream(dir / n) << "x";
  const auto got = expand_glob((dir / "*.shard").string(), "data.train_glob");
  std::vector<std::string> want;
  for (const char* n : {"B.shard", "a.shard", "a10.shard", "a2.shard", "b.shard", "c.shard"})
    want.push_back((dir / n).string());
  EXPECT_EQ(got, want);
  EXPECT_EQ(expand_glob((dir / "a.txt").string(), "x"), std::vector<std::string>{(dir / "a.txt").string()});
  try {
    expand_glob((dir / "*.nothing").string(), "data.train_glob");
    ADD_FAILURE() << "no error";
  } catch (const UserError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("data.train_glob"), std::string::npos) << m;
    EXPECT_NE(m.find((dir / "*.nothing").string()), std::string::npos) << m;
  }
}

}  // namespace
