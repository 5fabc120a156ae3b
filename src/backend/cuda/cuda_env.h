// SWITCHT5_CUDA_MEMORY_FRACTION, read by the CUDA backend at start-up. A plain C++ header (it
// uses core/check.h, so .cu files do not include it), tested in every build (test_plan.cpp).
#pragma once
#include <cerrno>
#include <cmath>
#include <cstdlib>

#include "backend/cuda/cuda_memory.h"
#include "core/check.h"

namespace switcht5::cuda {

// SWITCHT5_CUDA_MEMORY_FRACTION's value (null: unset, the default): a number in (0, 1], else a
// UserError naming the variable and the value.
inline double memory_fraction(const char* value) {
  if (!value) return kDefaultMemoryFraction;
  char* end = nullptr;
  errno = 0;
  const double f = std::strtod(value, &end);
  SWT_USER_CHECK(end != value && *end == '\0' && errno == 0 && std::isfinite(f) && f > 0.0 &&
                     f <= 1.0,
                 "{}=\"{}\": expected a number in (0, 1], the fraction of the GPU's free memory "
                 "the CUDA backend reserves at startup (default {})",
                 kCudaMemoryFractionEnv, value, kDefaultMemoryFraction);
  return f;
}

}  // namespace switcht5::cuda
