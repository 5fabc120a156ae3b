// ActivationBuffer: an activation a layer keeps between forward and backward, held in the
// compute dtype (ParamStore::compute_dtype()): fp32, or bf16 under train.precision: bf16, which
// halves activation memory and gives a GPU backend real bf16 GEMM operands.
//
// Arithmetic stays fp32 except inside GEMMs. A layer computes an activation in an fp32 buffer,
// rounds it to bf16 where a GPU kernel would store its bf16 result (store_activation in
// model/linear.h) and stores it here; the cast is exact because the value already is a bf16.
// GEMMs read the stored buffer directly through view() (Backend::gemm_ex widens bf16 operands
// exactly); elementwise ops that need fp32 read a copy cast into scratch (load).
// In fp32 mode the buffer IS the fp32 buffer the layer computes in: f32_or() hands it out,
// store() and load() do nothing, so the fp32 path has no cast and no copy.
//
//   ActivationBuffer h_(be, ps.compute_dtype(), n);
//   float* h = h_.f32_or(arena);          // h_ itself (fp32), or n floats of scratch (bf16)
//   ... compute h in fp32; store_activation(be, ps, h, n) ...
//   h_.store(be, h);                      // nothing (fp32), or the cast to bf16
//   linear_forward(be, y, h_.view(), W, ...);   // GEMMs read it as stored
//   const float* h32 = h_.load(be, arena);      // h_ (fp32), or an fp32 copy in scratch (bf16)
// Staging taken from a ScratchArena is counted by staging_floats() (0 in fp32 mode), which the
// layer adds to its declared scratch size.
#pragma once
#include <cstddef>
#include <cstdint>

#include "backend/backend.h"
#include "core/check.h"
#include "core/dtype.h"
#include "model/scratch_arena.h"

namespace switcht5 {

// A read-only activation in backend memory with its element type (fp32 or bf16). An fp32
// pointer converts implicitly: every fp32 buffer is an fp32 activation.
struct ActivationView {
  const void* data = nullptr;
  DType dtype = DType::kF32;

  ActivationView() = default;
  ActivationView(const void* d, DType t) : data(d), dtype(t) {}
  ActivationView(const float* d) : data(d), dtype(DType::kF32) {}  // NOLINT: implicit on purpose

  bool is_f32() const { return dtype == DType::kF32; }
  // The fp32 pointer of an fp32 view (an internal error for a bf16 one).
  const float* f32() const {
    SWT_CHECK(is_f32(), "ActivationView::f32() of a {} activation", dtype_name(dtype));
    return static_cast<const float*>(data);
  }
};

// The n elements of `x` as fp32: x itself when it is fp32, else a copy cast into `staging` (n
// floats; exact: bf16 widens exactly).
inline const float* load_f32(Backend& be, ActivationView x, int64_t n, float* staging) {
  if (x.is_f32()) return x.f32();
  be.cast(staging, DType::kF32, x.data, x.dtype, n);
  return staging;
}
// The same with the staging taken from `arena` (only for a bf16 x).
inline const float* load_f32(Backend& be, ActivationView x, int64_t n, ScratchArena& arena) {
  return load_f32(be, x, n, x.is_f32() ? nullptr : arena.take<float>(n));
}

// C [fp32] = alpha op(A) op(B) + beta C (Backend::gemm's shapes and strides, in elements) with A
// and B as kept: the all-fp32 gemm when both are fp32 (the fp32 path as it always was), gemm_ex
// reading the bf16 operand(s) as stored otherwise.
inline void activation_gemm(Backend& be, bool trans_a, bool trans_b, int M, int N, int K,
                            float alpha, ActivationView A, int lda, int64_t stride_a,
                            ActivationView B, int ldb, int64_t stride_b, float beta, float* C,
                            int ldc, int64_t stride_c, int batch) {
  if (A.is_f32() && B.is_f32()) {
    be.gemm(trans_a, trans_b, M, N, K, alpha, A.f32(), lda, stride_a, B.f32(), ldb, stride_b,
            beta, C, ldc, stride_c, batch);
    return;
  }
  be.gemm_ex(trans_a, trans_b, M, N, K, alpha, A.data, A.dtype, lda, stride_a, B.data, B.dtype,
             ldb, stride_b, beta, C, DType::kF32, ldc, stride_c, batch);
}

class ActivationBuffer {
 public:
  ActivationBuffer() = default;
  ActivationBuffer(Backend& be, DType dtype, int64_t n)
      : storage_(be, int64_t(dtype_size(dtype)) * n), dtype_(dtype), n_(n) {
    SWT_CHECK(dtype == DType::kF32 || dtype == DType::kBF16, "activation dtype {}",
              dtype_name(dtype));
  }

  DType dtype() const { return dtype_; }
  bool is_f32() const { return dtype_ == DType::kF32; }
  int64_t size() const { return n_; }
  size_t bytes() const { return storage_.bytes(); }
  void* data() { return storage_.data(); }
  const void* data() const { return storage_.data(); }
  ActivationView view() const { return {storage_.data(), dtype_}; }

  // Floats of fp32 staging the bf16 buffer needs from a scratch arena (0 in fp32 mode).
  int64_t staging_floats() const { return is_f32() ? 0 : n_; }

  // Where to compute the activation in fp32: the buffer itself (fp32), else `staging` (bf16),
  // which holds size() floats.
  float* f32_or(float* staging) {
    return is_f32() ? static_cast<float*>(data()) : staging;
  }
  // The same with the staging (staging_floats() floats) taken from `arena`.
  float* f32_or(ScratchArena& arena) {
    return is_f32() ? static_cast<float*>(data()) : arena.take<float>(n_);
  }

  // Stores the first n (default: all) fp32 values of `src`, already rounded to bf16 in bf16
  // mode: the cast to bf16 (exact), or nothing in fp32 mode, where src must be the buffer itself
  // (what f32_or returned).
  void store(Backend& be, const float* src, int64_t n = -1) {
    if (n < 0) n = n_;
    SWT_CHECK(n <= n_, "ActivationBuffer::store of {} elements into {}", n, n_);
    if (is_f32()) {
      SWT_CHECK(src == data(), "ActivationBuffer::store: an fp32 activation is computed in place");
      return;
    }
    be.cast(data(), dtype_, src, DType::kF32, n);
  }

  // The first n (default: all) values as fp32: the buffer itself (fp32), else a copy cast into
  // `staging` (bf16), which holds at least n floats.
  const float* load(Backend& be, float* staging, int64_t n = -1) const {
    if (n < 0) n = n_;
    SWT_CHECK(n <= n_, "ActivationBuffer::load of {} elements from {}", n, n_);
    if (is_f32()) return static_cast<const float*>(data());
    be.cast(staging, DType::kF32, data(), dtype_, n);
    return staging;
  }
  // The same with the staging (staging_floats() floats) taken from `arena`.
  const float* load(Backend& be, ScratchArena& arena, int64_t n = -1) const {
    return load(be, is_f32() ? nullptr : arena.take<float>(n_), n);
  }

 private:
  DeviceArray<std::byte> storage_;
  DType dtype_ = DType::kF32;
  int64_t n_ = 0;
};

}  // namespace switcht5
