// T5 span corruption (src/data/span_corruption.h): random_spans_helper values worked out by hand
// from T5's Python formula, the exact counts and shape of random_spans_noise_mask, uniformity of
// the random segmentation, reassembly of inputs + targets into the original tokens, degenerate
// lengths, and golden outputs for fixed seeds.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "core/check.h"
#include "data/span_corruption.h"
#include "test_util.h"

namespace switcht5 {
namespace {

constexpr int32_t kEos = 1;
constexpr int32_t kFirstSentinel = 32099;

// T5's 100 sentinels <extra_id_0..99> = 32099..32000; test tokens stay below 32000.
bool is_sentinel(int32_t t) { return t <= kFirstSentinel && t > kFirstSentinel - 100; }

// T5 counts in float32 as TF computes them, with nearbyint (round-half-to-even under the default
// rounding mode), independently of the source's own rounding helper.
int expected_noise_tokens(int length, double density) {
  int len = std::max(length, 2);
  int n = static_cast<int>(std::nearbyint(static_cast<float>(len) * static_cast<float>(density)));
  return std::min(std::max(n, 1), len - 1);
}
int expected_noise_spans(int num_noise_tokens, double mean_span) {
  int s = static_cast<int>(
      std::nearbyint(static_cast<float>(num_noise_tokens) / static_cast<float>(mean_span)));
  return std::max(s, 1);
}

int count_noise(const std::vector<bool>& mask) {
  int n = 0;
  for (bool b : mask) n += b;
  return n;
}
// Number of maximal runs of true.
int count_noise_runs(const std::vector<bool>& mask) {
  int runs = 0;
  for (size_t i = 0; i < mask.size(); ++i) runs += mask[i] && (i == 0 || !mask[i - 1]);
  return runs;
}

std::vector<int32_t> iota_tokens(int n, int32_t first) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) t[static_cast<size_t>(i)] = first + i;
  return t;
}

// Undoes span corruption: each sentinel in the inputs is replaced by the tokens that follow the
// same sentinel in the targets (up to the next sentinel or EOS).
std::vector<int32_t> reassemble(const std::vector<int32_t>& inputs,
                                const std::vector<int32_t>& targets) {
  std::map<int32_t, std::vector<int32_t>> span_of;
  int32_t current = 0;
  for (size_t i = 0; i + 1 < targets.size(); ++i) {
    if (is_sentinel(targets[i])) {
      current = targets[i];
      span_of[current];
    } else {
      span_of[current].push_back(targets[i]);
    }
  }
  std::vector<int32_t> out;
  for (size_t i = 0; i + 1 < inputs.size(); ++i) {
    if (is_sentinel(inputs[i])) {
      const auto& span = span_of.at(inputs[i]);
      out.insert(out.end(), span.begin(), span.end());
    } else {
      out.push_back(inputs[i]);
    }
  }
  return out;
}

// The sentinels of `seq` in order of appearance.
std::vector<int32_t> sentinels_in(const std::vector<int32_t>& seq) {
  std::vector<int32_t> s;
  for (int32_t t : seq)
    if (is_sentinel(t)) s.push_back(t);
  return s;
}

// noise_span_to_unique_sentinel written as the TF ops read: prev = pad(mask[:-1]); first =
// mask & !prev; sentinel = first_sentinel + 1 - cumsum(first); keep where !(mask & prev).
std::vector<int32_t> tf_style_span_to_sentinel(const std::vector<int32_t>& tokens,
                                               const std::vector<bool>& mask) {
  std::vector<int32_t> out;
  int32_t cumsum = 0;
  for (size_t i = 0; i < tokens.size(); ++i) {
    bool prev = i > 0 && mask[i - 1];
    bool first = mask[i] && !prev;
    cumsum += first;
    if (mask[i] && prev) continue;
    out.push_back(first ? kFirstSentinel + 1 - cumsum : tokens[i]);
  }
  return out;
}

