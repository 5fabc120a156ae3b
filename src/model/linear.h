// Bias-free linear maps in HF layout (W is [out, in]), as `count` independent problems laid out
// back to back (count = num_experts for stacked expert weights, 1 otherwise):
//   x  [count, N, in]   W [count, out, in]   y [count, N, out]
// Forward  y  = x W^T
// Backward dx = dy W          (assigned, or accumulated when `accumulate`)
//          dW += dy^T x       (parameter gradients always accumulate)
#pragma once
#include <cstdint>

#include "backend/backend.h"
#include "model/activation_buffer.h"
#include "model/params.h"

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

// x as the layer kept it (model/activation_buffer.h): an fp32 x takes the all-fp32 gemm, a
// bf16 x is read as bf16 by gemm_ex. dW is the fp32 master gradient of `w` either way: count
// stacked [out, in] blocks, all of w, overwritten by the step's first write and added to after
// (ParamStore::grad_target). A write that makes dW final adds its squares to the norm's sum
// as it goes, when grad_target asks for them.
// rows (here and below; backend memory, int32 [count], or null): problem i's rows of x and dy
// past rows[i] are zero (an expert's capacity buffer past its kept tokens), which a backend
// may skip (Backend::gemm_ex_rows); the results are the same.
inline void linear_backward_weight(Backend& be, ParamStore& ps, const ParamInfo& w,
                                   const float* dy, ActivationView x, int N, int in, int out,
                                   int count = 1, const int32_t* rows = nullptr) {
  const auto [dW, beta, squares] = ps.grad_target(w, int64_t(count) * out * in);
  if (squares || rows) {
    be.gemm_ex_rows(true, false, out, in, N, 1.0f, dy, DType::kF32, out, int64_t(N) * out,
                    x.data, x.dtype, in, int64_t(N) * in, beta, dW, DType::kF32, in,
                    int64_t(out) * in, count, rows, squares);
    return;
  }
  if (x.is_f32()) {
    be.gemm(true, false, out, in, N, 1.0f, dy, out, int64_t(N) * out, x.f32(), in,
            int64_t(N) * in, beta, dW, in, int64_t(out) * in, count);
    return;
  }
  be.gemm_ex(true, false, out, in, N, 1.0f, dy, DType::kF32, out, int64_t(N) * out, x.data,
             x.dtype, in, int64_t(N) * in, beta, dW, DType::kF32, in, int64_t(out) * in, count);
}

// Mixed precision: the same maps with the weight as ParamStore::weight() gives it (its bf16
// compute copy, or the fp32 master). With a bf16 weight the layer runs in bf16: x is a bf16
// activation (a bf16 ActivationBuffer, or bf16 values in an fp32 buffer), dy holds bf16
// values, the GEMM sums in fp32, and y / dx get bf16 values (rounded once, as a bf16-output
// GEMM does) in fp32 buffers. dW always accumulates in fp32: the master gradient. With an fp32
// weight and x these are exactly the functions above.
inline void linear_forward(Backend& be, float* y, ActivationView x, ParamStore::WeightView W,
                           int N, int in, int out, int count = 1, const int32_t* rows = nullptr) {
  be.gemm_ex_rows(false, true, N, out, in, 1.0f, x.data, x.dtype, in, int64_t(N) * in, W.data,
                  W.dtype, in, int64_t(out) * in, 0.0f, y, DType::kF32, out, int64_t(N) * out,
                  count, rows, nullptr);
  if (W.dtype == DType::kBF16) be.round_to_bf16(y, int64_t(count) * N * out);
}

inline void linear_backward_input(Backend& be, float* dx, const float* dy,
                                  ParamStore::WeightView W, int N, int in, int out,
                                  bool accumulate, int count = 1, const int32_t* rows = nullptr) {
  be.gemm_ex_rows(false, false, N, in, out, 1.0f, dy, DType::kF32, out, int64_t(N) * out, W.data,
                  W.dtype, in, int64_t(out) * in, accumulate ? 1.0f : 0.0f, dx, DType::kF32, in,
                  int64_t(N) * in, count, rows, nullptr);
  if (W.dtype == DType::kBF16) be.round_to_bf16(dx, int64_t(count) * N * in);
}

// Gives x [n] the value the compute dtype stores: rounded to bf16 in bf16 mode, as is in fp32
// (see ParamStore::compute_dtype()). A kept activation is then stored in its ActivationBuffer
// (model/activation_buffer.h); a transient one (a gradient) stays in its fp32 buffer.
inline void store_activation(Backend& be, const ParamStore& ps, float* x, int64_t n) {
  if (ps.compute_dtype() == DType::kBF16) be.round_to_bf16(x, n);
}

}  // namespace switcht5
