#include "spm_train.h"

#include <exception>
#include <filesystem>

#include <fmt/format.h>
#include <sentencepiece_trainer.h>

#include "core/check.h"
#include "json_line.h"
#include "line_reader.h"
#include "tokenize.h"

namespace fs = std::filesystem;

namespace switcht5::data_tools {

namespace {

// Feeds the trainer one "sentence" per non-blank line of each document's text (C4 documents are
// paragraphs separated by '\n'; SentencePiece drops sentences longer than max_sentence_length
// bytes, so whole documents would often be lost). Errors cannot cross SentencePiece's code
// safely, so they are kept, end the iteration and are rethrown after Train returns.
class C4SentenceIterator : public sentencepiece::SentenceIterator {
 public:
  C4SentenceIterator(std::vector<std::string> files, int64_t max_bad_lines, std::FILE* log)
      : files_(std::move(files)), bad_(max_bad_lines, log) {
    advance();
  }

  bool done() const override { return done_; }
  void Next() override { advance(); }
  const std::string& value() const override { return sentence_; }
  sentencepiece::util::Status status() const override {
    if (!error_) return sentencepiece::util::Status();
    return sentencepiece::util::Status(sentencepiece::util::StatusCode::kInternal,
                                       "reading the input failed");
  }

  std::exception_ptr error() const { return error_; }
  int64_t sentences() const { return sentences_; }
  int64_t documents() const { return documents_; }
  int64_t bad_lines() const { return bad_.count(); }

 private:
  void advance() {
    try {
      for (;;) {
        if (next_sentence()) {
          ++sentences_;
          return;
        }
        if (!next_document()) {
          done_ = true;
          return;
        }
      }
    } catch (...) {
      error_ = std::current_exception();
      done_ = true;
    }
  }

  // The next non-blank line of the current text, if any.
  bool next_sentence() {
    while (text_pos_ < text_.size()) {
      size_t end = text_.find('\n', text_pos_);
      if (end == std::string::npos) end = text_.size();
      const std::string_view piece(text_.data() + text_pos_, end - text_pos_);
      text_pos_ = end + 1;
      if (piece.find_first_not_of(" \t\r") != std::string_view::npos) {
        sentence_.assign(piece);
        return true;
      }
    }
    return false;
  }

  // Loads the next document's text; false after the last file.
  bool next_document() {
    for (;;) {
      if (!reader_) {
        if (file_index_ >= files_.size()) return false;
        reader_ = std::make_unique<LineReader>(files_[file_index_++]);
      }
      if (!reader_->next(&line_)) {
        reader_.reset();
        continue;
      }
      if (line_.find_first_not_of(" \t\r") == std::string::npos) continue;
      if (!extract_json_text(line_, &text_, &error_text_)) {
        bad_.report(reader_->path(), reader_->line_number(), error_text_);
        continue;
      }
      text_pos_ = 0;
      ++documents_;
      return true;
    }
  }

  std::vector<std::string> files_;
  size_t file_index_ = 0;
  std::unique_ptr<LineReader> reader_;
  BadLineCounter bad_;
  std::string line_, text_, error_text_, sentence_;
  size_t text_pos_ = 0;
  bool done_ = false;
  std::exception_ptr error_;
  int64_t sentences_ = 0, documents_ = 0;
};

}  // namespace

std::unordered_map<std::string, std::string> spm_trainer_flags(const SpmTrainOptions& opts) {
  // T5's vocabulary (spiece.model's recorded trainer_spec) used: unigram, 32000 pieces,
  // nmt_nfkc normalisation, pad 0 / eos 1 / unk 2 / no bos, no byte fallback, max piece length
  // 16, max sentence length 4192, split by whitespace, unicode script and number (digits not
  // split one by one), seed_sentencepiece_size 1M, shrinking_factor 0.75, 2 sub-iterations,
  // and input_sentence_size 1e8 with shuffling. It recorded character_coverage 0.9995,
  // which is the default here too; --character-coverage changes it.
  return {
      {"model_type", "unigram"},
      {"model_prefix", opts.model_prefix},
      {"vocab_size", std::to_string(opts.vocab_size)},
      {"character_coverage", fmt::format("{}", opts.character_coverage)},
      {"byte_fallback", "false"},
      {"pad_id", "0"},
      {"eos_id", "1"},
      {"unk_id", "2"},
      {"bos_id", "-1"},
      {"normalization_rule_name", "nmt_nfkc"},
      {"split_digits", "false"},
      {"split_by_whitespace", "true"},
      {"split_by_unicode_script", "true"},
      {"split_by_number", "true"},
      {"max_sentencepiece_length", "16"},
      {"max_sentence_length", "4192"},
      {"seed_sentencepiece_size", "1000000"},
      {"shrinking_factor", "0.75"},
      {"num_sub_iterations", "2"},
      {"input_sentence_size", std::to_string(opts.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"num_threads", std::to_string(opts.threads)},
      {"minloglevel", opts.quiet ? "2" : "0"},
  };
}

int64_t train_spm(const SpmTrainOptions& opts, std::FILE* log) {
  SWT_USER_CHECK(!opts.model_prefix.empty(), "spm-train: --model-prefix PREFIX is required");
  SWT_USER_CHECK(opts.vocab_size >= 8, "spm-train: --vocab-size must be at least 8, got {}",
                 opts.vocab_size);
  SWT_USER_CHECK(opts.threads >= 1, "spm-train: --threads must be at least 1, got {}", opts.threads);
  SWT_USER_CHECK(opts.max_sentences == 0 || opts.max_sentences > 100,
                 "spm-train: --max-sentences must be 0 (all) or more than 100 (SentencePiece's "
                 "minimum), got {}",
                 opts.max_sentences);
  SWT_USER_CHECK(opts.character_coverage > 0 && opts.character_coverage <= 1,
                 "spm-train: --character-coverage must be in (0, 1], got {}",
                 opts.character_coverage);
  for (const char* ext : {".model", ".vocab"}) {
    std::error_code ec;
    const std::string out = opts.model_prefix + ext;
    SWT_USER_CHECK(opts.force || !fs::exists(fs::symlink_status(out, ec)),
                   "{}: the file exists; pass --force to replace it", out);
  }
  const std::vector<std::string> files = expand_inputs(opts.input_globs);
  const fs::path parent = fs::path(opts.model_prefix).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    fs::create_directories(parent, ec);
    SWT_USER_CHECK(!ec && fs::is_directory(parent), "--model-prefix {}: cannot create {}",
                   opts.model_prefix, parent.string());
  }

  C4SentenceIterator it(files, opts.max_bad_lines, log);
  const auto status = sentencepiece::SentencePieceTrainer::Train(spm_trainer_flags(opts), &it);
  if (it.error()) std::rethrow_exception(it.error());
  SWT_USER_CHECK(it.sentences() > 0, "spm-train: the inputs hold no text");
  SWT_USER_CHECK(status.ok(), "spm-train: SentencePiece training failed: {}", status.ToString());
  fmt::print(log, "spm-train: {} files, {} documents, {} sentences, {} malformed lines skipped -> "
                  "{}.model, {}.vocab\n",
             files.size(), it.documents(), it.sentences(), it.bad_lines(), opts.model_prefix,
             opts.model_prefix);
  return it.sentences();
}

}  // namespace switcht5::data_tools
