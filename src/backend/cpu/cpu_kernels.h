// Building blocks of the CPU backend's hot loops: reductions in double that pipeline and
// vectorize while staying bitwise reproducible, and runtime dispatch to wider vector units.
#pragma once

#include <bit>
#include <cstdint>

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

// Sum of term(i) for i in [0, n), in double, over kSumLanes interleaved lanes: lane l adds the
// terms with i % kSumLanes == l in index order, and the lanes are added in a fixed pairwise tree:
//   ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
// One accumulator would be a chain of dependent adds, each waiting for the last (4 cycles): a
// latency-bound loop at a fraction of the memory bandwidth. Eight independent chains pipeline
// and vectorize; the order depends on n alone (never on threads or the vector width), so every
// thread count and every clone gives bitwise the same sum.
constexpr int kSumLanes = 8;

template <class Term>
inline double lane_sum(int64_t n, Term term) {
  double acc[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) acc[l] += term(i + l);
  for (int l = 0; i < n; ++i, ++l) acc[l] += term(i);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
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

}  // namespace switcht5::cpu
