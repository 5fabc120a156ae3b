// Building blocks of the CPU backend's hot loops: reductions in double that pipeline and
// vectorize while staying bitwise reproducible, and runtime dispatch to wider vector units.
#pragma once

#include <immintrin.h>

#include <bit>
#include <cstdint>

#include "core/rng.h"

namespace switcht5::cpu {

// SWT_CPU_CLONES on a function compiles it three times (AVX-512, AVX2, and the build's
// x86-64-v2 baseline) and picks the one the running CPU supports when the program loads (GCC
// target_clones, an ifunc): one binary still runs on every x86-64-v2 machine. The clones compute
// bitwise the same results, because the build compiles with -ffp-contract=off (no fused
// multiply-add where the source has a multiply and an add: AVX-512's target implies FMA) and
// vectorizing our loops never reorders a reduction (lane_sum fixes its order in the source).
// Use it on loops over contiguous memory that the compiler vectorizes; calls into libm (expf,
// tanh) do not get wider from it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define SWT_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SWT_CPU_CLONES
#endif

// Sum of term(i) for i in [0, n), in double, over Lanes interleaved lanes: lane l adds the
// terms with i % Lanes == l in index order, and the lanes are added in a fixed pairwise tree of
// neighbours, for 8 lanes
//   ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
// One accumulator would be a chain of dependent adds, each waiting for the last (4 cycles): a
// latency-bound loop at a fraction of the memory bandwidth. Eight independent chains pipeline
// and vectorize; the order depends on n alone (never on threads or the vector width), so every
// thread count and every clone gives bitwise the same sum.
constexpr int kSumLanes = 8;
// Eight lanes are two AVX2 vectors (one AVX-512 vector) of doubles: two add chains, so a long
// sum still waits on the add latency, about 2 floats a cycle (measured: squares of 1.07 GB in
// 25-32 ms on two AVX2 cores, 33-43 GB/s, whatever the memory could give). The array-long
// reductions (sum, sum_squares: the gradient norm) use 32 lanes, eight AVX2 chains.
constexpr int kWideSumLanes = 32;

template <int Lanes = kSumLanes, class Term>
inline double lane_sum(int64_t n, Term term) {
  static_assert(Lanes >= 1 && (Lanes & (Lanes - 1)) == 0, "a power of two");
  double acc[Lanes] = {};
  int64_t i = 0;
  for (; i + Lanes <= n; i += Lanes)
    for (int l = 0; l < Lanes; ++l) acc[l] += term(i + l);
  for (int l = 0; i < n; ++i, ++l) acc[l] += term(i);
  for (int width = Lanes; width > 1; width /= 2)
    for (int l = 0; l < width / 2; ++l) acc[l] = acc[2 * l] + acc[2 * l + 1];
  return acc[0];
}

// e^x in fp32 from plain float operations, so that it vectorizes in SWT_CPU_CLONES loops (libm's
// expf is a call per element) and every clone gives bitwise the same value:
//   n = round(x / ln 2) (the 1.5 * 2^23 trick), r = x - n ln2 (ln2 in two parts: r exact to
//   about 2^-32), e^r from Cephes expf's degree-7 polynomial on |r| <= ln2 / 2, times 2^n from
//   the exponent bits.
// Measured within 1.4 ulp of e^x on [-87, 88]; +0 below -87 (e^-87 = 1.6e-38, near the smallest
// normal float: softmax and cross-entropy rows lose nothing), -inf gives 0, NaN stays NaN.
// Precondition x <= 88 (no overflow to inf): the callers' arguments are x - max <= 0.
// Branch-free on purpose: a select on x (a clamp, or "0 where x < -87") makes GCC branch under
// -ftrapping-math, and the AVX2 and baseline clones then stay scalar. So the exponent is clamped
// as an integer, and the underflow is a bit mask.
inline float exp_f32(float x) {
  constexpr float kShift = 12582912.0f;                    // 1.5 * 2^23
  const float t = x * 1.44269504088896341f + kShift;      // round(x log2 e) in the low bits
  const float n = t - kShift;
  int32_t ni = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kShift);
  ni = ni < -126 ? -126 : ni;  // 2^ni stays a normal float (x < -87 is masked to 0 below)
  ni = ni > 127 ? 127 : ni;
  float r = x - n * 0.693359375f;  // ln 2 = 0.693359375 - 2.12194440e-4 (Cephes' C1, C2)
  r = r - n * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const float er = q * (r * r) + r + 1.0f;
  const float y = er * std::bit_cast<float>((ni + 127) << 23);
  const int32_t keep = -int32_t(!(x < -87.0f));  // all ones, or 0 (NaN keeps its NaN)
  return std::bit_cast<float>(std::bit_cast<int32_t>(y) & keep);
}

