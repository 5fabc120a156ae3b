// build/switcht5-data as a user runs it: tokenize (thread-count independence, malformed lines,
// truncated gzip, empty files, globs, replacing shards), inspect, spm-train, and exit code 2 with
// one clear line for bad input.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <sentencepiece_processor.h>

#include "data/shard.h"
#include "test_util.h"
#include "tokenize.h"

namespace {

namespace fs = std::filesystem;
using switcht5::ShardReader;
using switcht5::data_tools::Tokenizer;
using switcht5::testing::shared_data_dir;

const std::string kBin = std::string(SWITCHT5_BINARY_DIR) + "/switcht5-data";

using Result = switcht5::testing::CommandResult;

Result run(const std::string& args) { return switcht5::testing::run_command(kBin + " " + args); }

// The path in single quotes for the shell (test paths hold no quotes).
std::string q(const fs::path& p) {
  std::string s = p.string();
  s.insert(s.begin(), '\'');
  s.push_back('\'');
  return s;
}

// A fresh directory for the running test, removed afterwards.
struct TestDir {
  fs::path path;
  TestDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() /
           ("switcht5_test_data_cli_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TestDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> names;
  if (!fs::exists(dir)) return names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::vector<char> read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::string spm() { return shared_data_dir() + "/spiece.model"; }

#define REQUIRE_SHARED_DATA()                                                                  \
  if (shared_data_dir().empty())                                                               \
  GTEST_SKIP() << "../shared/data (spiece.model, C4 samples) is not beside this checkout"

// ---------------------------------------------------------------------------------------------

TEST(DataCli, UsageAndBadFlags) {
  Result r = run("--help");
  EXPECT_EQ(r.code, 0);
  EXPECT_TRUE(contains(r.output, "tokenize --spm MODEL")) << r.output;
  r = run("");
  EXPECT_EQ(r.code, 2);
  EXPECT_TRUE(contains(r.output, "switcht5-data: error: missing command")) << r.output;
  r = run("frobnicate");
  EXPECT_EQ(r.code, 2);
  EXPECT_TRUE(contains(r.output, "unknown command \"frobnicate\"")) << r.output;
  r = run("tokenize --spm x.model --input x --output o --threads 0");
  EXPECT_EQ(r.code, 2);
  EXPECT_TRUE(contains(r.output, "--threads: must be at least 1, got 0")) << r.output;
  r = run("tokenize --spm x.model --input x --output o --threads two");
  EXPECT_EQ(r.code, 2);
  EXPECT_TRUE(contains(r.output, "--threads: expected an integer, got \"two\"")) << r.output;
  r = run("tokenize --spm x.model --input x --output o --frobnicate");
  EXPECT_EQ(r.code, 2);
  EXPECT_TRUE(contains(r.output, "unknown option \"--frobnicate\"")) << r.output;
  r = run("tokenize --input x --output o");
  EXPECT_EQ(r.code, 2);
  EXPECT_TRUE(contains(r.output, "--spm MODEL is required")) << r.output;
  r = run("inspect");
  EXPECT_EQ(r.code, 2);
  EXPECT_TRUE(contains(r.output, "SHARD is required")) << r.output;
}

// --help (or -h) anywhere, on any subcommand: the usage, exit 0, nothing run.
TEST(DataCli, HelpOnEverySubcommand) {
  for (const char* args : {"--help", "-h", "help", "tokenize --help", "spm-train --help",
                           "inspect --help", "inspect x.shard -h", "tokenize --spm m --help"}) {
    const Result r = run(args);
    EXPECT_EQ(r.code, 0) << args << "\n" << r.output;
    EXPECT_TRUE(contains(r.output, "usage: switcht5-data <command>")) << args << "\n" << r.output;
  }
}

// A flag given twice would silently keep one value: exit 2 naming it; --input adds globs.
TEST(DataCli, FlagGivenTwice) {
  for (const auto& [args, part] : std::vector<std::pair<std::string, std::string>>{
           {"tokenize --spm a --spm b", "tokenize: --spm is given twice; give it once"},
           {"tokenize --output a --output=b", "tokenize: --output is given twice"},
           {"spm-train --vocab-size 8 --vocab-size 9", "spm-train: --vocab-size is given twice"},
           {"inspect x.shard --spm a --spm a", "inspect: --spm is given twice"}}) {
    const Result r = run(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.output;
    EXPECT_TRUE(contains(r.output, part)) << args << "\n" << r.output;
  }
  TestDir dir;
  const Result r = run("tokenize --spm " + q(dir / "none.model") + " --input " + q(dir / "a") +
                       " --input " + q(dir / "b") + " --output " + q(dir / "out"));
  EXPECT_TRUE(contains(r.output, "--input: no files match \"" + (dir / "a").string()))
      << "--input repeats: " << r.output;
}

TEST(DataCli, GlobMatchingNothing) {
  TestDir dir;
  const Result r = run("tokenize --spm x.model --input " + q(dir / "*.json.gz") + " --output " +
                       q(dir / "out"));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "switcht5-data: error: --input: no files match \"" +
                                     (dir / "*.json.gz").string() + "\""))
      << r.output;
  EXPECT_TRUE(entries(dir / "out").empty());
}

TEST(DataCli, MissingModelAndUnreadableInput) {
  TestDir dir;
  std::ofstream(dir / "a.jsonl") << "{\"text\":\"hi\"}\n";
  Result r = run("tokenize --spm " + q(dir / "none.model") + " --input " + q(dir / "a.jsonl") +
                 " --output " + q(dir / "out"));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "SentencePiece model " + (dir / "none.model").string() +
                                     ": cannot open (No such file or directory)"))
      << r.output;
  // A directory matched by the glob is not an input file.
  fs::create_directories(dir / "d.jsonl");
  r = run("tokenize --spm " + q(dir / "none.model") + " --input " + q(dir / "*.jsonl") + " --output " +
          q(dir / "out"));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "input " + (dir / "d.jsonl").string() +
                                     ": expected a regular file, got a directory"))
      << r.output;
  // Two inputs that would write the same shard.
  std::ofstream(dir / "a.json") << "{\"text\":\"hi\"}\n";
  r = run("tokenize --spm " + q(dir / "none.model") + " --input " + q(dir / "a.json") + " " +
          q(dir / "a.jsonl") + " --output " + q(dir / "out"));
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "would both be written to " + (dir / "out/a.shard").string()))
      << r.output;
  if (::geteuid() != 0) {  // root reads files whatever their mode
    REQUIRE_SHARED_DATA();
    fs::permissions(dir / "a.jsonl", fs::perms::none);
    r = run("tokenize --spm " + q(spm()) + " --input " + q(dir / "a.jsonl") + " --output " +
            q(dir / "out"));
    EXPECT_EQ(r.code, 2) << r.output;
    EXPECT_TRUE(contains(r.output, (dir / "a.jsonl").string() + ": cannot open")) << r.output;
  }
}

