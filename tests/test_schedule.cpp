// Learning-rate schedules at key steps (values worked out by hand in the comments).
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>
#include <string>

#include "core/check.h"
#include "train/schedule.h"

namespace switcht5 {
namespace {

LrSchedule make(std::string name, double base, int64_t warmup, int64_t total, double min_lr = 0.0) {
  return LrSchedule(ScheduleOptions{std::move(name), base, warmup, total, min_lr});
}

TEST(Schedule, RsqrtNoWarmup) {
  LrSchedule s = make("rsqrt", 0.01, 0, 1000);
  EXPECT_DOUBLE_EQ(s.lr(1), 0.01);                         // 0.01 / sqrt(1)
  EXPECT_DOUBLE_EQ(s.lr(4), 0.005);                        // 0.01 / sqrt(4)
  EXPECT_DOUBLE_EQ(s.lr(100), 0.001);                      // 0.01 / sqrt(100)
  EXPECT_DOUBLE_EQ(s.lr(5000), 0.01 / std::sqrt(5000.0));  // no end at total_steps
}

TEST(Schedule, RsqrtT5Warmup) {
  // T5: 1 / sqrt(max(step, 10^4)) = 0.01 for the first 10^4 steps.
  LrSchedule s = make("rsqrt", 1.0, 10000, 1000);
  EXPECT_DOUBLE_EQ(s.lr(1), 0.01);
  EXPECT_DOUBLE_EQ(s.lr(10000), 0.01);
  EXPECT_DOUBLE_EQ(s.lr(40000), 0.005);  // 1 / sqrt(40000)
}

// base 1, warmup 10, total 110, min 0.1; after warmup p = (step - 10) / 100.
TEST(Schedule, Cosine) {
  LrSchedule s = make("cosine", 1.0, 10, 110, 0.1);
  EXPECT_DOUBLE_EQ(s.lr(1), 0.1);   // 1 * 1/10
  EXPECT_DOUBLE_EQ(s.lr(5), 0.5);   // 1 * 5/10
  EXPECT_DOUBLE_EQ(s.lr(10), 1.0);  // end of warmup
  // p = 0.25: 0.1 + 0.9 * (1 + cos(pi/4)) / 2 = 0.1 + 0.45 * 1.70710678 = 0.86819805
  EXPECT_NEAR(s.lr(35), 0.86819805, 1e-8);
  EXPECT_NEAR(s.lr(60), 0.55, 1e-12);  // p = 0.5: 0.1 + 0.9 / 2
  EXPECT_DOUBLE_EQ(s.lr(110), 0.1);    // p = 1: min_lr
  EXPECT_DOUBLE_EQ(s.lr(1000), 0.1);   // after total_steps
  for (int64_t t = 11; t < 200; ++t) EXPECT_LE(s.lr(t), s.lr(t - 1)) << t;
}

TEST(Schedule, CosineNoWarmup) {
  LrSchedule s = make("cosine", 2.0, 0, 100);
  EXPECT_NEAR(s.lr(1), 1.0 + std::cos(std::numbers::pi * 0.01),
              1e-12);  // 2 * (1 + cos(pi/100)) / 2
  EXPECT_NEAR(s.lr(50), 1.0, 1e-12);
  EXPECT_DOUBLE_EQ(s.lr(100), 0.0);
}

TEST(Schedule, Linear) {
  LrSchedule s = make("linear", 1.0, 10, 110, 0.1);
  EXPECT_DOUBLE_EQ(s.lr(5), 0.5);
  EXPECT_DOUBLE_EQ(s.lr(10), 1.0);
  EXPECT_NEAR(s.lr(35), 0.775, 1e-12);  // 1 - 0.9 * 0.25
  EXPECT_NEAR(s.lr(60), 0.55, 1e-12);   // 1 - 0.9 * 0.5
  EXPECT_DOUBLE_EQ(s.lr(110), 0.1);
  EXPECT_DOUBLE_EQ(s.lr(111), 0.1);
}

TEST(Schedule, Constant) {
  LrSchedule s = make("constant", 1.0, 4, 10);
  EXPECT_DOUBLE_EQ(s.lr(1), 0.25);
  EXPECT_DOUBLE_EQ(s.lr(2), 0.5);
  EXPECT_DOUBLE_EQ(s.lr(4), 1.0);
  EXPECT_DOUBLE_EQ(s.lr(5), 1.0);
  EXPECT_DOUBLE_EQ(s.lr(1000000), 1.0);  // total_steps does not matter
  EXPECT_DOUBLE_EQ(make("constant", 0.3, 0, 10).lr(1), 0.3);
}

TEST(Schedule, UnknownNameNamesTheChoices) {
  try {
    make("exponential", 1.0, 0, 10);
    FAIL() << "expected UserError";
  } catch (const UserError& e) {
    const std::string msg = e.what();
    for (const char* word : {"exponential", "rsqrt", "cosine", "linear", "constant"})
      EXPECT_NE(msg.find(word), std::string::npos) << msg;
  }
}

TEST(Schedule, BadOptionsAreUserErrors) {
  EXPECT_THROW(make("cosine", 1.0, 100, 100), UserError);    // no room to decay
  EXPECT_THROW(make("linear", 1.0, 0, 10, 2.0), UserError);  // min_lr above base
  EXPECT_THROW(make("rsqrt", 0.0, 0, 10), UserError);
  EXPECT_THROW(make("constant", 1.0, -1, 10), UserError);
  EXPECT_THROW(make("rsqrt", 1.0, 0, 10).lr(0), Error);  // steps start at 1
}

}  // namespace
}  // namespace switcht5
