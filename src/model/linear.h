// Bias-free linear maps in HF layout (W is [out, in]), as `count` independent problems laid out
// back to back (count = num_experts for stacked expert weights, 1 otherwise):
//   x  [count, N, in]   W [count, out, in]   y [count, N, out]
// Forward  y  = x W^T
// Backward dx = dy W          (assigned, or accumulated when `accumulate`)
//          dW += dy^T x       (parameter gradients always accumulate)
#pragma once
#include <cstdint>

#include "backend/backend.h"

namespace switcht5 {

inline void linear_forward(Backend& be, float* y, const float* x, const float* W, int N, int in,
                           int out, int count = 1) {
  be.gemm(false, true, N, out, in, 1.0f, x, in, int64_t(N) * in, W, in, int64_t(out) * in, 0.0f, y,
          out, int64_t(N) * out, count);
}

inline void linear_backward_input(Backend& be, float* dx, const float* dy, const float* W, int N,
                                  int in, int out, bool accumulate, int count = 1) {
  be.gemm(false, false, N, in, out, 1.0f, dy, out, int64_t(N) * out, W, in, int64_t(out) * in,
          accumulate ? 1.0f : 0.0f, dx, in, int64_t(N) * in, count);
}

inline void linear_backward_weight(Backend& be, float* dW, const float* dy, const float* x, int N,
                                   int in, int out, int count = 1) {
  be.gemm(true, false, out, in, N, 1.0f, dy, out, int64_t(N) * out, x, in, int64_t(N) * in, 1.0f,
          dW, in, int64_t(out) * in, count);
}

}  // namespace switcht5