// ---- dropout masks (Backend::dropout, core/rng.h) ---------------------------------------------
// Element i of a dropout stream is kept iff random16(seed, i) >= threshold, and then becomes
// x / keep_scale (a true division, as the scalar formula: bitwise the same quotient), else +0.0f.
// One splitmix64 draw, mix64(seed + g * kGolden), serves the group of four elements 4g .. 4g+3:
// its four 16-bit fields in order, which is also their order in memory, so a vector of w 64-bit
// draws is the 4w elements' fields side by side. The loops below compute those draws in vector
// lanes (the 64-bit multiplies of mix64 native on AVX-512DQ, from 32-bit halves on AVX2, scalar
// on the x86-64-v2 baseline); all three give bitwise the same output, and dropout_span picks the
// widest the CPU runs, once. Each takes `groups` whole groups, the first one `g0`; out and x
// point at element 4 * g0. out may alias x (each vector is loaded before it is stored).
constexpr uint64_t kGolden = kMixGamma;  // splitmix64's increment (core/rng.h)

using DropoutGroups = void (*)(float* out, const float* x, int64_t groups, uint64_t g0,
                               uint64_t seed, uint32_t threshold, float keep_scale);

__attribute__((target("sse4.1"))) inline void dropout_groups_sse41(
    float* out, const float* x, int64_t groups, uint64_t g0, uint64_t seed, uint32_t threshold,
    float keep_scale) {
  const __m128 keep = _mm_set1_ps(keep_scale);
  const __m128i below = _mm_set1_epi32(int32_t(threshold) - 1);  // r >= threshold iff r > below
  for (int64_t g = 0; g < groups; ++g) {
    const uint64_t bits = mix64(seed + (g0 + uint64_t(g)) * kGolden);
    const __m128i r = _mm_cvtepu16_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(bits)));
    const __m128 kept = _mm_castsi128_ps(_mm_cmpgt_epi32(r, below));
    const __m128 q = _mm_div_ps(_mm_loadu_ps(x + 4 * g), keep);
    _mm_storeu_ps(out + 4 * g, _mm_and_ps(kept, q));
  }
}

// a * b mod 2^64 per 64-bit lane from 32-bit products (AVX2 has no 64-bit multiply):
// lo(a) lo(b) + ((hi(a) lo(b) + lo(a) hi(b)) << 32).
__attribute__((target("avx2"))) inline __m256i mullo64_avx2(__m256i a, __m256i b) {
  const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), b),
                                         _mm256_mul_epu32(a, _mm256_srli_epi64(b, 32)));
  return _mm256_add_epi64(_mm256_mul_epu32(a, b), _mm256_slli_epi64(cross, 32));
}

// Four draws (16 elements) per iteration; the last groups % 4 through the baseline loop.
__attribute__((target("avx2"))) inline void dropout_groups_avx2(float* out, const float* x,
                                                                int64_t groups, uint64_t g0,
                                                                uint64_t seed, uint32_t threshold,
                                                                float keep_scale) {
  const __m256 keep = _mm256_set1_ps(keep_scale);
  const __m256i below = _mm256_set1_epi32(int32_t(threshold) - 1);
  const __m256i c1 = _mm256_set1_epi64x(int64_t(kMixMul1));
  const __m256i c2 = _mm256_set1_epi64x(int64_t(kMixMul2));
  const __m256i step = _mm256_set1_epi64x(int64_t(4 * kGolden));
  // Lane l's state before mix64's own increment: seed + (g0 + l) * kGolden.
  const uint64_t z0 = seed + g0 * kGolden;
  __m256i z = _mm256_setr_epi64x(int64_t(z0), int64_t(z0 + kGolden), int64_t(z0 + 2 * kGolden),
                                 int64_t(z0 + 3 * kGolden));
  const __m256i golden = _mm256_set1_epi64x(int64_t(kGolden));
  int64_t g = 0;
  for (; g + 4 <= groups; g += 4) {
    __m256i v = _mm256_add_epi64(z, golden);  // mix64 (core/rng.h), lane by lane
    v = mullo64_avx2(_mm256_xor_si256(v, _mm256_srli_epi64(v, 30)), c1);
    v = mullo64_avx2(_mm256_xor_si256(v, _mm256_srli_epi64(v, 27)), c2);
    v = _mm256_xor_si256(v, _mm256_srli_epi64(v, 31));
    z = _mm256_add_epi64(z, step);
    for (int half = 0; half < 2; ++half) {
      const __m128i fields = half == 0 ? _mm256_castsi256_si128(v) : _mm256_extracti128_si256(v, 1);
      const __m256 kept =
          _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_cvtepu16_epi32(fields), below));
      const int64_t e = 4 * g + 8 * half;
      const __m256 q = _mm256_div_ps(_mm256_loadu_ps(x + e), keep);
      _mm256_storeu_ps(out + e, _mm256_and_ps(kept, q));
    }
  }
  dropout_groups_sse41(out + 4 * g, x + 4 * g, groups - g, g0 + uint64_t(g), seed, threshold,
                       keep_scale);
}