// The three 10-document OLMo fixtures through one glob, with 1 and 2 threads.
TEST(DataCli, TokenizeGlobAnyThreadCountAndInspect) {
  REQUIRE_SHARED_DATA();
  TestDir dir;
  const std::string glob = q(shared_data_dir() + "/c4/olmo/c4-sample.0[123].json.gz");
  Result r1 = run("tokenize --spm " + q(spm()) + " --input " + glob + " --output " + q(dir / "t1"));
  ASSERT_EQ(r1.code, 0) << r1.output;
  // 3,479 + 4,904 + 4,164 T5 tokens (PROVENANCE 3d) + one EOS per document.
  EXPECT_TRUE(contains(r1.output, "tokenized 3 files: 30 documents, 12577 tokens (EOS included), 0 "
                                  "malformed lines skipped"))
      << r1.output;
  EXPECT_TRUE(contains(r1.output, "c4-sample.01.shard: 10 documents, 3489 tokens")) << r1.output;
  const std::vector<std::string> want = {"c4-sample.01.shard", "c4-sample.02.shard", "c4-sample.03.shard"};
  EXPECT_EQ(entries(dir / "t1"), want);
  Result r2 = run("tokenize --spm " + q(spm()) + " --input " + glob + " --output " + q(dir / "t2") +
                  " --threads 2 --batch-lines 3 --quiet");
  ASSERT_EQ(r2.code, 0) << r2.output;
  EXPECT_FALSE(contains(r2.output, "c4-sample.01.shard:")) << "--quiet: " << r2.output;
  EXPECT_TRUE(contains(r2.output, "tokenized 3 files")) << r2.output;
  for (const std::string& s : want) EXPECT_EQ(read_bytes(dir / "t1" / s), read_bytes(dir / "t2" / s)) << s;

  const Result i = run("inspect " + q(dir / "t1/c4-sample.02.shard") + " --docs 2 --spm " + q(spm()));
  ASSERT_EQ(i.code, 0) << i.output;
  for (const char* s : {"format: version 1, 2-byte tokens (uint16), vocab_size 32000", "documents: 10",
                        "tokens: 4914", "checksum: OK", "document length in tokens (EOS included): min",
                        "doc 0: ", "doc 1: ", "  text: "})
    EXPECT_TRUE(contains(i.output, s)) << s << "\n" << i.output;
  EXPECT_FALSE(contains(i.output, "doc 2: ")) << i.output;

  // A flipped token byte: inspect says BAD and fails (exit 2), the reader refuses it.
  auto bytes = read_bytes(dir / "t1/c4-sample.02.shard");
  bytes[bytes.size() - 4] ^= 0x01;
  std::ofstream(dir / "t1/c4-sample.02.shard", std::ios::binary).write(bytes.data(), std::streamsize(bytes.size()));
  const Result bad = run("inspect " + q(dir / "t1/c4-sample.02.shard"));
  EXPECT_EQ(bad.code, 2) << bad.output;
  EXPECT_TRUE(contains(bad.output, "checksum: BAD")) << bad.output;
  EXPECT_TRUE(contains(bad.output, "switcht5-data: error: " + (dir / "t1/c4-sample.02.shard").string() +
                                       ": checksum mismatch (header "))
      << bad.output;
  const Result not_shard = run("inspect " + q(shared_data_dir() + "/c4/olmo/c4-sample.01.json.gz"));
  EXPECT_EQ(not_shard.code, 2) << not_shard.output;
  EXPECT_TRUE(contains(not_shard.output, "bad magic (not a switcht5 token shard)")) << not_shard.output;
}