// random_spans_helper(inputs_length, density, mean), Python's formula (double, round half to even):
//   noise = round(L * d), nonnoise = L - noise, spans = round(noise / mean),
//   inputs(L) = nonnoise + spans + 1, targets(L) = noise + spans + 1; L = largest with
//   inputs(L) <= inputs_length.
TEST(SpanCorruption, RandomSpansHelperT5Values) {
  // 568: noise round(85.2) = 85, nonnoise 483, spans round(28.33) = 28
  //      -> inputs 483 + 28 + 1 = 512, targets 85 + 28 + 1 = 114.
  // 569: noise round(85.35) = 85, nonnoise 484 -> inputs 513 > 512, so 568.
  SpanLengths l = random_spans_helper(512, 0.15, 3.0);
  EXPECT_EQ(l.tokens_length, 568);
  EXPECT_EQ(l.targets_length, 114);

  // 694: noise round(104.1) = 104, nonnoise 590, spans round(34.67) = 35 -> inputs 626,
  //      targets 104 + 35 + 1 = 140. 695: noise round(104.25) = 104, nonnoise 591 -> 627.
  l = random_spans_helper(626, 0.15, 3.0);
  EXPECT_EQ(l.tokens_length, 694);
  EXPECT_EQ(l.targets_length, 140);

  // 141: noise round(21.15) = 21, nonnoise 120, spans 7 -> inputs 128, targets 29.
  // 142: noise round(21.3) = 21, nonnoise 121 -> 129.
  l = random_spans_helper(128, 0.15, 3.0);
  EXPECT_EQ(l.tokens_length, 141);
  EXPECT_EQ(l.targets_length, 29);

  // 1137: noise round(170.55) = 171, nonnoise 966, spans 57 -> inputs 1024, targets 229.
  // 1138: noise round(170.7) = 171, nonnoise 967 -> 1025.
  l = random_spans_helper(1024, 0.15, 3.0);
  EXPECT_EQ(l.tokens_length, 1137);
  EXPECT_EQ(l.targets_length, 229);

  // density 0.3: 639: noise round(191.7) = 192, nonnoise 447, spans 64 -> inputs 512,
  //      targets 257. 640: noise 192, nonnoise 448 -> 513.
  l = random_spans_helper(512, 0.3, 3.0);
  EXPECT_EQ(l.tokens_length, 639);
  EXPECT_EQ(l.targets_length, 257);

  // density 0: inputs(L) = L + 1, so L = 511 (the search starts at inputs_length - 1, as in the
  // current T5; an older version started at inputs_length and returned 512 here), targets 1.
  l = random_spans_helper(512, 0.0, 3.0);
  EXPECT_EQ(l.tokens_length, 511);
  EXPECT_EQ(l.targets_length, 1);
}

TEST(SpanCorruption, RandomSpansHelperHalfDensityHack) {
  // 767: noise round(383.5) = 384 (half to even), nonnoise 383, spans 128 -> inputs 512,
  //      targets 513. 768: noise 384, nonnoise 384 -> inputs 513, so the loop stops at 767.
  // targets 513 > inputs 512 at density 0.5 -> tokens 766, targets 512.
  SpanLengths l = random_spans_helper(512, 0.5, 3.0);
  EXPECT_EQ(l.tokens_length, 766);
  EXPECT_EQ(l.targets_length, 512);

  // Half-to-even decides this one. 9: noise round(4.5) = 4, nonnoise 5, spans 4 -> inputs 10,
  // targets 9 (no hack). 10: noise 5, nonnoise 5, spans 5 -> inputs 11. With round-half-up,
  // 9 would give noise 5, inputs 10, targets 11 and the hack would return (8, 10).
  l = random_spans_helper(10, 0.5, 1.0);
  EXPECT_EQ(l.tokens_length, 9);
  EXPECT_EQ(l.targets_length, 9);
}

