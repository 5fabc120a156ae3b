// switcht5-data: C4 JSON lines -> SentencePiece -> token shards, and shard tools.
//   switcht5-data tokenize  --spm MODEL --input GLOB... --output DIR [--threads N] ...
//   switcht5-data spm-train --input GLOB... --model-prefix PREFIX [--vocab-size N] ...
//   switcht5-data inspect   SHARD [--docs N] [--spm MODEL]
// Exit codes: 0 success, 2 anything the user can fix (flags, missing or malformed files, storage,
// memory), 1 an internal error.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <new>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "core/check.h"
#include "inspect.h"
#include "spm_train.h"
#include "tokenize.h"

namespace {

using namespace switcht5;
using namespace switcht5::data_tools;

constexpr const char* kUsage =
    "usage: switcht5-data <command> [options]\n"
    "commands:\n"
    "  tokenize --spm MODEL --input GLOB [GLOB...] [--input GLOB...] --output DIR\n"
    "           [--threads N] [--max-bad-lines N] [--batch-lines N] [--quiet] [--force]\n"
    "      C4-style JSON lines (.json.gz or plain; the \"text\" of each line) -> SentencePiece ids\n"
    "      + EOS -> DIR/<input name>.shard, one shard per input file. --threads N: encoding\n"
    "      threads (output identical for any N; default 1). --max-bad-lines N: malformed lines\n"
    "      skipped before giving up (default 100). --batch-lines N: lines per work item\n"
    "      (default 64). --quiet: no progress and no per-file lines. --force: replace shards\n"
    "      that exist (otherwise refused before any work).\n"
    "  spm-train --input GLOB [GLOB...] --model-prefix PREFIX [--vocab-size N] [--threads N]\n"
    "           [--max-sentences N] [--character-coverage X] [--max-bad-lines N] [--quiet]\n"
    "           [--force]\n"
    "      train a SentencePiece unigram model with T5's settings (pad 0, eos 1, unk 2, no bos)\n"
    "      on the text's lines; writes PREFIX.model and PREFIX.vocab. Defaults: vocab 32000,\n"
    "      all sentences (--max-sentences N samples N), character coverage 0.9995 (T5's).\n"
    "      --force: replace PREFIX.model and PREFIX.vocab if they exist.\n"
    "  inspect SHARD [--docs N] [--spm MODEL]\n"
    "      header, checksum, document lengths and the first N documents (default 3), decoded\n"
    "      with MODEL when given.\n";

int64_t parse_int(const std::string& flag, const std::string& v, int64_t min) {
  size_t used = 0;
  int64_t x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  SWT_USER_CHECK(used == v.size() && !v.empty(), "{}: expected an integer, got \"{}\"", flag, v);
  SWT_USER_CHECK(x >= min, "{}: must be at least {}, got {}", flag, min, x);
  return x;
}

double parse_double(const std::string& flag, const std::string& v) {
  size_t used = 0;
  double x = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  SWT_USER_CHECK(used == v.size() && !v.empty(), "{}: expected a number, got \"{}\"", flag, v);
  return x;
}

// Walks argv after the command: options "--flag value" or "--flag=value"; `--input` takes every
// following argument up to the next option (an unquoted glob expanded by the shell).
class ArgWalker {
 public:
  ArgWalker(int argc, char** argv, const std::string& command)
      : args_(argv + 2, argv + argc), command_(command) {}

  bool next() {
    if (i_ >= args_.size()) return false;
    arg_ = args_[i_++];
    inline_value_.reset();
    flag_ = arg_;
    if (arg_.rfind("--", 0) == 0) {
      const size_t eq = arg_.find('=');
      if (eq != std::string::npos) {
        flag_ = arg_.substr(0, eq);
        inline_value_ = arg_.substr(eq + 1);
      }
      // A second value would silently replace the first; --input adds globs by design.
      SWT_USER_CHECK(flag_ == "--input" || given_.insert(flag_).second,
                     "{}: {} is given twice; give it once", command_, flag_);
    }
    return true;
  }
  const std::string& flag() const { return flag_; }
  bool is_option() const { return arg_.rfind("--", 0) == 0; }
  std::string value() {
    if (inline_value_) return *inline_value_;
    SWT_USER_CHECK(i_ < args_.size(), "{}: {} needs a value", command_, flag_);
    return args_[i_++];
  }
  std::vector<std::string> values() {
    std::vector<std::string> v;
    if (inline_value_) v.push_back(*inline_value_);
    while (i_ < args_.size() && args_[i_].rfind("--", 0) != 0) v.push_back(args_[i_++]);
    SWT_USER_CHECK(!v.empty(), "{}: {} needs a value", command_, flag_);
    return v;
  }
  void no_value() {
    SWT_USER_CHECK(!inline_value_, "{}: {} takes no value", command_, flag_);
  }
  [[noreturn]] void unknown() {
    throw UserError(fmt::format("{}: unknown {} \"{}\" (see switcht5-data --help)", command_,
                                is_option() ? "option" : "argument", arg_));
  }