TEST(DataCli, TruncatedGzipLeavesNoShard) {
  REQUIRE_SHARED_DATA();
  TestDir dir;
  const auto full = read_bytes(shared_data_dir() + "/c4/c4-en-train-00000-first1000.json.gz");
  const fs::path cut = dir / "c4-half.json.gz";
  std::ofstream(cut, std::ios::binary).write(full.data(), std::streamsize(full.size() / 2));
  const Result r = run("tokenize --spm " + q(spm()) + " --input " + q(cut) + " --output " + q(dir / "out") +
                       " --threads 2");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "switcht5-data: error: " + cut.string() +
                                     ": truncated gzip stream (unexpected end of file)"))
      << r.output;
  EXPECT_EQ(entries(dir / "out"), std::vector<std::string>{}) << "no shard, no temporary file";
}

const char* kBadLines =
    "{\"text\":\"The first good line.\",\"url\":\"a\"}\n"
    "{\"text\":\"broken json\",}\n"
    "{\"url\":\"no text here\",\"timestamp\":\"2019-04-25T12:57:54Z\"}\n"
    "\n"
    "{\"text\":\"Second good line, with caf\\u00e9.\"}\n"
    "{\"text\":17}\n"
    "{\"text\":\"Third good line.\"}";

TEST(DataCli, MalformedLinesAreReportedAndSkipped) {
  REQUIRE_SHARED_DATA();
  TestDir dir;
  std::ofstream(dir / "mixed.jsonl") << kBadLines;
  const Result r = run("tokenize --spm " + q(spm()) + " --input " + q(dir / "mixed.jsonl") + " --output " +
                       q(dir / "out"));
  ASSERT_EQ(r.code, 0) << r.output;
  const std::string file = (dir / "mixed.jsonl").string();
  EXPECT_TRUE(contains(r.output, file + ":2: malformed line skipped: expected a string key")) << r.output;
  EXPECT_TRUE(contains(r.output, file + ":3: malformed line skipped: no \"text\" member")) << r.output;
  EXPECT_TRUE(contains(r.output, file + ":6: malformed line skipped: \"text\" is a number")) << r.output;
  EXPECT_FALSE(contains(r.output, file + ":4:")) << "a blank line is not malformed: " << r.output;
  EXPECT_TRUE(contains(r.output, "3 documents")) << r.output;
  EXPECT_TRUE(contains(r.output, "3 malformed lines skipped")) << r.output;

  const Tokenizer tok(spm());
  std::vector<int32_t> want;
  std::vector<int> ids;
  for (const char* t : {"The first good line.", "Second good line, with caf\xc3\xa9.", "Third good line."}) {
    tok.encode(t, &ids);
    want.insert(want.end(), ids.begin(), ids.end());
    want.push_back(1);
  }
  ShardReader s((dir / "out/mixed.shard").string());
  ASSERT_EQ(s.num_documents(), 3u);
  std::vector<int32_t> got(s.num_tokens());
  s.copy_tokens(0, got.size(), got.data());
  EXPECT_EQ(got, want);
}

