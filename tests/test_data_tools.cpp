// The pieces of switcht5-data in-process: the strict JSON line reader, gzip/plain line reading,
// the real T5 SentencePiece vocabulary (golden encodings), and tokenizing the real C4 samples
// into shards (document and token counts from shared/data/PROVENANCE.md, gzip == escaped JSONL,
// shard == SentencePiece(text) + EOS, thread count does not change a byte).
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <sentencepiece_processor.h>
#include <zlib.h>

#include "core/check.h"
#include "data/shard.h"
#include "json_line.h"
#include "line_reader.h"
#include "test_util.h"
#include "tokenize.h"

namespace {

using namespace switcht5;
using namespace switcht5::data_tools;
namespace fs = std::filesystem;
using switcht5::testing::shared_data_dir;

// A fresh directory, removed afterwards.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name) {
    path = fs::temp_directory_path() /
           ("switcht5_test_data_tools_" + std::to_string(::getpid()) + "_" + name);
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::vector<unsigned char> read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<unsigned char>(std::istreambuf_iterator<char>(f), {});
}

// ---------------------------------------------------------------------------------------------
// JSON lines

std::string text_of(const std::string& line) {
  std::string text, error;
  EXPECT_TRUE(extract_json_text(line, &text, &error)) << line << " -> " << error;
  return text;
}

std::string error_of(const std::string& line) {
  std::string text, error;
  EXPECT_FALSE(extract_json_text(line, &text, &error)) << line << " was accepted as \"" << text << '"';
  return error;
}

TEST(JsonLine, PlainAndEscapes) {
  EXPECT_EQ(text_of(R"({"text":"hello world"})"), "hello world");
  EXPECT_EQ(text_of(R"({"text":""})"), "");
  EXPECT_EQ(text_of(R"(  { "text" : "a" }  )"), "a");
  EXPECT_EQ(text_of("{\"text\":\"a\"}\r"), "a") << "CRLF line ending";
  EXPECT_EQ(text_of(R"({"text":"q\"b\\s\/n\nt\tr\rb\bf\f"})"), "q\"b\\s/n\nt\tr\rb\bf\f");
  EXPECT_EQ(text_of(R"({"text":"caf\u00e9 \u2014 \u00C9"})"), "caf\xc3\xa9 \xe2\x80\x94 \xc3\x89");
  EXPECT_EQ(text_of(R"({"text":"nul\u0000x"})"), std::string("nul\0x", 5));
  EXPECT_EQ(text_of(R"({"text":"https:\/\/x.org\/a"})"), "https://x.org/a");
  // Raw UTF-8 passes through: 2-, 3- and 4-byte sequences.
  EXPECT_EQ(text_of("{\"text\":\"\xc3\xa9\xe2\x80\x99\xf0\x9f\x98\x8b\"}"), "\xc3\xa9\xe2\x80\x99\xf0\x9f\x98\x8b");
}

TEST(JsonLine, SurrogatePairs) {
  // U+1F60B (face savoring food) = \ud83d\ude0b = F0 9F 98 8B.
  EXPECT_EQ(text_of(R"({"text":"yum \ud83d\ude0b!"})"), "yum \xf0\x9f\x98\x8b!");
  EXPECT_EQ(text_of(R"({"text":"\uD834\uDD1E"})"), "\xf0\x9d\x84\x9e");  // U+1D11E, upper case hex
  EXPECT_EQ(text_of(R"({"text":"\udbff\udfff"})"), "\xf4\x8f\xbf\xbf");  // U+10FFFF
  EXPECT_EQ(text_of(R"({"text":"\ud800\udc00"})"), "\xf0\x90\x80\x80");  // U+10000
}

TEST(JsonLine, OtherMembersAreIgnored) {
  EXPECT_EQ(text_of(R"({"timestamp":"2019-04-25T12:57:54Z","url":"https:\/\/x","text":"t"})"), "t");
  EXPECT_EQ(text_of(R"({"url":"u","date":"d","text":"t","meta":{"a":[1,2.5e-3,-0,true,false,null,{"text":5}],"b":{}},"n":[]})"),
            "t")
      << "a nested \"text\" is not the document's";
  EXPECT_EQ(text_of(R"({"text":"t","x":[[[[]]]],"y":-12.5E+2,"z":"\ud83d\ude0b"})"), "t");
  EXPECT_EQ(text_of(R"({"te\u0078t":"escaped key"})"), "escaped key");
}

