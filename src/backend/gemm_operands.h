// Checks a backend's gemm_ex and cast share (backend.h's contract for their operands).
#pragma once
#include <cstdint>

#include "core/check.h"
#include "core/dtype.h"

namespace switcht5 {

// gemm_ex and cast take fp32 or bf16 operands only.
inline void check_float_type(DType t, const char* what) {
  SWT_CHECK(t == DType::kF32 || t == DType::kBF16, "{}: {} is not a floating-point type", what,
            dtype_name(t));
}

// gemm_ex's three operands.
inline void check_gemm_ex_types(DType a, DType b, DType c) {
  check_float_type(a, "gemm_ex A");
  check_float_type(b, "gemm_ex B");
  check_float_type(c, "gemm_ex C");
}

// Elements a strided batch of `rows` x `cols` blocks with leading dimension `ld` spans, from the
// first block's first element to the last block's last (0 for an empty one).
inline int64_t gemm_extent(int batch, int64_t stride, int rows, int64_t ld, int cols) {
  if (batch <= 0 || rows <= 0 || cols <= 0) return 0;
  return int64_t(batch - 1) * stride + int64_t(rows - 1) * ld + cols;
}

}  // namespace switcht5