TEST(DataCli, TooManyMalformedLinesKeepsTheOldShard) {
  REQUIRE_SHARED_DATA();
  TestDir dir;
  const fs::path in = dir / "mixed.jsonl";
  std::ofstream(in) << "{\"text\":\"a complete shard first\"}\n";
  Result r = run("tokenize --spm " + q(spm()) + " --input " + q(in) + " --output " + q(dir / "out") + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  const auto old_shard = read_bytes(dir / "out/mixed.shard");

  std::ofstream(in) << kBadLines;
  r = run("tokenize --spm " + q(spm()) + " --input " + q(in) + " --output " + q(dir / "out") +
          " --max-bad-lines 2 --threads 2 --batch-lines 1 --force");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "switcht5-data: error: too many malformed lines: 3 so far, more than "
                                 "--max-bad-lines 2"))
      << r.output;
  EXPECT_EQ(entries(dir / "out"), std::vector<std::string>{"mixed.shard"}) << "no partial shard";
  EXPECT_EQ(read_bytes(dir / "out/mixed.shard"), old_shard) << "the complete shard is untouched";

  // Without an old shard nothing is left at all.
  r = run("tokenize --spm " + q(spm()) + " --input " + q(in) + " --output " + q(dir / "out2") +
          " --max-bad-lines 0");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "more than --max-bad-lines 0")) << r.output;
  EXPECT_TRUE(entries(dir / "out2").empty());
}