TEST(SpanCorruption, NoiseMaskHandValues) {
  SpanCorruptionOptions o;
  // 568 * 0.15 = 85.2 -> 85 noise tokens in round(85 / 3) = 28 spans.
  std::vector<bool> m = random_spans_noise_mask(568, o, 1);
  EXPECT_EQ(count_noise(m), 85);
  EXPECT_EQ(count_noise_runs(m), 28);
  // 10 * 0.15f = 1.5 exactly in float32 -> 2 (even).
  EXPECT_EQ(count_noise(random_spans_noise_mask(10, o, 1)), 2);
  // 30 * 0.15f = 4.5 exactly in float32 -> 4 (even), not 5.
  EXPECT_EQ(count_noise(random_spans_noise_mask(30, o, 1)), 4);
  // 190: the float32 product is 28.500002 (0.15f = 0.15 + 6e-9; 190 * 6e-9 exceeds half an
  // ulp at 28.5), so TF's mask has 29 noise tokens where Python's round(190 * 0.15) gives 28.
  EXPECT_EQ(count_noise(random_spans_noise_mask(190, o, 1)), 29);
}

TEST(SpanCorruption, NoiseMaskCountsAndShape) {
  SpanCorruptionOptions o;
  for (double density : {0.15, 0.3, 0.5}) {
    o.noise_density = density;
    for (int length = 2; length <= 700; ++length) {
      const int num_noise = expected_noise_tokens(length, density);
      const int num_spans = expected_noise_spans(num_noise, o.mean_noise_span_length);
      for (uint64_t seed = 0; seed < 3; ++seed) {
        std::vector<bool> m = random_spans_noise_mask(length, o, 1000 * seed + length);
        ASSERT_EQ(static_cast<int>(m.size()), length);
        ASSERT_EQ(count_noise(m), num_noise) << "length " << length << " density " << density;
        // One run per span: an empty segment would merge two runs and lower the count.
        ASSERT_EQ(count_noise_runs(m), num_spans) << "length " << length;
        // Spans alternate non-noise, noise, ..., starting with non-noise, ending with noise.
        ASSERT_FALSE(m.front()) << "length " << length;
        ASSERT_TRUE(m.back()) << "length " << length;
      }
    }
  }
}

TEST(SpanCorruption, NoiseMaskAverageDensityAndSpanLength) {
  SpanCorruptionOptions o;
  long total_noise = 0, total_tokens = 0, total_spans = 0;
  for (int length = 100; length <= 1000; length += 3) {
    std::vector<bool> m = random_spans_noise_mask(length, o, static_cast<uint64_t>(length));
    total_noise += count_noise(m);
    total_spans += count_noise_runs(m);
    total_tokens += length;
  }
  EXPECT_NEAR(double(total_noise) / double(total_tokens), 0.15, 0.002);
  EXPECT_NEAR(double(total_noise) / double(total_spans), 3.0, 0.1);
}

// _random_segmentation is uniform over compositions. Length 40: 6 noise tokens
// (40 * 0.15f = 6.0) in round(6 / 3) = 2 spans; the first noise span has length 1..5, each with
// probability 1/5; the first non-noise span has length 1..33, mean 17.
TEST(SpanCorruption, SegmentationIsUniform) {
  SpanCorruptionOptions o;
  constexpr int kTrials = 10000;
  std::vector<int> first_noise_len_count(7, 0);
  double sum_first_nonnoise = 0;
  for (int t = 0; t < kTrials; ++t) {
    std::vector<bool> m = random_spans_noise_mask(40, o, static_cast<uint64_t>(t));
    ASSERT_EQ(count_noise(m), 6);
    ASSERT_EQ(count_noise_runs(m), 2);
    int start = 0;
    while (!m[static_cast<size_t>(start)]) ++start;
    int len = 0;
    while (m[static_cast<size_t>(start + len)]) ++len;
    ++first_noise_len_count[static_cast<size_t>(len)];
    sum_first_nonnoise += start;
  }
  EXPECT_EQ(first_noise_len_count[0], 0);
  EXPECT_EQ(first_noise_len_count[6], 0);
  // Standard deviation of each frequency: sqrt(0.2 * 0.8 / 10000) = 0.004; allow 5 sigma.
  for (int len = 1; len <= 5; ++len)
    EXPECT_NEAR(first_noise_len_count[static_cast<size_t>(len)] / double(kTrials), 0.2, 0.02)
        << "first noise span of length " << len;
  // Uniform on 1..33: mean 17, sd 9.5, so the mean of 10^4 draws has sd 0.095.
  EXPECT_NEAR(sum_first_nonnoise / kTrials, 17.0, 0.5);
}

