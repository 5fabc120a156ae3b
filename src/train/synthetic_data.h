// Deterministic synthetic seq2seq tasks: training without a dataset, tests and benchmarks.
//   "copy" / "reverse": each example is a random token string w (length uniform in [L/2, L],
//     L = min(inputs, targets) - 1) and the target is w or w reversed, both followed by EOS:
//       encoder_input_tokens = w + [EOS] + pad       decoder_input_tokens = [start] + target[:-1]
//       labels = target + [-100 ...]                  masks mark the real tokens
//     Learnable, so tests can watch the loss fall. The encoder holds at most targets_length
//     tokens: with inputs 512 / targets 114, about 83% of its positions are padding.
//   "span_corruption": the shape of T5 pre-training batches without a dataset. Each example is
//     random_spans_helper(inputs_length) raw tokens (568 for 512 inputs) drawn uniformly from
//     [3, V - extra_ids), V = synthetic_vocab or vocab_size, through T5 span corruption
//     (data.noise_density, data.mean_noise_span_length; sentinels V-1, V-2, ... counting down),
//     so the encoder is full (no padding) and the targets are T5's (114 for 512 inputs). Not
//     learnable beyond the sentinels' places: for benchmarks, where padding would route
//     differently from text (a Switch router sends every pad token to the same expert).
// Example k of a stream is a pure function of (seed, stream, k): the global batch of step s is
// examples (s-1)*batch .. s*batch-1 whatever the number of processes or micro-batches.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"
#include "data/span_corruption.h"
#include "model/batch.h"

namespace switcht5 {

class SyntheticTask {
 public:
  enum class Stream : uint64_t { kTrain = 1, kValidation = 2 };
  // Throws UserError naming the data key when the lengths or the vocabulary cannot hold the task.
  SyntheticTask(const DataConfig& data, const ModelConfig& model, uint64_t seed);
  // Fills `out` (resized to `count` x lengths) with examples first, first+1, ... of `stream`.
  void fill(Batch& out, Stream stream, int64_t first, int count);

 private:
  enum class Kind { kCopy, kReverse, kSpanCorruption };
  Kind kind_;
  int inputs_length_, targets_length_;
  int vocab_lo_, vocab_hi_;  // content tokens drawn from [lo, hi)
  int eos_, start_, pad_;
  int raw_length_ = 0;       // span_corruption: raw tokens per example
  SpanCorruptionOptions span_;
  uint64_t seed_;
  std::vector<int32_t> words_, inputs_, targets_;  // one example's tokens, reused
};

}  // namespace switcht5