TEST(DataCli, EmptyInputGivesAnEmptyShard) {
  REQUIRE_SHARED_DATA();
  TestDir dir;
  std::ofstream(dir / "empty.json");
  std::ofstream(dir / "blank.jsonl") << "\n\n";
  const Result r = run("tokenize --spm " + q(spm()) + " --input " + q(dir / "empty.json") + " " +
                       q(dir / "blank.jsonl") + " --output " + q(dir / "out") + " --threads 2");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "warning: " + (dir / "empty.json").string() + ": no documents (empty file)"))
      << r.output;
  EXPECT_TRUE(contains(r.output, (dir / "blank.jsonl").string() + ": no documents (2 lines, all blank"))
      << r.output;
  for (const char* s : {"out/empty.shard", "out/blank.shard"}) {
    ShardReader shard((dir / s).string());
    EXPECT_EQ(shard.num_documents(), 0u);
    EXPECT_EQ(shard.num_tokens(), 0u);
  }
}

// Outputs that exist are replaced only with --force: refused before any work, one line, exit 2,
// the file untouched.
TEST(DataCli, OutputsAreNeverReplacedWithoutForce) {
  REQUIRE_SHARED_DATA();
  TestDir dir;
  const fs::path in = dir / "doc.jsonl";
  std::ofstream(in) << "{\"text\":\"a shard that must survive\"}\n";
  const std::string tok = "tokenize --quiet --spm " + q(spm()) + " --input " + q(in) + " --output " + q(dir / "out");
  ASSERT_EQ(run(tok).code, 0);
  const auto shard = read_bytes(dir / "out/doc.shard");
  std::ofstream(in) << "{\"text\":\"other text\"}\n";
  Result r = run(tok);
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_EQ(r.output, "switcht5-data: error: " + (dir / "out/doc.shard").string() +
                          ": the shard exists; pass --force to replace it\n");
  EXPECT_EQ(read_bytes(dir / "out/doc.shard"), shard);
  r = run(tok + " --force");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(read_bytes(dir / "out/doc.shard"), shard);
  // spm-train: PREFIX.model exists.
  std::ofstream(dir / "m.model") << "not replaced";
  r = run("spm-train --input " + q(in) + " --model-prefix " + q(dir / "m") + " --vocab-size 8");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_EQ(r.output, "switcht5-data: error: " + (dir / "m.model").string() +
                          ": the file exists; pass --force to replace it\n");
  EXPECT_EQ(read_bytes(dir / "m.model"), std::vector<char>({'n', 'o', 't', ' ', 'r', 'e', 'p', 'l', 'a', 'c', 'e', 'd'}));
}

// A small vocabulary trained on 30 C4 documents with T5's special ids, then used to tokenize.
TEST(DataCli, SpmTrainThenTokenize) {
  REQUIRE_SHARED_DATA();
  TestDir dir;
  const std::string glob = q(shared_data_dir() + "/c4/olmo/c4-sample.0[123].json.gz");
  Result r = run("spm-train --input " + glob + " --model-prefix " + q(dir / "spm/tiny") +
                 " --vocab-size 300 --threads 2 --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "spm-train: 3 files, 30 documents")) << r.output;
  ASSERT_TRUE(fs::exists(dir / "spm/tiny.model"));
  EXPECT_TRUE(fs::exists(dir / "spm/tiny.vocab"));
  const Tokenizer tok((dir / "spm/tiny.model").string());
  EXPECT_EQ(tok.vocab_size(), 300);
  EXPECT_EQ(tok.processor().pad_id(), 0);
  EXPECT_EQ(tok.eos_id(), 1);
  EXPECT_EQ(tok.processor().unk_id(), 2);
  EXPECT_EQ(tok.processor().bos_id(), -1);

  r = run("tokenize --spm " + q(dir / "spm/tiny.model") + " --input " + glob + " --output " +
          q(dir / "out") + " --quiet");
  ASSERT_EQ(r.code, 0) << r.output;
  ShardReader s((dir / "out/c4-sample.01.shard").string());
  EXPECT_EQ(s.header().vocab_size, 300u);
  EXPECT_EQ(s.num_documents(), 10u);

  r = run("spm-train --input " + glob + " --model-prefix " + q(dir / "spm/x") + " --max-sentences 50");
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "--max-sentences must be 0 (all) or more than 100")) << r.output;
}

}  // namespace