// Eight draws (32 elements) per iteration; the last groups % 8 through the baseline loop.
// GCC 12's avx512fintrin.h fills "undefined" vectors from themselves (`__m512i __Y = __Y;`),
// which -Wmaybe-uninitialized reports once inlined (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f,avx512dq"))) inline void dropout_groups_avx512(
    float* out, const float* x, int64_t groups, uint64_t g0, uint64_t seed, uint32_t threshold,
    float keep_scale) {
  const __m512 keep = _mm512_set1_ps(keep_scale);
  const __m512i below = _mm512_set1_epi32(int32_t(threshold) - 1);
  const __m512i c1 = _mm512_set1_epi64(int64_t(kMixMul1));
  const __m512i c2 = _mm512_set1_epi64(int64_t(kMixMul2));
  const __m512i golden = _mm512_set1_epi64(int64_t(kGolden));
  const __m512i step = _mm512_set1_epi64(int64_t(8 * kGolden));
  const __m512i lanes = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i z = _mm512_add_epi64(_mm512_set1_epi64(int64_t(seed + g0 * kGolden)),
                               _mm512_mullo_epi64(lanes, golden));
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {
    __m512i v = _mm512_add_epi64(z, golden);
    v = _mm512_mullo_epi64(_mm512_xor_si512(v, _mm512_srli_epi64(v, 30)), c1);
    v = _mm512_mullo_epi64(_mm512_xor_si512(v, _mm512_srli_epi64(v, 27)), c2);
    v = _mm512_xor_si512(v, _mm512_srli_epi64(v, 31));
    z = _mm512_add_epi64(z, step);
    for (int half = 0; half < 2; ++half) {
      const __m256i fields =
          half == 0 ? _mm512_castsi512_si256(v) : _mm512_extracti64x4_epi64(v, 1);
      const __mmask16 kept = _mm512_cmpgt_epi32_mask(_mm512_cvtepu16_epi32(fields), below);
      const int64_t e = 4 * g + 16 * half;
      const __m512 q = _mm512_div_ps(_mm512_loadu_ps(x + e), keep);
      _mm512_storeu_ps(out + e, _mm512_maskz_mov_ps(kept, q));
    }
  }
  dropout_groups_sse41(out + 4 * g, x + 4 * g, groups - g, g0 + uint64_t(g), seed, threshold,
                       keep_scale);
}

#pragma GCC diagnostic pop

// The widest of the three this CPU runs, chosen on first use (as an ifunc would at load).
inline DropoutGroups best_dropout_groups() {
  static const DropoutGroups best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"))
      return &dropout_groups_avx512;
    if (__builtin_cpu_supports("avx2")) return &dropout_groups_avx2;
    return &dropout_groups_sse41;
  }();
  return best;
}

// Dropout (p > 0) of x[0, n) as elements [first, first + n) of a longer stream: out[k] is the
// stream's element first + k (see above). A span may start and end inside a group (a row of
// attention probabilities): those ends are scalar. `groups` chooses the loop (tests pass each).
inline void dropout_span(float* out, const float* x, int64_t n, uint64_t first, uint64_t seed,
                         uint32_t threshold, float keep_scale,
                         DropoutGroups groups = best_dropout_groups()) {
  auto scalar = [&](int64_t k) {
    out[k] = random16(seed, first + uint64_t(k)) >= threshold ? x[k] / keep_scale : 0.0f;
  };
  int64_t k = 0;
  for (; k < n && ((first + uint64_t(k)) & 3) != 0; ++k) scalar(k);
  const int64_t whole = (n - k) / 4;
  if (whole > 0)
    groups(out + k, x + k, whole, (first + uint64_t(k)) >> 2, seed, threshold, keep_scale);
  for (k += 4 * whole; k < n; ++k) scalar(k);
}

}  // namespace switcht5::cpu