TEST(JsonLine, MalformedLines) {
  struct Case {
    std::string line;
    std::string reason;  // substring of the error
  };
  const std::vector<Case> cases = {
      {"", "empty line"},
      {"[1,2]", "JSON object"},
      {R"({"text":"a")", "unexpected end of line"},
      {R"({"text":"a})", "unterminated string"},
      {R"({"text":"a",})", "expected a string key"},
      {R"({"text" "a"})", "expected ':'"},
      {R"({"text":"a" "b":1})", "expected ',' or '}'"},
      {R"({'text':'a'})", "expected a string key"},
      {R"({"text":"a","n":01})", "expected ',' or '}'"},
      {R"({"text":"a","n":1.})", "invalid number"},
      {R"({"text":"a","n":tru})", "invalid literal"},
      {R"({"text":"a","n":[1,]})", "unexpected character"},
      {R"({"text":"bad \x escape"})", "invalid escape '\\x'"},
      {R"({"text":"\u12g4"})", "4 hex digits"},
      {R"({"text":"\u12"})", "\\u"},
      {R"({"url":"x"})", "no \"text\" member"},
      {R"({})", "no \"text\" member"},
      {R"({"text":5})", "\"text\" is a number, not a string"},
      {R"({"text":null})", "\"text\" is null, not a string"},
      {R"({"text":["a"]})", "\"text\" is an array, not a string"},
      {R"({"text":{"s":"a"}})", "\"text\" is an object, not a string"},
      {R"({"text":"a","text":"b"})", "duplicate \"text\""},
      {R"({"text":"lone \ud83d here"})", "lone high surrogate \\ud83d"},
      {R"({"text":"lone \ude0b here"})", "lone low surrogate \\ude0b"},
      {R"({"text":"\ud83d\u0041"})", "not a low surrogate"},
      {R"({"text":"\ud83d"})", "lone high surrogate"},
      {"{\"text\":\"raw\ttab\"}", "raw control character \\x09"},
      {"{\"text\":\"bad \xff byte\"}", "invalid UTF-8 byte \\xff"},
      {"{\"text\":\"cut \xe2\x80\"}", "invalid UTF-8 byte \\xe2"},
      {"{\"text\":\"overlong \xc0\xaf\"}", "invalid UTF-8 byte \\xc0"},
      {"{\"text\":\"surrogate \xed\xa0\x80\"}", "invalid UTF-8 byte \\xed"},
      {"{\"text\":\"too big \xf4\x90\x80\x80\"}", "invalid UTF-8 byte \\xf4"},
      {"{\"text\":\"a\",\"url\":\"\x80\"}", "invalid UTF-8 byte \\x80"},
      {R"({"text":"a"} x)", "trailing characters"},
      {R"({"text":"a"}{"text":"b"})", "trailing characters"},
      {R"({"text":"a"},)", "trailing characters"},
      {"{\"text\":\"a\",\"deep\":" + std::string(300, '[') + std::string(300, ']') + "}", "nesting deeper"},
  };
  for (const Case& c : cases) {
    const std::string e = error_of(c.line);
    EXPECT_NE(e.find(c.reason), std::string::npos) << "line: " << c.line << "\nerror: " << e;
    EXPECT_NE(e.find("(column "), std::string::npos) << e;
  }
}

TEST(JsonLine, Utf8Validation) {
  EXPECT_TRUE(is_valid_utf8("plain \xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x8b"));
  EXPECT_FALSE(is_valid_utf8("\xc3"));
  EXPECT_FALSE(is_valid_utf8("\xe0\x80\x80"));  // overlong
  EXPECT_FALSE(is_valid_utf8("\xf0\x80\x80\x80"));  // overlong
  EXPECT_FALSE(is_valid_utf8("\xf5\x80\x80\x80"));
}

// ---------------------------------------------------------------------------------------------
// Line reading

void write_gzip(const fs::path& p, const std::string& data) {
  gzFile gz = gzopen(p.string().c_str(), "wb9");
  ASSERT_NE(gz, nullptr);
  ASSERT_EQ(gzwrite(gz, data.data(), unsigned(data.size())), int(data.size()));
  ASSERT_EQ(gzclose(gz), Z_OK);
}

std::vector<std::string> read_all(const fs::path& p) {
  LineReader r(p.string());
  std::vector<std::string> lines;
  std::string line;
  while (r.next(&line)) {
    lines.push_back(line);
    EXPECT_EQ(r.line_number(), lines.size());
  }
  return lines;
}

