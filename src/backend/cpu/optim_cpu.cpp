// CpuBackend optimizer kernels: OpenMP over elements, rows or fixed column blocks. Elementwise
// arithmetic is float; every reduction is accumulated in double, each partial sum by one thread
// over a range fixed by the shapes (never by the thread count), and partials are combined in
// index order, so results are bitwise reproducible for any OMP_NUM_THREADS.
// Formulas: backend/backend.h; HF correspondence: reference/optim_reference.cpp.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/cpu_kernels.h"
#include "core/check.h"
#include "core/dtype.h"

namespace switcht5 {

namespace {
// Work below this many elements runs on the calling thread (fork/join would cost more).
constexpr int64_t kParallelMin = 16384;
// Factored statistics: each thread takes blocks of this many rows, summing their columns into
// the block's own row of column sums; the blocks' sums are then added in block order. The
// order depends on the shape alone.
constexpr int kStatRows = 32;
// Columns per task when the blocks' column sums are combined.
constexpr int kColChunk = 256;
// Unfactored: partial sums of u^2 per block of this many elements.
constexpr int64_t kElemBlock = 4096;

// Update clipping: 1 / max(1, rms(u) / clip), rms from the partial sums of u^2 (added in order)
// over the matrix's n elements.
float clip_factor(const double* partial, int64_t parts, int64_t n, float clip) {
  double ss = 0.0;
  for (int64_t i = 0; i < parts; ++i) ss += partial[i];
  return static_cast<float>(1.0 / std::max(1.0, std::sqrt(ss / double(n)) / double(clip)));
}

// The loops below are the per-row (or per-block) bodies of adafactor_update, with AVX2/AVX-512
// clones (cpu_kernels.h); every sum in lane_sum's fixed order.

// Returns sum_j (g[j]^2 + e1) over one row and adds each term to col[j].
SWT_CPU_CLONES double adafactor_row_statistics(const float* g, int C, double e1, double* col) {
  return cpu::lane_sum(C, [&](int64_t j) {
    const double t = double(g[j]) * g[j] + e1;
    col[j] += t;
    return t;
  });
}

// vc[j] = b2 vc[j] + (1-b2) (sum over the row blocks of col_sums[b * stride + j]) / R, j < n.
SWT_CPU_CLONES void adafactor_column_statistics(float* vc, const double* col_sums, int n,
                                               int row_blocks, int stride, double b2, int R) {
  double acc[kColChunk] = {};
  for (int b = 0; b < row_blocks; ++b) {
    const double* s = col_sums + int64_t(b) * stride;
    for (int j = 0; j < n; ++j) acc[j] += s[j];
  }
  for (int j = 0; j < n; ++j) vc[j] = static_cast<float>(b2 * vc[j] + (1.0 - b2) * (acc[j] / R));
}

// sum_j u^2 over one row, u = g[j] * rf * cf[j] (fp32, as the update computes it).
SWT_CPU_CLONES double adafactor_row_u_squares(const float* g, float rf, const float* cf, int C) {
  return cpu::lane_sum(C, [&](int64_t j) {
    const float u = g[j] * rf * cf[j];
    return double(u) * u;
  });
}

// p -= lr (u / max(1, rms(u) / clip) + wd p) over one row; bf16 copy when b is not null.
SWT_CPU_CLONES void adafactor_row_update(float* p, uint16_t* b, const float* g, float rf,
                                        const float* cf, int C, float lr, float inv_denom,
                                        float weight_decay) {
  for (int j = 0; j < C; ++j) {
    const float u = g[j] * rf * cf[j];
    p[j] = p[j] - lr * (u * inv_denom + weight_decay * p[j]);
  }
  if (b)
    for (int j = 0; j < C; ++j) b[j] = float_to_bf16(p[j]);
}

// Unfactored, one block: v = b2 v + (1-b2)(g^2 + eps1); returns sum of u^2, u = g / sqrt(v).
SWT_CPU_CLONES double adafactor_block_second_moment(float* v, const float* g, int64_t n,
                                                    float beta2t, float eps1) {
  return cpu::lane_sum(n, [&](int64_t e) {
    const float ve = beta2t * v[e] + (1.0f - beta2t) * (g[e] * g[e] + eps1);
    v[e] = ve;
    const float u = g[e] / std::sqrt(ve);
    return double(u) * u;
  });
}

// Unfactored, one block: p -= lr (u / max(1, rms(u) / clip) + wd p), u = g / sqrt(v).
SWT_CPU_CLONES void adafactor_block_update(float* p, uint16_t* b, const float* g, const float* v,
                                          int64_t n, float lr, float inv_denom,
                                          float weight_decay) {
  for (int64_t e = 0; e < n; ++e) {
    const float u = g[e] / std::sqrt(v[e]);
    p[e] = p[e] - lr * (u * inv_denom + weight_decay * p[e]);
  }
  if (b)
    for (int64_t e = 0; e < n; ++e) b[e] = float_to_bf16(p[e]);
}
}  // namespace

// p_new = p - lr * ((m/bc1) / (sqrt(v/bc2) + eps) + wd * p), p before the step.
void CpuBackend::adamw_update(float* p, uint16_t* p_bf16, const float* g, float* m, float* v,
                              int64_t n, float lr, float beta1, float beta2, float eps,
                              float weight_decay, float bc1, float bc2) {
  const float one_minus_b1 = 1.0f - beta1, one_minus_b2 = 1.0f - beta2;
  const float inv_bc1 = 1.0f / bc1, inv_bc2 = 1.0f / bc2;
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = beta1 * m[i] + one_minus_b1 * gi;
    const float vi = beta2 * v[i] + one_minus_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float update = (mi * inv_bc1) / (std::sqrt(vi * inv_bc2) + eps);
    p[i] = p[i] - lr * (update + weight_decay * p[i]);
    if (p_bf16) p_bf16[i] = float_to_bf16(p[i]);
  }
}