TEST(SpanCorruption, NoiseMaskIsAPureFunctionOfTheSeed) {
  SpanCorruptionOptions o;
  std::set<std::vector<bool>> distinct;
  for (uint64_t seed = 0; seed < 100; ++seed) {
    std::vector<bool> a = random_spans_noise_mask(568, o, seed);
    EXPECT_EQ(a, random_spans_noise_mask(568, o, seed));
    distinct.insert(a);
  }
  EXPECT_EQ(distinct.size(), 100u);
}

// length < 2 is raised to 2 and truncated back; small lengths have one span, hence no randomness:
// 1 -> [F] (mask [F, T] truncated); 2 -> noise max(round(0.3), 1) = 1 -> [F, T];
// 3 -> noise max(round(0.45), 1) = 1 -> [F, F, T].
TEST(SpanCorruption, DegenerateLengths) {
  SpanCorruptionOptions o;
  for (uint64_t seed : {0ull, 7ull, 12345ull}) {
    EXPECT_TRUE(random_spans_noise_mask(0, o, seed).empty());
    EXPECT_EQ(random_spans_noise_mask(1, o, seed), (std::vector<bool>{false}));
    EXPECT_EQ(random_spans_noise_mask(2, o, seed), (std::vector<bool>{false, true}));
    EXPECT_EQ(random_spans_noise_mask(3, o, seed), (std::vector<bool>{false, false, true}));

    std::vector<int32_t> tok = {500, 501, 502};
    std::vector<int32_t> in, tg;
    span_corrupt(tok.data(), 0, o, seed, in, tg);
    EXPECT_EQ(in, (std::vector<int32_t>{kEos}));
    EXPECT_EQ(tg, (std::vector<int32_t>{kEos}));
    span_corrupt(tok.data(), 1, o, seed, in, tg);
    EXPECT_EQ(in, (std::vector<int32_t>{500, kEos}));
    EXPECT_EQ(tg, (std::vector<int32_t>{32099, kEos}));
    span_corrupt(tok.data(), 2, o, seed, in, tg);
    EXPECT_EQ(in, (std::vector<int32_t>{500, 32099, kEos}));
    EXPECT_EQ(tg, (std::vector<int32_t>{32099, 501, kEos}));
    span_corrupt(tok.data(), 3, o, seed, in, tg);
    EXPECT_EQ(in, (std::vector<int32_t>{500, 501, 32099, kEos}));
    EXPECT_EQ(tg, (std::vector<int32_t>{32099, 502, kEos}));
  }
}

// A full 568-token piece: 483 kept tokens + 28 sentinels + EOS = 512 inputs, 85 noise tokens +
// 28 sentinels + EOS = 114 targets; sentinels count down from 32099 in both; reassembly is exact.
TEST(SpanCorruption, FullPieceLengthsSentinelsAndReassembly) {
  SpanCorruptionOptions o;
  std::vector<int32_t> expected_sentinels;
  for (int i = 0; i < 28; ++i) expected_sentinels.push_back(kFirstSentinel - i);
  for (uint64_t seed = 0; seed < 50; ++seed) {
    std::vector<int32_t> tokens = testing::random_int_vector(568, 100 + seed, 2, 32000);
    std::vector<int32_t> in, tg;
    span_corrupt(tokens.data(), 568, o, seed, in, tg);
    ASSERT_EQ(in.size(), 512u);
    ASSERT_EQ(tg.size(), 114u);
    EXPECT_EQ(in.back(), kEos);
    EXPECT_EQ(tg.back(), kEos);
    EXPECT_EQ(tg.front(), kFirstSentinel);  // the piece starts with non-noise
    EXPECT_EQ(sentinels_in(in), expected_sentinels);
    EXPECT_EQ(sentinels_in(tg), expected_sentinels);
    EXPECT_EQ(reassemble(in, tg), tokens) << "seed " << seed;

    // Same as T5's noise_span_to_unique_sentinel / nonnoise_span_to_unique_sentinel on the mask.
    std::vector<bool> mask = random_spans_noise_mask(568, o, seed);
    std::vector<bool> not_mask(mask.size());
    for (size_t i = 0; i < mask.size(); ++i) not_mask[i] = !mask[i];
    std::vector<int32_t> want_in = tf_style_span_to_sentinel(tokens, mask);
    std::vector<int32_t> want_tg = tf_style_span_to_sentinel(tokens, not_mask);
    want_in.push_back(kEos);
    want_tg.push_back(kEos);
    EXPECT_EQ(in, want_in);
    EXPECT_EQ(tg, want_tg);
  }
}