TEST(LineReader, PlainAndGzipGiveTheSameLines) {
  TempDir tmp("lines");
  const std::string long_line(3 << 20, 'x');  // longer than one read chunk
  const std::string data = "a\nb c\r\n\n" + long_line + "\nlast without newline";
  const std::vector<std::string> want = {"a", "b c\r", "", long_line, "last without newline"};
  std::ofstream(tmp.path / "plain.jsonl", std::ios::binary) << data;
  write_gzip(tmp.path / "z.json.gz", data);
  EXPECT_EQ(read_all(tmp.path / "plain.jsonl"), want);
  EXPECT_EQ(read_all(tmp.path / "z.json.gz"), want);
  // Two concatenated gzip members read as one stream (e.g. `cat a.gz b.gz`).
  write_gzip(tmp.path / "m1.gz", "one\n");
  write_gzip(tmp.path / "m2.gz", "two\n");
  auto both = read_bytes(tmp.path / "m1.gz");
  const auto b2 = read_bytes(tmp.path / "m2.gz");
  both.insert(both.end(), b2.begin(), b2.end());
  std::ofstream(tmp.path / "both.gz", std::ios::binary)
      .write(reinterpret_cast<const char*>(both.data()), std::streamsize(both.size()));
  EXPECT_EQ(read_all(tmp.path / "both.gz"), (std::vector<std::string>{"one", "two"}));
  std::ofstream(tmp.path / "empty.jsonl");
  EXPECT_TRUE(read_all(tmp.path / "empty.jsonl").empty());
}

