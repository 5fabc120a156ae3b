// bfloat16 conversion (core/dtype.h): exact widening, round-to-nearest-even narrowing checked
// against an independent computation in double over every bf16 interval boundary class, NaN
// and Inf handling, and the overflow threshold.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "core/dtype.h"
#include "core/rng.h"

namespace switcht5 {
namespace {

// Round-to-nearest-even of a finite float to 8 significant bits, computed in double with
// frexp/ldexp, independently of the bit trick in float_to_bf16.
float reference_round(float x) {
  if (x == 0.0f) return x;
  int e;
  const double m = std::frexp(double(x), &e);  // x = m * 2^e, 0.5 <= |m| < 1
  const double scaled = std::ldexp(m, 8);      // 8 significant bits in the integer part
  double r = std::nearbyint(scaled);           // default rounding mode: ties to even
  const double out = std::ldexp(r, e - 8);
  if (std::fabs(out) > double(std::numeric_limits<float>::max()))
    return std::copysign(std::numeric_limits<float>::infinity(), x);
  return float(out);
}

TEST(BFloat16, WideningIsExactAndNarrowingInvertsIt) {
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = bf16_to_float(uint16_t(h));
    EXPECT_EQ(std::bit_cast<uint32_t>(f), h << 16);
    if (!std::isnan(f)) {
      ASSERT_EQ(float_to_bf16(f), uint16_t(h)) << std::hex << h;
    }
  }
}

TEST(BFloat16, RoundsToNearestEven) {
  // Random floats over many binades, and the exact midpoints between neighbours (ties).
  CounterRng rng(7);
  int ties = 0;
  for (int i = 0; i < 200000; ++i) {
    uint32_t bits = uint32_t(rng.next_u64());
    bits &= 0xBFFFFFFFu;  // exponents below 128: finite, no overflow to Inf
    if (i % 4 == 0) { bits = (bits & 0xFFFF0000u) | 0x8000u; ++ties; }  // a tie
    const float x = std::bit_cast<float>(bits);
    if (std::isnan(x) || std::fpclassify(x) == FP_SUBNORMAL) continue;
    ASSERT_EQ(round_to_bf16(x), reference_round(x)) << std::hex << bits;
  }
  EXPECT_GT(ties, 40000);
  // Ties go to the even neighbour: 1 + 2^-8 (halfway between 1 and 1 + 2^-7) rounds down to 1;
  // 1 + 3 * 2^-8 (halfway between 1 + 2^-7 and 1 + 2^-6) rounds up to 1 + 2^-6.
  EXPECT_EQ(round_to_bf16(1.0f + 0x1p-8f), 1.0f);
  EXPECT_EQ(round_to_bf16(1.0f + 3 * 0x1p-8f), 1.0f + 0x1p-6f);
  EXPECT_EQ(round_to_bf16(-(1.0f + 3 * 0x1p-8f)), -(1.0f + 0x1p-6f));
}

TEST(BFloat16, SpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(round_to_bf16(inf), inf);
  EXPECT_EQ(round_to_bf16(-inf), -inf);
  EXPECT_TRUE(std::isnan(round_to_bf16(std::numeric_limits<float>::quiet_NaN())));
  // A signalling NaN whose payload sits only in the low 16 bits must not become Inf.
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::bit_cast<float>(0x7F800001u)))));
  EXPECT_EQ(std::bit_cast<uint32_t>(round_to_bf16(-0.0f)), 0x80000000u);
  // The largest finite float rounds past the largest bf16 (0x7F7F): to Inf.
  EXPECT_EQ(round_to_bf16(std::numeric_limits<float>::max()), inf);
  EXPECT_EQ(float_to_bf16(bf16_to_float(0x7F7F)), 0x7F7F);
}

}  // namespace
}  // namespace switcht5
