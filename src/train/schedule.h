// Learning-rate schedules: the learning rate as a pure function of the 1-based step.
//
//   rsqrt    (T5):  lr = base / sqrt(max(step, warmup))        (warmup 0: max(step, 1))
//                   constant base/sqrt(warmup) during warmup, then inverse square-root decay.
//   cosine:         lr = base * step / warmup                   for step <= warmup
//                   lr = min + (base - min) * (1 + cos(pi * p)) / 2,
//                        p = (step - warmup) / (total - warmup)  for warmup < step <= total
//                   lr = min                                     for step > total
//   linear:         warmup as cosine, then lr = base + (min - base) * p, min after total
//   constant:       warmup as cosine, then lr = base
#pragma once
#include <cstdint>
#include <string>

namespace switcht5 {

struct ScheduleOptions {
  std::string name = "rsqrt";  // rsqrt | cosine | linear | constant
  double base_lr = 0.01;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1000;  // end of the decay for cosine and linear
  double min_lr = 0.0;         // floor reached at total_steps (cosine, linear)
};

class LrSchedule {
 public:
  // Throws UserError for an unknown name or inconsistent options.
  explicit LrSchedule(ScheduleOptions options);
  double lr(int64_t step) const;  // step >= 1
  const ScheduleOptions& options() const { return options_; }

 private:
  enum class Kind { kRsqrt, kCosine, kLinear, kConstant };
  ScheduleOptions options_;
  Kind kind_;
};

}  // namespace switcht5
