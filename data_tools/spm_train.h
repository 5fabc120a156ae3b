// `switcht5-data spm-train`: trains a SentencePiece unigram model on the "text" of C4-style JSON
// lines with T5's special ids (pad 0, eos 1, unk 2, no bos).
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <unordered_map>
#include <vector>

namespace switcht5::data_tools {

struct SpmTrainOptions {
  std::vector<std::string> input_globs;
  std::string model_prefix;          // writes PREFIX.model and PREFIX.vocab
  int vocab_size = 32000;
  int threads = 1;
  int64_t max_sentences = 0;         // input_sentence_size: 0 = all, else a random sample
  double character_coverage = 0.9995;  // what T5's spiece.model records
  int64_t max_bad_lines = 100;
  bool quiet = false;                // SentencePiece's own log only for errors
  bool force = false;                // replace PREFIX.model / PREFIX.vocab if they exist
};

// The SentencePiece trainer settings used (a flag name -> value map, as spm_train takes them).
std::unordered_map<std::string, std::string> spm_trainer_flags(const SpmTrainOptions& opts);

// Trains and writes PREFIX.model / PREFIX.vocab. Returns the number of training sentences
// (non-blank lines of the documents' text) that were fed to the trainer.
int64_t train_spm(const SpmTrainOptions& opts, std::FILE* log);

}  // namespace switcht5::data_tools
