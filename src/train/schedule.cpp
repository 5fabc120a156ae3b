#include "train/schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/check.h"

namespace switcht5 {

LrSchedule::LrSchedule(ScheduleOptions options) : options_(std::move(options)) {
  const std::string& n = options_.name;
  if (n == "rsqrt")
    kind_ = Kind::kRsqrt;
  else if (n == "cosine")
    kind_ = Kind::kCosine;
  else if (n == "linear")
    kind_ = Kind::kLinear;
  else if (n == "constant")
    kind_ = Kind::kConstant;
  else
    throw UserError(fmt::format(
        "unknown learning-rate schedule '{}' (allowed: rsqrt, cosine, linear, constant)", n));
  SWT_USER_CHECK(options_.base_lr > 0.0, "schedule base_lr must be > 0, got {}", options_.base_lr);
  SWT_USER_CHECK(options_.warmup_steps >= 0, "schedule warmup_steps must be >= 0, got {}",
                 options_.warmup_steps);
  if (kind_ == Kind::kCosine || kind_ == Kind::kLinear) {
    SWT_USER_CHECK(options_.min_lr >= 0.0 && options_.min_lr <= options_.base_lr,
                   "schedule min_lr must lie in [0, base_lr = {}], got {}", options_.base_lr,
                   options_.min_lr);
    SWT_USER_CHECK(options_.total_steps > options_.warmup_steps,
                   "schedule '{}' needs total_steps ({}) > warmup_steps ({})", n,
                   options_.total_steps, options_.warmup_steps);
  }
}

double LrSchedule::lr(int64_t step) const {
  SWT_CHECK(step >= 1, "learning-rate steps start at 1, got {}", step);
  const double base = options_.base_lr;
  const int64_t warmup = options_.warmup_steps;
  if (kind_ == Kind::kRsqrt)
    return base /
           std::sqrt(static_cast<double>(std::max<int64_t>(step, std::max<int64_t>(warmup, 1))));

  if (step <= warmup) return base * static_cast<double>(step) / static_cast<double>(warmup);
  if (kind_ == Kind::kConstant) return base;

  const double min_lr = options_.min_lr;
  const int64_t total = options_.total_steps;
  if (step >= total) return min_lr;
  const double progress =
      static_cast<double>(step - warmup) / static_cast<double>(total - warmup);  // in (0, 1)
  if (kind_ == Kind::kCosine)
    return min_lr + (base - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return base + (min_lr - base) * progress;  // linear
}

}  // namespace switcht5