std::string read_error(const fs::path& p) {
  try {
    read_all(p);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

TEST(LineReader, TruncatedAndCorruptGzip) {
  TempDir tmp("gzerr");
  std::string data;
  for (int i = 0; i < 20000; ++i) data += "{\"text\":\"line " + std::to_string(i * 7919 % 10007) + "\"}\n";
  write_gzip(tmp.path / "full.json.gz", data);
  auto bytes = read_bytes(tmp.path / "full.json.gz");
  const fs::path cut = tmp.path / "cut.json.gz";
  std::ofstream(cut, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                              std::streamsize(bytes.size() / 2));
  std::string e = read_error(cut);
  EXPECT_NE(e.find(cut.string() + ": truncated gzip stream (unexpected end of file)"), std::string::npos) << e;
  // Only the 8-byte trailer (crc, length) missing.
  std::ofstream(cut, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                              std::streamsize(bytes.size() - 8));
  e = read_error(cut);
  EXPECT_NE(e.find("truncated gzip stream"), std::string::npos) << e;

  auto bad = bytes;
  for (size_t i = bad.size() / 3; i < bad.size() / 3 + 64; ++i) bad[i] ^= 0x5a;
  const fs::path corrupt = tmp.path / "corrupt.json.gz";
  std::ofstream(corrupt, std::ios::binary).write(reinterpret_cast<const char*>(bad.data()),
                                                  std::streamsize(bad.size()));
  e = read_error(corrupt);
  EXPECT_NE(e.find(corrupt.string() + ": corrupt gzip stream"), std::string::npos) << e;

  e = read_error(tmp.path / "missing.json.gz");
  EXPECT_NE(e.find("missing.json.gz: cannot open"), std::string::npos) << e;
}

TEST(Tokenize, ShardNames) {
  EXPECT_EQ(shard_path_for("c4/en/c4-train.00000-of-01024.json.gz", "out"), "out/c4-train.00000-of-01024.shard");
  EXPECT_EQ(shard_path_for("x.jsonl", "o"), "o/x.shard");
  EXPECT_EQ(shard_path_for("x.jsonl.gz", "o"), "o/x.shard");
  EXPECT_EQ(shard_path_for("x.json", "o"), "o/x.shard");
  EXPECT_EQ(shard_path_for("x.txt.gz", "o"), "o/x.txt.shard");
  EXPECT_EQ(shard_path_for("notes", "o/"), "o/notes.shard");
}

// ---------------------------------------------------------------------------------------------
// The real T5 vocabulary

#define REQUIRE_SHARED_DATA()                                                                  \
  if (shared_data_dir().empty())                                                               \
  GTEST_SKIP() << "../shared/data (spiece.model, C4 samples) is not beside this checkout"

TEST(T5Vocabulary, SpecialIdsAndGoldenEncodings) {
  REQUIRE_SHARED_DATA();
  const Tokenizer tok(shared_data_dir() + "/spiece.model");
  EXPECT_EQ(tok.vocab_size(), 32000);
  EXPECT_EQ(tok.eos_id(), 1);
  EXPECT_EQ(tok.processor().pad_id(), 0);
  EXPECT_EQ(tok.processor().unk_id(), 2);
  EXPECT_EQ(tok.processor().bos_id(), -1);
  const std::vector<std::pair<std::string, std::vector<int>>> golden = {
      {"Studies have been shown that owning a dog is good for you",
       {6536, 43, 118, 2008, 24, 293, 53, 3, 9, 1782, 19, 207, 21, 25}},
      {"The quick brown fox jumps over the lazy dog.",
       {37, 1704, 4216, 3, 20400, 4418, 7, 147, 8, 19743, 1782, 5}},
      {"Beginners BBQ Class Taking Place in Missoula!",
       {12847, 277, 15068, 4501, 3, 12297, 3399, 16, 5964, 7115, 9, 55}},
      {"It\xe2\x80\x99s caf\xc3\xa9 time \xe2\x80\x94 na\xc3\xafve r\xc3\xa9sum\xc3\xa9.",
       {94, 22, 7, 11949, 97, 3, 318, 3, 29, 9, 2, 162, 1417, 4078, 154, 5}},
      {"  multiple   spaces\tand\ttabs\n", {1317, 4856, 11, 3808, 7}},
      {"\xef\xbc\xa1\xef\xbc\xa2\xef\xbc\xa3 \xe2\x91\xa0", {14213, 209}},
  };
  std::vector<int> ids;
  for (const auto& [text, want] : golden) {
    tok.encode(text, &ids);
    EXPECT_EQ(ids, want) << text;
  }
}

TEST(T5Vocabulary, MissingModelIsAUserError) {
  try {
    Tokenizer tok("/nonexistent/spiece.model");
    ADD_FAILURE() << "no error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("SentencePiece model /nonexistent/spiece.model: cannot open (No such file or directory)"),
              std::string::npos)
        << e.what();
  }
}

// ---------------------------------------------------------------------------------------------
// The real C4 samples, each tokenized once for the whole suite.

class C4Shards : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (shared_data_dir().empty()) return;
    dir_ = new TempDir("c4");
    const std::string data = shared_data_dir();
    auto run = [&](const std::string& input, const std::string& out, int threads, size_t batch) {
      TokenizeOptions o;
      o.spm_model = data + "/spiece.model";
      o.input_globs = {input};
      o.output_dir = (dir_->path / out).string();
      o.threads = threads;
      o.batch_lines = batch;
      o.quiet = true;
      std::FILE* sink = std::tmpfile();
      TokenizeSummary s = tokenize_inputs(o, sink, sink);
      std::fclose(sink);
      return s;
    };
    try {
      // Small batches with several threads, so that results arrive out of order.
      gz_ = new TokenizeSummary(run(data + "/c4/c4-en-train-00000-first1000.json.gz", "gz", 2, 16));
      jsonl_ = new TokenizeSummary(run(data + "/c4/c4-en-train-00000-first1000.jsonl", "jsonl", 1, 512));
      olmo1_ = new TokenizeSummary(run(data + "/c4/olmo/c4-sample.00000-of-00001.json.gz", "olmo1", 1, 512));
      olmo2_ = new TokenizeSummary(run(data + "/c4/olmo/c4-sample.00000-of-00001.json.gz", "olmo2", 2, 7));
    } catch (const std::exception& e) {
      setup_error_ = e.what();
    }
  }
  static void TearDownTestSuite() {
    delete gz_;
    delete jsonl_;
    delete olmo1_;
    delete olmo2_;
    delete dir_;
  }
  void SetUp() override {
    REQUIRE_SHARED_DATA();
    ASSERT_EQ(setup_error_, "") << "tokenizing the C4 samples failed";
  }

  static inline TempDir* dir_ = nullptr;
  static inline std::string setup_error_;
  static inline TokenizeSummary *gz_ = nullptr, *jsonl_ = nullptr, *olmo1_ = nullptr, *olmo2_ = nullptr;
};

