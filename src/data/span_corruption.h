// T5 span corruption (Raffel et al. 2020, t5.data.preprocessors.span_corruption), exactly as T5
// defines it, with this project's counter-based RNG in place of TensorFlow's stateless ops:
//
//   random_spans_helper: the raw piece length L such that a full piece becomes exactly
//     inputs_length input tokens and targets_length target tokens (512 -> L = 568, targets 114
//     for noise_density 0.15 and mean_noise_span_length 3).
//   random_spans_noise_mask(length): num_noise = round(length * density) clamped to
//     [1, length-1]; num_spans = max(1, round(num_noise / mean_span)); noise and non-noise
//     tokens are each split into num_spans non-empty segments by a random segmentation
//     (shuffle of "segment starts here" flags); spans alternate non-noise, noise, starting with
//     non-noise. round() is round-half-to-even, as tf.round and Python's round().
//   inputs  = tokens with each noise span replaced by one sentinel, + EOS
//   targets = each non-noise span replaced by one sentinel (the noise tokens kept), + EOS
//   sentinels: first_sentinel (vocabulary size - 1 = 32099 for T5's 32,100 ids), counting down.
#pragma once
#include <cstdint>
#include <vector>

namespace switcht5 {

struct SpanCorruptionOptions {
  double noise_density = 0.15;
  double mean_noise_span_length = 3.0;
  int32_t first_sentinel = 32099;  // <extra_id_0>; <extra_id_i> = first_sentinel - i
  int32_t eos_id = 1;
};

// T5's random_spans_helper: returns {raw tokens per piece, targets length} for inputs_length.
struct SpanLengths {
  int tokens_length;
  int targets_length;
};
SpanLengths random_spans_helper(int inputs_length, double noise_density,
                                double mean_noise_span_length);

// The lengths span_corrupt gives for `length` >= 2 raw tokens, EOS included, from the noise
// mask's own counts (float32, as TF): inputs = non-noise + spans + 1, targets = noise + spans + 1.
// They can exceed random_spans_helper's (double arithmetic) by one at .5 ties. Throws UserError
// where random_spans_noise_mask would.
struct CorruptedLengths {
  int inputs;
  int targets;
};
CorruptedLengths span_corrupted_lengths(int length, const SpanCorruptionOptions& options);

// The raw piece length for batches of data.inputs_length / data.targets_length: T5's
// random_spans_helper, checked against what span_corrupt then gives. Throws UserError naming
// data.inputs_length when the corrupted inputs would not fit (TF's float32 counts at a .5 tie:
// e.g. inputs_length 9), or data.targets_length when it is below the targets' length.
int span_corruption_piece_length(int inputs_length, int targets_length,
                                 const SpanCorruptionOptions& options);

// Noise mask of `length` tokens (true = noise), a pure function of (length, options, seed).
// length >= 0 (0 gives an empty mask, 1 gives [false]). Throws UserError unless
// 0 <= noise_density < 1, mean_noise_span_length >= 1 and there are at least as many non-noise
// tokens as spans (T5's TF code fails on those too).
std::vector<bool> random_spans_noise_mask(int length, const SpanCorruptionOptions& options,
                                          uint64_t seed);

// Applies span corruption to `tokens` with the mask from `seed`. inputs/targets are resized to
// their actual lengths (EOS included); the caller pads them.
void span_corrupt(const int32_t* tokens, int length, const SpanCorruptionOptions& options,
                  uint64_t seed, std::vector<int32_t>& inputs, std::vector<int32_t>& targets);

}  // namespace switcht5