 private:
  std::vector<std::string> args_;
  std::string command_;
  size_t i_ = 0;
  std::string arg_, flag_;
  std::optional<std::string> inline_value_;
  std::set<std::string> given_;  // options seen
};

int cmd_tokenize(int argc, char** argv) {
  TokenizeOptions o;
  ArgWalker a(argc, argv, "tokenize");
  while (a.next()) {
    const std::string& f = a.flag();
    if (f == "--spm") o.spm_model = a.value();
    else if (f == "--input") for (auto& g : a.values()) o.input_globs.push_back(g);
    else if (f == "--output") o.output_dir = a.value();
    else if (f == "--threads") o.threads = int(parse_int(f, a.value(), 1));
    else if (f == "--max-bad-lines") o.max_bad_lines = parse_int(f, a.value(), 0);
    else if (f == "--batch-lines") o.batch_lines = size_t(parse_int(f, a.value(), 1));
    else if (f == "--quiet") a.no_value(), o.quiet = true;
    else if (f == "--force") a.no_value(), o.force = true;
    else a.unknown();
  }
  SWT_USER_CHECK(o.threads <= 1024, "--threads: at most 1024, got {}", o.threads);
  tokenize_inputs(o, stdout, stderr);
  return 0;
}

int cmd_spm_train(int argc, char** argv) {
  SpmTrainOptions o;
  ArgWalker a(argc, argv, "spm-train");
  while (a.next()) {
    const std::string& f = a.flag();
    if (f == "--input") for (auto& g : a.values()) o.input_globs.push_back(g);
    else if (f == "--model-prefix") o.model_prefix = a.value();
    else if (f == "--vocab-size") o.vocab_size = int(parse_int(f, a.value(), 8));
    else if (f == "--threads") o.threads = int(parse_int(f, a.value(), 1));
    else if (f == "--max-sentences") o.max_sentences = parse_int(f, a.value(), 0);
    else if (f == "--character-coverage") o.character_coverage = parse_double(f, a.value());
    else if (f == "--max-bad-lines") o.max_bad_lines = parse_int(f, a.value(), 0);
    else if (f == "--quiet") a.no_value(), o.quiet = true;
    else if (f == "--force") a.no_value(), o.force = true;
    else a.unknown();
  }
  train_spm(o, stderr);
  return 0;
}

int cmd_inspect(int argc, char** argv) {
  InspectOptions o;
  ArgWalker a(argc, argv, "inspect");
  while (a.next()) {
    const std::string& f = a.flag();
    if (f == "--docs") o.docs = parse_int(f, a.value(), 0);
    else if (f == "--spm") o.spm_model = a.value();
    else if (!a.is_option() && o.shard.empty()) o.shard = f;
    else a.unknown();
  }
  SWT_USER_CHECK(!o.shard.empty(), "inspect: SHARD is required (see switcht5-data --help)");
  // A damaged shard is reported whole, then fails like any bad input (one line, exit 2), with
  // the reason training gives, so scripts that check a shard with inspect see it.
  inspect_shard(o, stdout);
  return 0;
}

int run(int argc, char** argv) {
  SWT_USER_CHECK(argc >= 2, "missing command (see switcht5-data --help)");
  const std::string command = argv[1];
  // --help (or -h) anywhere, e.g. `switcht5-data inspect --help`: the usage, exit 0, nothing run.
  bool help = command == "help";
  for (int i = 1; i < argc; ++i)
    help |= std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h";
  if (help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (command == "tokenize") return cmd_tokenize(argc, argv);
  if (command == "spm-train") return cmd_spm_train(argc, argv);
  if (command == "inspect") return cmd_inspect(argc, argv);
  SWT_USER_CHECK(false,
                 "unknown command \"{}\" (expected tokenize, spm-train or inspect; see "
                 "switcht5-data --help)",
                 command);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    // The exit-code contract of switcht5 (src/main.cpp, fail_with): 2 for what the user can
    // fix, the filesystem refusing a path and memory included; 1 for internal errors.
    std::fflush(stdout);
    int code = 1;
    std::string what = e.what();
    if (dynamic_cast<const switcht5::UserError*>(&e) ||
        dynamic_cast<const std::filesystem::filesystem_error*>(&e))
      code = 2;
    if (dynamic_cast<const std::bad_alloc*>(&e)) {
      code = 2;
      what = "out of host memory (an allocation failed)";
    }
    std::fprintf(stderr, "switcht5-data: error: %s\n", what.c_str());
    return code;
  }
}
