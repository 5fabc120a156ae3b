// cuda_fail (cuda_check.h): compiled by the C++ compiler, so the message is formatted with fmt
// like every other Error.
#include "backend/cuda/cuda_check.h"

#include <fmt/format.h>

#include "core/check.h"

namespace switcht5::cuda {

void cuda_fail(const char* file, int line, const char* call, const char* library, int code,
               const char* message) {
  // "src/backend/cuda/cuda_backend.cpp:88: CUDA call cudaMalloc(&p, bytes) failed: out of
  // memory (code 2)"
  throw Error(fmt::format("{}:{}: {} call {} failed: {} (code {})", file, line, library, call,
                          message ? message : "no message", code));
}

}  // namespace switcht5::cuda