void CpuBackend::adafactor_update(float* p, uint16_t* p_bf16, const float* g, float* vr, float* vc,
                                  float* v, bool factored, int count, int R, int C, float lr,
                                  float beta2t, float eps1, float clip, float weight_decay,
                                  float eps2) {
  SWT_CHECK(count >= 1 && R >= 1 && C >= 1, "adafactor_update: bad shape count={} R={} C={}", count,
            R, C);
  SWT_CHECK(factored ? (vr && vc) : (v != nullptr), "adafactor_update: missing state");
  SWT_CHECK(eps2 >= 0.0f, "adafactor_update: eps2 {} < 0", eps2);
  const int64_t RC = int64_t(R) * C;
  const bool par = RC >= kParallelMin;
  const double b2 = beta2t;
  const double e1 = eps1;

  // Factored scratch (doubles): per-row sums of u^2 [R], then the column sums of each row block
  // [row_blocks x C]. Unfactored: per-block sums of u^2. Row factors rsqrt(vr / mean vr) [R] and
  // column factors rsqrt(vc) [C] in fp32 scratch. All reused from step to step; the scratch is
  // taken after sum_squares_no_sync, which uses it too.
  const int row_blocks = (R + kStatRows - 1) / kStatRows;
  const int64_t num_partial = factored ? R : (RC + kElemBlock - 1) / kElemBlock;
  float* const row_factor = factored ? row_scratch(size_t(R) + C) : nullptr;
  float* const col_factor = factored ? row_factor + R : nullptr;

  for (int k = 0; k < count; ++k) {
    float* P = p + k * RC;
    const float* G = g + k * RC;
    uint16_t* B = p_bf16 ? p_bf16 + k * RC : nullptr;
    // lr_k = lr * max(eps2, rms(P)) with the parameter scale (P before this step), else lr.
    float lr_k = lr;
    if (eps2 > 0.0f) {
      const double rms = std::sqrt(sum_squares_no_sync(P, RC) / double(RC));
      lr_k = static_cast<float>(double(lr) * std::max(double(eps2), rms));
    }
    double* const partial = scratch(size_t(num_partial) + (factored ? size_t(row_blocks) * C : 0));
    double* const col_partial = partial + num_partial;
    if (factored) {
      float* VR = vr + int64_t(k) * R;
      float* VC = vc + int64_t(k) * C;
      // One read of g for both statistics: a row's sum of g^2 + eps1 gives vr[i]; its terms
      // also go into its row block's column sums.
      //   vr[i] = b2 vr[i] + (1-b2) mean_j (g^2 + eps1)
#pragma omp parallel for schedule(static) if (par)
      for (int b = 0; b < row_blocks; ++b) {
        double* col = col_partial + int64_t(b) * C;
        std::fill(col, col + C, 0.0);
        for (int i = b * kStatRows; i < std::min(R, (b + 1) * kStatRows); ++i) {
          const double s = adafactor_row_statistics(G + int64_t(i) * C, C, e1, col);
          VR[i] = static_cast<float>(b2 * VR[i] + (1.0 - b2) * (s / C));
        }
      }
      //   vc[j] = b2 vc[j] + (1-b2) mean_i (g^2 + eps1), the row blocks' sums added in order.
      const int col_chunks = (C + kColChunk - 1) / kColChunk;
#pragma omp parallel for schedule(static) if (par)
      for (int c = 0; c < col_chunks; ++c) {
        const int j0 = c * kColChunk, j1 = std::min(C, j0 + kColChunk);
        adafactor_column_statistics(VC + j0, col_partial + j0, j1 - j0, row_blocks, C, b2, R);
      }
      double vr_sum = 0.0;
      for (int i = 0; i < R; ++i) vr_sum += VR[i];
      const double vr_mean = vr_sum / R;
      for (int i = 0; i < R; ++i) row_factor[i] = static_cast<float>(1.0 / std::sqrt(VR[i] / vr_mean));
      for (int j = 0; j < C; ++j) col_factor[j] = static_cast<float>(1.0 / std::sqrt(double(VC[j])));

      // rms(u) with u[i,j] = g[i,j] * row_factor[i] * col_factor[j], then the update.
#pragma omp parallel for schedule(static) if (par)
      for (int i = 0; i < R; ++i)
        partial[i] = adafactor_row_u_squares(G + int64_t(i) * C, row_factor[i], col_factor, C);
      const float inv_denom = clip_factor(partial, R, RC, clip);
#pragma omp parallel for schedule(static) if (par)
      for (int i = 0; i < R; ++i) {
        const int64_t o = int64_t(i) * C;
        adafactor_row_update(P + o, B ? B + o : nullptr, G + o, row_factor[i], col_factor, C, lr_k,
                             inv_denom, weight_decay);
      }
    } else {
      float* V = v + k * RC;
      const int64_t nblocks = num_partial;
      // v = b2 v + (1-b2)(g^2 + eps1); u = g / sqrt(v); per-block sums of u^2.
#pragma omp parallel for schedule(static) if (par)
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t e0 = b * kElemBlock, e_end = std::min(RC, e0 + kElemBlock);
        partial[b] = adafactor_block_second_moment(V + e0, G + e0, e_end - e0, beta2t, eps1);
      }
      const float inv_denom = clip_factor(partial, nblocks, RC, clip);
#pragma omp parallel for schedule(static) if (par)
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t e0 = b * kElemBlock, e_end = std::min(RC, e0 + kElemBlock);
        adafactor_block_update(P + e0, B ? B + e0 : nullptr, G + e0, V + e0, e_end - e0, lr_k,
                               inv_denom, weight_decay);
      }
    }
  }
}

}  // namespace switcht5