TEST_F(C4Shards, CountsMatchProvenance) {
  ASSERT_EQ(gz_->shards.size(), 1u);
  EXPECT_EQ(gz_->files, 1);
  EXPECT_EQ(gz_->documents, 1000);
  EXPECT_EQ(gz_->bad_lines, 0);
  EXPECT_EQ(gz_->tokens - gz_->documents, 512612) << "T5 tokens without EOS (PROVENANCE 3a)";
  EXPECT_EQ(fs::path(gz_->shards[0]).filename(), "c4-en-train-00000-first1000.shard");
  ShardReader r(gz_->shards[0]);
  EXPECT_EQ(r.num_documents(), 1000u);
  EXPECT_EQ(r.num_tokens(), 512612u + 1000u);
  EXPECT_EQ(r.header().vocab_size, 32000u);
  EXPECT_EQ(r.header().token_bytes, 2u);
  for (uint64_t d = 0; d < r.num_documents(); ++d) {
    ASSERT_GE(r.doc_length(d), 2u);
    ASSERT_EQ(r.token(r.doc_begin(d) + r.doc_length(d) - 1), 1) << "document " << d << " ends with EOS";
  }
  // The first C4 document starts "Beginners BBQ Class Taking Place in Missoula!".
  const std::vector<int32_t> bbq = {12847, 277, 15068, 4501, 3, 12297, 3399, 16, 5964, 7115, 9, 55};
  std::vector<int32_t> head(bbq.size());
  r.copy_tokens(0, head.size(), head.data());
  EXPECT_EQ(head, bbq);

  EXPECT_EQ(olmo1_->documents, 1000);
  EXPECT_EQ(olmo1_->tokens - olmo1_->documents, 506135) << "PROVENANCE 3c";
}

TEST_F(C4Shards, GzipAndEscapedJsonlAreIdentical) {
  EXPECT_EQ(jsonl_->documents, 1000);
  EXPECT_EQ(jsonl_->tokens, gz_->tokens);
  ShardReader a(gz_->shards[0]), b(jsonl_->shards[0]);
  ASSERT_EQ(a.num_documents(), b.num_documents());
  for (uint64_t d = 0; d < a.num_documents(); ++d) ASSERT_EQ(a.doc_length(d), b.doc_length(d)) << d;
  for (uint64_t i = 0; i < a.num_tokens(); ++i) ASSERT_EQ(a.token(i), b.token(i)) << "token " << i;
  EXPECT_EQ(read_bytes(gz_->shards[0]), read_bytes(jsonl_->shards[0]));
}

TEST_F(C4Shards, ThreadCountDoesNotChangeTheBytes) {
  EXPECT_EQ(olmo1_->tokens, olmo2_->tokens);
  EXPECT_EQ(read_bytes(olmo1_->shards[0]), read_bytes(olmo2_->shards[0]))
      << "--threads 1 (batches of 512) and --threads 2 (batches of 7) differ";
}

// Shard document == SentencePiece(text) + EOS, and decoding it gives the text as SentencePiece
// normalises it: NFKC, whitespace runs (newlines included) collapsed to one space, leading and
// trailing whitespace dropped. Where the decoded string still differs (a piece outside the
// vocabulary decodes to " ⁇ "), the ids are compared instead.
TEST_F(C4Shards, RoundTripMatchesSentencePiece) {
  const Tokenizer tok(shared_data_dir() + "/spiece.model");
  LineReader lines(shared_data_dir() + "/c4/c4-en-train-00000-first1000.jsonl");
  std::vector<std::string> texts;
  std::string line, text, error;
  while (lines.next(&line)) {
    ASSERT_TRUE(extract_json_text(line, &text, &error)) << error;
    texts.push_back(text);
  }
  ASSERT_EQ(texts.size(), 1000u);
  ShardReader r(gz_->shards[0]);
  int exact = 0, sampled = 0;
  std::vector<int> ids;
  for (uint64_t d = 0; d < r.num_documents(); d += 23) {
    ++sampled;
    std::vector<int32_t> doc(r.doc_length(d));
    r.copy_tokens(r.doc_begin(d), doc.size(), doc.data());
    tok.encode(texts[d], &ids);
    std::vector<int> want = ids;
    want.push_back(1);
    ASSERT_EQ(std::vector<int>(doc.begin(), doc.end()), want) << "document " << d;

    const std::vector<int> body(doc.begin(), doc.end() - 1);
    const std::string decoded = tok.decode(body);
    std::string collapsed;  // whitespace-normalised text
    for (char c : texts[d]) {
      const bool space = c == ' ' || c == '\n' || c == '\t' || c == '\r';
      if (space) {
        if (!collapsed.empty() && collapsed.back() != ' ') collapsed += ' ';
      } else {
        collapsed += c;
      }
    }
    while (!collapsed.empty() && collapsed.back() == ' ') collapsed.pop_back();
    if (decoded == collapsed) {
      ++exact;
      continue;
    }
    if (std::find(body.begin(), body.end(), 2) != body.end()) continue;  // <unk> decodes lossy
    tok.encode(decoded, &ids);
    EXPECT_EQ(ids, body) << "document " << d << ": decode -> encode changed the ids";
  }
  EXPECT_GE(exact, sampled * 3 / 4) << exact << " of " << sampled
                                    << " documents decode to their whitespace-normalised text";
}

}  // namespace
