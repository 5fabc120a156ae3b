// T5 span corruption. Each function follows the function of the same name in T5's
// t5/data/preprocessors.py (google-research/text-to-text-transfer-transformer); the comments
// quote the Python/TF lines they implement. The only deliberate difference is the randomness:
// TF's seqio.stateless_shuffle is replaced by a Fisher-Yates shuffle driven by CounterRng, so
// masks are not bit-identical to T5's but have the same distribution (uniform over all masks
// with the given token and span counts), and are a pure function of (length, options, seed).
#include "data/span_corruption.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "core/check.h"
#include "core/rng.h"

namespace switcht5 {
namespace {

// Round half to even, as tf.round and Python 3's round(). Exact for |x| < 2^24 (float) or 2^53
// (double): x - floor(x) is then representable, so the tie test is exact.
template <class T>
T round_half_even(T x) {
  T r = std::floor(x);
  T frac = x - r;
  if (frac > T(0.5)) return r + T(1);
  if (frac < T(0.5)) return r;
  return std::fmod(r, T(2)) == T(0) ? r : r + T(1);
}

void check_options(const SpanCorruptionOptions& options) {
  SWT_USER_CHECK(options.noise_density >= 0.0 && options.noise_density < 1.0,
                 "span corruption noise_density must be in [0, 1), got {}", options.noise_density);
  SWT_USER_CHECK(options.mean_noise_span_length >= 1.0,
                 "span corruption mean_noise_span_length must be >= 1, got {}",
                 options.mean_noise_span_length);
}

// Uniform permutation of `v` (Fisher-Yates, from the back), one next_below per swap.
// Stands in for seqio.stateless_shuffle.
template <class T>
void fisher_yates_shuffle(std::vector<T>& v, uint64_t seed) {
  CounterRng rng(seed);
  for (size_t i = v.size(); i > 1; --i) {
    size_t j = static_cast<size_t>(rng.next_below(i));  // j in [0, i-1]
    std::swap(v[i - 1], v[j]);
  }
}

// _random_segmentation(num_items, num_segments, seed) inside random_spans_noise_mask:
// partitions num_items items into num_segments non-empty segments, uniformly over all
// compositions. Returns the segment lengths [num_segments], which sum to num_items.
//   first_in_segment = tf.pad(stateless_shuffle(tf.range(num_items - 1) < num_segments - 1),
//                             [[1, 0]])
//   segment_id = tf.cumsum(first_in_segment)
//   segment_length = tf.math.segment_sum(tf.ones_like(segment_id), segment_id)
// Requires 1 <= num_segments <= num_items.
std::vector<int> random_segmentation(int num_items, int num_segments, uint64_t seed) {
  // starts_after_first[i] says whether item i+1 begins a new segment: num_segments-1 ones among
  // num_items-1 slots, shuffled (item 0 always begins segment 0: the leading pad of 0).
  std::vector<uint8_t> starts_after_first(static_cast<size_t>(num_items - 1), 0);
  std::fill_n(starts_after_first.begin(), num_segments - 1, uint8_t{1});
  fisher_yates_shuffle(starts_after_first, seed);

  // cumsum -> segment ids, segment_sum of ones -> lengths: count items between starts.
  std::vector<int> lengths;
  lengths.reserve(static_cast<size_t>(num_segments));
  int current = 1;  // item 0
  for (int i = 1; i < num_items; ++i) {
    if (starts_after_first[static_cast<size_t>(i - 1)]) {
      lengths.push_back(current);
      current = 0;
    }
    ++current;
  }
  lengths.push_back(current);
  return lengths;
}

}  // namespace

// random_spans_helper(inputs_length, noise_density, mean_noise_span_length,
//                     extra_tokens_per_span_inputs=1, extra_tokens_per_span_targets=1), as
// span_corruption calls it. In Python, so in double precision with round-half-to-even:
//   num_noise_tokens = int(round(tokens_length * noise_density))
//   num_nonnoise_tokens = tokens_length - num_noise_tokens
//   num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
//   inputs  = num_nonnoise_tokens + num_noise_spans + 1   (one sentinel per span, EOS)
//   targets = num_noise_tokens + num_noise_spans + 1
// tokens_length is the largest value, counting up from inputs_length - 1, whose successor would
// overflow inputs_length. Then the "minor hack": if noise_density == 0.5 and targets > inputs,
// tokens_length and targets_length each drop by one, so that targets equals the (round) inputs.
SpanLengths random_spans_helper(int inputs_length, double noise_density,
                                double mean_noise_span_length) {
  SWT_USER_CHECK(inputs_length >= 1, "random_spans_helper: inputs_length must be >= 1, got {}",
                 inputs_length);
  SpanCorruptionOptions options;
  options.noise_density = noise_density;
  options.mean_noise_span_length = mean_noise_span_length;
  check_options(options);
  auto lengths_for = [&](int tokens_length) {
    int num_noise_tokens = static_cast<int>(round_half_even(tokens_length * noise_density));
    int num_nonnoise_tokens = tokens_length - num_noise_tokens;
    int num_noise_spans =
        static_cast<int>(round_half_even(num_noise_tokens / mean_noise_span_length));
    return std::pair<int, int>{num_nonnoise_tokens + num_noise_spans + 1,
                               num_noise_tokens + num_noise_spans + 1};
  };
  // Terminates: the inputs length grows by about (1 - noise_density) per raw token.
  int tokens_length = inputs_length - 1;
  while (lengths_for(tokens_length + 1).first <= inputs_length) ++tokens_length;
  auto [inputs, targets] = lengths_for(tokens_length);
  if (noise_density == 0.5 && targets > inputs) {
    --tokens_length;
    --targets;
  }
  return SpanLengths{tokens_length, targets};
}

// random_spans_noise_mask(length, noise_density, seeds, mean_noise_span_length). The counts are
// computed in float32 as TF does (to_float(length) * noise_density is a float32 product), so
// they can differ from random_spans_helper's double arithmetic at exact .5 ties: length 190 at
// density 0.15 gives float32 28.500002 -> 29 noise tokens, double 28.5 -> 28.
namespace {
struct NoiseCounts {
  int noise, nonnoise, spans;
};

// The mask's counts for length >= 2 tokens.
NoiseCounts noise_counts(int length, const SpanCorruptionOptions& options) {
  // num_noise_tokens = to_int(tf.round(to_float(length) * noise_density)), then clamped to
  // [1, length - 1] "to avoid degeneracy by ensuring positive numbers of noise and nonnoise".
  const float density = static_cast<float>(options.noise_density);
  int num_noise_tokens =
      static_cast<int>(round_half_even(static_cast<float>(length) * density));
  num_noise_tokens = std::min(std::max(num_noise_tokens, 1), length - 1);
  // num_noise_spans = max(1, to_int(tf.round(to_float(num_noise_tokens) / mean_span))).
  const float mean_span = static_cast<float>(options.mean_noise_span_length);
  int num_noise_spans =
      static_cast<int>(round_half_even(static_cast<float>(num_noise_tokens) / mean_span));
  num_noise_spans = std::max(num_noise_spans, 1);
  const int num_nonnoise_tokens = length - num_noise_tokens;
  // TF fails here too (tf.stack of different sizes); num_noise_spans <= num_noise_tokens holds
  // since mean_noise_span_length >= 1, but a noise_density near 1 can leave too few non-noise.
  SWT_USER_CHECK(num_noise_spans <= num_nonnoise_tokens,
                 "span corruption: {} tokens at noise_density {} leave {} non-noise tokens for {} "
                 "spans; lower noise_density or raise mean_noise_span_length",
                 length, options.noise_density, num_nonnoise_tokens, num_noise_spans);
  return {num_noise_tokens, num_nonnoise_tokens, num_noise_spans};
}
}  // namespace

CorruptedLengths span_corrupted_lengths(int length, const SpanCorruptionOptions& options) {
  SWT_CHECK(length >= 2, "span_corrupted_lengths: length {} < 2", length);
  check_options(options);
  const NoiseCounts n = noise_counts(length, options);
  return {n.nonnoise + n.spans + 1, n.noise + n.spans + 1};
}

int span_corruption_piece_length(int inputs_length, int targets_length,
                                 const SpanCorruptionOptions& options) {
  const SpanLengths helper = random_spans_helper(inputs_length, options.noise_density,
                                                 options.mean_noise_span_length);
  const int raw = helper.tokens_length;
  SWT_USER_CHECK(raw >= 2,
                 "data.inputs_length: got {}, too short for span corruption at noise_density {}",
                 inputs_length, options.noise_density);
  const CorruptedLengths got = span_corrupted_lengths(raw, options);
  SWT_USER_CHECK(got.inputs <= inputs_length,
                 "data.inputs_length: got {}, but span corruption of the {} raw tokens T5's "
                 "random_spans_helper picks for it gives {} inputs (its float32 counts round "
                 "a .5 tie up); choose another length, e.g. {}",
                 inputs_length, raw, got.inputs, inputs_length + 1);
  SWT_USER_CHECK(targets_length >= got.targets,
                 "data.targets_length: got {}, expected at least {} (span corruption of {} raw "
                 "tokens into data.inputs_length = {} inputs gives {} targets)",
                 targets_length, got.targets, raw, inputs_length, got.targets);
  return raw;
}

std::vector<bool> random_spans_noise_mask(int length, const SpanCorruptionOptions& options,
                                          uint64_t seed) {
  SWT_CHECK(length >= 0, "random_spans_noise_mask: negative length {}", length);
  check_options(options);
  const int orig_length = length;
  length = std::max(length, 2);  // "increase length to avoid degeneracy"
  const NoiseCounts counts = noise_counts(length, options);
  const int num_noise_tokens = counts.noise, num_nonnoise_tokens = counts.nonnoise,
            num_noise_spans = counts.spans;

  // noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans, seeds[0])
  // nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans, seeds[1])
  const std::vector<int> noise_span_lengths =
      random_segmentation(num_noise_tokens, num_noise_spans, derive_seed(seed, 0));
  const std::vector<int> nonnoise_span_lengths =
      random_segmentation(num_nonnoise_tokens, num_noise_spans, derive_seed(seed, 1));

  // interleaved_span_lengths = [nonnoise_0, noise_0, nonnoise_1, noise_1, ...]; the TF code marks
  // span starts, cumsums them into span numbers and takes odd span numbers as noise. Same thing:
  std::vector<bool> is_noise(static_cast<size_t>(length), false);
  size_t pos = 0;
  for (int s = 0; s < num_noise_spans; ++s) {
    pos += static_cast<size_t>(nonnoise_span_lengths[static_cast<size_t>(s)]);
    const size_t end = pos + static_cast<size_t>(noise_span_lengths[static_cast<size_t>(s)]);
    for (; pos < end; ++pos) is_noise[pos] = true;
  }
  is_noise.resize(static_cast<size_t>(orig_length));  // is_noise[:orig_length]
  return is_noise;
}

// denoise(inputs_fn=noise_span_to_unique_sentinel, targets_fn=nonnoise_span_to_unique_sentinel)
// as span_corruption configures it, then the EOS that the task's append_eos adds to both.
// noise_span_to_unique_sentinel keeps non-noise tokens and replaces the first token of each run
// of noise with
//   sentinel = sentinel_id(vocabulary) + 1 - tf.cumsum(first_noise_tokens)
// i.e. first_sentinel, first_sentinel - 1, ... in order, dropping the run's other tokens;
// nonnoise_span_to_unique_sentinel is the same with the mask negated. Sentinel i in the inputs
// marks noise span i, and sentinel i in the targets precedes it. Past 100 spans (inputs longer
// than ~2000 tokens) the count runs below <extra_id_99> into ordinary ids, as in T5.
void span_corrupt(const int32_t* tokens, int length, const SpanCorruptionOptions& options,
                  uint64_t seed, std::vector<int32_t>& inputs, std::vector<int32_t>& targets) {
  const std::vector<bool> noise_mask = random_spans_noise_mask(length, options, seed);
  inputs.clear();
  targets.clear();
  int32_t input_sentinel = options.first_sentinel;
  int32_t target_sentinel = options.first_sentinel;
  for (int i = 0; i < length; ++i) {
    const bool noise = noise_mask[static_cast<size_t>(i)];
    const bool prev_noise = i > 0 && noise_mask[static_cast<size_t>(i - 1)];  // tf.pad(mask[:-1])
    if (!noise) {
      inputs.push_back(tokens[i]);
      if (i == 0 || prev_noise) targets.push_back(target_sentinel--);  // first non-noise token
    } else {
      targets.push_back(tokens[i]);
      if (!prev_noise) inputs.push_back(input_sentinel--);  // first noise token
    }
  }
  inputs.push_back(options.eos_id);
  targets.push_back(options.eos_id);
}

}  // namespace switcht5
