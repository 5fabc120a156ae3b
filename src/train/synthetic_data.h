// A deterministic synthetic seq2seq task for training before the C4 pipeline exists, and for
// tests: each example is a random token string w (length uniform in [L/2, L], L = min(inputs,
// targets) - 1) and the target is w ("copy") or w reversed ("reverse"), both followed by EOS.
//   encoder_input_tokens = w + [EOS] + pad        decoder_input_tokens = [start] + target[:-1]
//   labels = target + [-100 ...]                   masks mark the real tokens
// Example k of a stream is a pure function of (seed, stream, k): the global batch of step s is
// examples (s-1)*batch .. s*batch-1 whatever the number of processes or micro-batches.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"
#include "model/batch.h"

namespace switcht5 {

class SyntheticTask {
 public:
  enum class Stream : uint64_t { kTrain = 1, kValidation = 2 };
  SyntheticTask(const DataConfig& data, const ModelConfig& model, uint64_t seed);
  // Fills `out` (resized to `count` x lengths) with examples first, first+1, ... of `stream`.
  void fill(Batch& out, Stream stream, int64_t first, int count);

 private:
  bool reverse_;
  int inputs_length_, targets_length_;
  int vocab_lo_, vocab_hi_;  // tokens drawn from [lo, hi)
  int eos_, start_;
  uint64_t seed_;
  std::vector<int32_t> words_;  // one example's tokens, reused
};

}  // namespace switcht5