// random_spans_helper and the mask agree: a tokens_length piece fills inputs_length exactly.
TEST(SpanCorruption, HelperLengthsMatchSpanCorrupt) {
  SpanCorruptionOptions o;
  for (int inputs_length : {64, 128, 256, 512, 626, 1024}) {
    SpanLengths l = random_spans_helper(inputs_length, o.noise_density, o.mean_noise_span_length);
    std::vector<int32_t> tokens = iota_tokens(l.tokens_length, 100);
    std::vector<int32_t> in, tg;
    span_corrupt(tokens.data(), l.tokens_length, o, 3, in, tg);
    EXPECT_EQ(static_cast<int>(in.size()), inputs_length);
    EXPECT_EQ(static_cast<int>(tg.size()), l.targets_length);
    EXPECT_EQ(reassemble(in, tg), tokens);
  }
}

TEST(SpanCorruption, ReassemblyAtManyLengths) {
  SpanCorruptionOptions o;
  for (int length = 0; length <= 300; ++length) {
    std::vector<int32_t> tokens = testing::random_int_vector(length, 7 + length, 2, 32000);
    std::vector<int32_t> in, tg;
    span_corrupt(tokens.data(), length, o, static_cast<uint64_t>(length), in, tg);
    ASSERT_EQ(reassemble(in, tg), tokens) << "length " << length;
    ASSERT_EQ(in.back(), kEos);
    ASSERT_EQ(tg.back(), kEos);
  }
}

TEST(SpanCorruption, CustomSentinelAndEos) {
  SpanCorruptionOptions o;
  o.first_sentinel = 999;
  o.eos_id = 2;
  std::vector<int32_t> tokens = iota_tokens(3, 10);
  std::vector<int32_t> in, tg;
  span_corrupt(tokens.data(), 3, o, 0, in, tg);
  EXPECT_EQ(in, (std::vector<int32_t>{10, 11, 999, 2}));
  EXPECT_EQ(tg, (std::vector<int32_t>{999, 12, 2}));
}

TEST(SpanCorruption, RejectsBadOptions) {
  SpanCorruptionOptions o;
  o.noise_density = 0.9;  // 100 tokens: 90 noise in 30 spans, but only 10 non-noise tokens
  EXPECT_THROW(random_spans_noise_mask(100, o, 0), UserError);
  o.noise_density = 1.0;
  EXPECT_THROW(random_spans_noise_mask(100, o, 0), UserError);
  o = SpanCorruptionOptions{};
  o.mean_noise_span_length = 0.5;
  EXPECT_THROW(random_spans_noise_mask(100, o, 0), UserError);
  EXPECT_THROW(random_spans_helper(0, 0.15, 3.0), UserError);
}

// Golden outputs, computed once by this implementation (after the count and reassembly tests
// above passed) so that a change to the RNG or the algorithm shows up here.
//
// Length 30: 30 * 0.15f = 4.5 -> 4 noise tokens (half to even), round(4 / 3) = 1 span, so the
// mask is 26 non-noise then 4 noise whatever the seed. (Round-half-up would give 5 tokens in
// round(5 / 3) = 2 random spans.)
TEST(SpanCorruption, GoldenLength30) {
  SpanCorruptionOptions o;
  std::vector<int32_t> tokens = iota_tokens(30, 100);
  std::vector<int32_t> in, tg;
  span_corrupt(tokens.data(), 30, o, 42, in, tg);
  std::vector<int32_t> want_in = iota_tokens(26, 100);
  want_in.push_back(32099);
  want_in.push_back(kEos);
  EXPECT_EQ(in, want_in);
  EXPECT_EQ(tg, (std::vector<int32_t>{32099, 126, 127, 128, 129, kEos}));
}

