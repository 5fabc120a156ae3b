// The CPU backend's vector building blocks (backend/cpu/cpu_kernels.h): exp_f32 against exp in
// double (accuracy, underflow, NaN and -inf), and the promise that makes runtime dispatch safe:
// the AVX-512, AVX2 and baseline compilations of the same loop give bitwise the same results
// (each clone this CPU can run is called directly and compared with the baseline's); and the
// dropout mask loops (SSE4.1, AVX2, AVX-512DQ) against random16's scalar formula, bit for bit.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <limits>
#include <vector>

#include "backend/cpu/cpu_kernels.h"
#include "core/rng.h"

namespace switcht5 {
namespace {

// One loop per instruction set, as target_clones would compile it (the test builds with
// -ffp-contract=off, as switcht5_core does: tests/CMakeLists.txt).
#define SWT_EXP_LOOP(name, target)                                                    \
  target void name(float* y, const float* x, int n) {                                 \
    for (int i = 0; i < n; ++i) y[i] = cpu::exp_f32(x[i]);                           \
  }                                                                                   \
  target double name##_sum(const float* x, int n) {                                   \
    return cpu::lane_sum(n, [&](int64_t i) { return double(cpu::exp_f32(x[i])); }); \
  }
SWT_EXP_LOOP(exp_baseline, )
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
SWT_EXP_LOOP(exp_avx2, __attribute__((target("avx2"))))
SWT_EXP_LOOP(exp_avx512, __attribute__((target("avx512f"))))
#endif

// Arguments as the softmax and cross-entropy rows make them (x - max <= 0), plus the edges.
std::vector<float> arguments() {
  std::vector<float> x;
  for (float v = -100.0f; v <= 10.0f; v += 0.0137f) x.push_back(v);
  for (uint64_t i = 0; i < 20000; ++i) x.push_back(-30.0f * uniform01(7, i));
  for (float v : {0.0f, -0.0f, -87.0f, -87.0001f, -86.9999f, 88.0f, -1e30f,
                  -std::numeric_limits<float>::infinity(),
                  std::numeric_limits<float>::quiet_NaN()})
    x.push_back(v);
  return x;
}

TEST(ExpF32, WithinTwoUlpOfExpAndZeroBelowMinus87) {
  int checked = 0;
  for (float x : arguments()) {
    const float y = cpu::exp_f32(x);
    if (std::isnan(x)) {
      EXPECT_TRUE(std::isnan(y));
      continue;
    }
    if (x < -87.0f) {
      EXPECT_EQ(std::bit_cast<uint32_t>(y), 0u) << x;  // +0, never a denormal or garbage
      continue;
    }
    const double e = std::exp(double(x));
    const double ulp = std::ldexp(1.0, std::ilogb(float(e)) - 23);  // float spacing at e^x
    EXPECT_LE(std::fabs(double(y) - e), 2.0 * ulp) << "x = " << x;
    ++checked;
  }
  EXPECT_GT(checked, 20000);
}

TEST(ExpF32, EveryCloneGivesBitwiseTheSameValuesAndSums) {
  const std::vector<float> x = arguments();
  const int n = int(x.size());
  std::vector<float> base(x.size()), other(x.size());
  exp_baseline(base.data(), x.data(), n);
  std::vector<float> finite;  // the sum over the finite results (NaN would make it NaN)
  for (float v : x)
    if (!std::isnan(v)) finite.push_back(v);
  const double base_sum = exp_baseline_sum(finite.data(), int(finite.size()));
  int clones = 0;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  struct Clone {
    const char* isa;
    bool supported;  // __builtin_cpu_supports takes only a literal
    void (*loop)(float*, const float*, int);
    double (*sum)(const float*, int);
  };
  for (const Clone& c :
       {Clone{"avx2", bool(__builtin_cpu_supports("avx2")), exp_avx2, exp_avx2_sum},
        Clone{"avx512f", bool(__builtin_cpu_supports("avx512f")), exp_avx512, exp_avx512_sum}}) {
    if (!c.supported) continue;
    c.loop(other.data(), x.data(), n);
    for (size_t i = 0; i < x.size(); ++i)
      ASSERT_EQ(std::bit_cast<uint32_t>(other[i]), std::bit_cast<uint32_t>(base[i]))
          << c.isa << " at x = " << x[i];
    EXPECT_EQ(std::bit_cast<uint64_t>(c.sum(finite.data(), int(finite.size()))),
              std::bit_cast<uint64_t>(base_sum))
        << c.isa;
    ++clones;
  }
#endif
  if (clones == 0) GTEST_SKIP() << "this CPU runs only the baseline clone: nothing to compare";
}


// lane_sum's order, for the 8 lanes of row sums and the 32 of array sums: lane l adds the terms
// i = l, l + Lanes, ... in index order, then neighbouring lanes are added pairwise, level by
// level. Written out here as a recursion over lane ranges and compared bitwise on terms of very
// different magnitudes (where any other order gives another double), at lengths around the
// lane count.
double tree(const std::vector<double>& lanes, size_t begin, size_t count) {
  if (count == 1) return lanes[begin];
  return tree(lanes, begin, count / 2) + tree(lanes, begin + count / 2, count / 2);
}

template <int Lanes>
void expect_lane_order(const std::vector<double>& terms) {
  const double* t = terms.data();
  const std::vector<int64_t> lengths = {0, 1, Lanes - 1, Lanes, Lanes + 1, 3 * Lanes + 5,
                                        int64_t(terms.size())};
  for (const int64_t n : lengths) {
    std::vector<double> lanes(Lanes, 0.0);
    for (int64_t i = 0; i < n; ++i) lanes[size_t(i % Lanes)] += t[i];
    const double want = tree(lanes, 0, Lanes);
    const double got = cpu::lane_sum<Lanes>(n, [t](int64_t i) { return t[i]; });
    EXPECT_EQ(std::bit_cast<uint64_t>(got), std::bit_cast<uint64_t>(want))
        << Lanes << " lanes, n=" << n << ": " << got << " vs " << want;
  }
}

TEST(LaneSum, OrderIsTheLanesThenAPairwiseTree) {
  std::vector<double> terms;
  for (uint64_t i = 0; i < 1000; ++i)
    terms.push_back((uniform01(11, i) - 0.5) * std::ldexp(1.0, int(uniform01(12, i) * 80) - 40));
  expect_lane_order<cpu::kSumLanes>(terms);
  expect_lane_order<cpu::kWideSumLanes>(terms);
  // The default is the 8 lanes the row sums have always used.
  const double* t = terms.data();
  const int64_t n = int64_t(terms.size());
  EXPECT_EQ(cpu::lane_sum(n, [t](int64_t i) { return t[i]; }),
            cpu::lane_sum<8>(n, [t](int64_t i) { return t[i]; }));
}

// Dropout: every loop this CPU runs, on spans that start and end inside a group of four (rows of
// attention probabilities do), in place and not, gives bitwise the scalar definition (core/rng.h):
// kept elements x / keep_scale (NaN, infinities and -0 included), dropped ones +0.
TEST(Dropout, EveryLoopIsTheScalarDefinitionBitForBit) {
  std::vector<float> x(2000);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 4.0f * uniform01(11, i) - 2.0f;
  x[5] = -0.0f;
  x[37] = std::numeric_limits<float>::infinity();
  x[38] = -std::numeric_limits<float>::infinity();
  x[101] = std::numeric_limits<float>::quiet_NaN();
  x[1003] = 3e38f;  // / 0.1 overflows to inf where kept
  struct Loop {
    const char* isa;
    bool supported;
    cpu::DropoutGroups groups;
  };
  std::vector<Loop> loops = {{"sse4.1", bool(__builtin_cpu_supports("sse4.1")),
                              cpu::dropout_groups_sse41},
                             {"avx2", bool(__builtin_cpu_supports("avx2")),
                              cpu::dropout_groups_avx2},
                             {"avx512dq", __builtin_cpu_supports("avx512f") &&
                                              __builtin_cpu_supports("avx512dq"),
                              cpu::dropout_groups_avx512}};
  int ran = 0;
  for (const Loop& loop : loops) {
    if (!loop.supported) {
      std::printf("dropout loop %s: this CPU does not run it (not checked here)\n", loop.isa);
      continue;
    }
    ++ran;
    for (float p : {0.1f, 0.5f, 0.9f, 1e-6f /* threshold 0: all kept */, 0.99999f}) {
      const uint32_t threshold = dropout_threshold(p);
      const float keep_scale = 1.0f - p;
      for (uint64_t first : {uint64_t(0), uint64_t(1), uint64_t(6), uint64_t(1) << 40}) {
        for (int64_t n : {int64_t(0), int64_t(1), int64_t(3), int64_t(4), int64_t(31),
                          int64_t(33), int64_t(114), int64_t(512), int64_t(1999)}) {
          const uint64_t seed = 0x1234567 + uint64_t(n);
          std::vector<float> out(size_t(n) + 1, 7.0f), inplace(x.begin(), x.begin() + n);
          cpu::dropout_span(out.data(), x.data(), n, first, seed, threshold, keep_scale,
                            loop.groups);
          cpu::dropout_span(inplace.data(), inplace.data(), n, first, seed, threshold,
                            keep_scale, loop.groups);
          for (int64_t k = 0; k < n; ++k) {
            const float want =
                random16(seed, first + uint64_t(k)) >= threshold ? x[k] / keep_scale : 0.0f;
            ASSERT_EQ(std::bit_cast<uint32_t>(out[k]), std::bit_cast<uint32_t>(want))
                << loop.isa << " p=" << p << " first=" << first << " n=" << n << " k=" << k;
            ASSERT_EQ(std::bit_cast<uint32_t>(inplace[k]), std::bit_cast<uint32_t>(want))
                << loop.isa << " in place, k=" << k;
          }
          ASSERT_EQ(out[size_t(n)], 7.0f) << loop.isa << ": wrote past the span";
        }
      }
    }
  }
  EXPECT_GE(ran, 1);
}

}  // namespace
}  // namespace switcht5