// Length 64: 64 * 0.15f = 9.6 -> 10 noise tokens in round(10 / 3) = 3 spans; 54 non-noise tokens
// in 3 spans. Here both segmentations are random.
TEST(SpanCorruption, GoldenLength64Seed42) {
  SpanCorruptionOptions o;
  std::vector<int32_t> tokens = iota_tokens(64, 100);
  std::vector<int32_t> in, tg;
  span_corrupt(tokens.data(), 64, o, 42, in, tg);
  // Mask: 16 kept, 3 noise (116-118), 14 kept, 1 noise (133), 24 kept, 6 noise (158-163).
  const std::vector<int32_t> want_in = {
      100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115,  //
      32099,                                                                            //
      119, 120, 121, 122, 123, 124, 125, 126, 127, 128, 129, 130, 131, 132,            //
      32098,                                                                            //
      134, 135, 136, 137, 138, 139, 140, 141, 142, 143, 144, 145, 146, 147, 148, 149,  //
      150, 151, 152, 153, 154, 155, 156, 157,                                          //
      32097, kEos};
  const std::vector<int32_t> want_tg = {32099, 116, 117, 118, 32098, 133,
                                        32097, 158, 159, 160, 161, 162, 163, kEos};
  EXPECT_EQ(in, want_in);
  EXPECT_EQ(tg, want_tg);
}

// span_corrupted_lengths is what span_corrupt gives, for every length and two densities.
TEST(SpanCorruption, CorruptedLengthsAreWhatSpanCorruptGives) {
  for (double density : {0.15, 0.5}) {
    SpanCorruptionOptions o;
    o.noise_density = density;
    std::vector<int32_t> in, tg;
    for (int len = 2; len <= 700; ++len) {
      const std::vector<int32_t> tokens = iota_tokens(len, 100);
      span_corrupt(tokens.data(), len, o, uint64_t(len), in, tg);
      const CorruptedLengths got = span_corrupted_lengths(len, o);
      ASSERT_EQ(got.inputs, int(in.size())) << "length " << len << " density " << density;
      ASSERT_EQ(got.targets, int(tg.size())) << "length " << len << " density " << density;
    }
  }
}

// The piece length for batch lengths, checked against span_corrupt's own (float32) counts:
//   512 -> 568 raw tokens, 114 targets; 128 -> 141, 29 targets.
//   172 -> 190 raw: random_spans_helper's double 190 * 0.15 = 28.5 rounds to 28 noise tokens
//     (38 targets), TF's float32 28.500002 to 29 in 10 spans: 172 inputs, 40 targets.
//   9 -> 9 raw: 1 noise token, round(1/3) = 0 spans for the helper (9 inputs), but the mask
//     keeps at least one span: 8 + 1 + 1 = 10 inputs, one too many.
TEST(SpanCorruption, PieceLengthChecksWhatSpanCorruptGives) {
  const SpanCorruptionOptions o;
  EXPECT_EQ(span_corruption_piece_length(512, 114, o), 568);
  EXPECT_EQ(span_corruption_piece_length(128, 29, o), 141);
  EXPECT_EQ(span_corruption_piece_length(172, 40, o), 190);
  auto message = [&](int inputs, int targets) -> std::string {
    try {
      span_corruption_piece_length(inputs, targets, o);
    } catch (const UserError& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_NE(message(172, 39).find("data.targets_length: got 39, expected at least 40"),
            std::string::npos)
      << message(172, 39);
  EXPECT_NE(message(9, 50).find("data.inputs_length: got 9"), std::string::npos)
      << message(9, 50);
  EXPECT_NE(message(512, 113).find("data.targets_length: got 113, expected at least 114"),
            std::string::npos);
}

}  // namespace
}  // namespace switcht5
