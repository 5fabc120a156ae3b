// CpuBackend optimizer kernels: OpenMP over elements, rows or fixed column blocks. Elementwise
// arithmetic is float; every reduction is accumulated in double, each partial sum by one thread
// over a range fixed by the shapes (never by the thread count), and partials are combined in
// index order, so results are bitwise reproducible for any OMP_NUM_THREADS.
// Formulas: backend/backend.h; HF correspondence: reference/optim_reference.cpp.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/check.h"
#include "core/dtype.h"

namespace switcht5 {

namespace {
// Work below this many elements runs on the calling thread (fork/join would cost more).
constexpr int64_t kParallelMin = 16384;
// Column means are computed per block of this many columns by one thread, rows in order.
constexpr int kColBlock = 64;
// Unfactored: partial sums of u^2 per block of this many elements.
constexpr int64_t kElemBlock = 4096;

// Update clipping: 1 / max(1, rms(u) / clip), rms from the partial sums of u^2 (added in order)
// over the matrix's n elements.
float clip_factor(const double* partial, int64_t parts, int64_t n, float clip) {
  double ss = 0.0;
  for (int64_t i = 0; i < parts; ++i) ss += partial[i];
  return static_cast<float>(1.0 / std::max(1.0, std::sqrt(ss / double(n)) / double(clip)));
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
                                  float beta2t, float eps1, float clip, float weight_decay) {
  SWT_CHECK(count >= 1 && R >= 1 && C >= 1, "adafactor_update: bad shape count={} R={} C={}", count,
            R, C);
  SWT_CHECK(factored ? (vr && vc) : (v != nullptr), "adafactor_update: missing state");
  const int64_t RC = int64_t(R) * C;
  const bool par = RC >= kParallelMin;
  const double b2 = beta2t;
  const double e1 = eps1;

  // Factored scratch: row factors rsqrt(vr/mean vr) [R], column factors rsqrt(vc) [C], and
  // per-row sums of u^2 [R]. Unfactored: per-block sums of u^2. All from the reused scratch.
  const int64_t num_partial = factored ? R : (RC + kElemBlock - 1) / kElemBlock;
  double* const partial = scratch(size_t(num_partial) + (factored ? size_t(R) + C : 0));
  double* const row_factor = partial + num_partial;
  double* const col_factor = row_factor + R;

  for (int k = 0; k < count; ++k) {
    float* P = p + k * RC;
    const float* G = g + k * RC;
    if (factored) {
      float* VR = vr + int64_t(k) * R;
      float* VC = vc + int64_t(k) * C;
      // vr[i] = b2 vr[i] + (1-b2) mean_j (g^2 + eps1): one thread per row.
#pragma omp parallel for schedule(static) if (par)
      for (int i = 0; i < R; ++i) {
        const float* Gi = G + int64_t(i) * C;
        double s = 0.0;
        for (int j = 0; j < C; ++j) s += double(Gi[j]) * Gi[j] + e1;
        VR[i] = static_cast<float>(b2 * VR[i] + (1.0 - b2) * (s / C));
      }
      // vc[j] = b2 vc[j] + (1-b2) mean_i (g^2 + eps1): one thread per block of columns, rows in
      // order.
      const int nblocks = (C + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) if (par)
      for (int b = 0; b < nblocks; ++b) {
        const int j0 = b * kColBlock, j1 = std::min(C, j0 + kColBlock);
        double acc[kColBlock] = {};
        for (int i = 0; i < R; ++i) {
          const float* Gi = G + int64_t(i) * C;
          for (int j = j0; j < j1; ++j) acc[j - j0] += double(Gi[j]) * Gi[j] + e1;
        }
        for (int j = j0; j < j1; ++j)
          VC[j] = static_cast<float>(b2 * VC[j] + (1.0 - b2) * (acc[j - j0] / R));
      }
      double vr_sum = 0.0;
      for (int i = 0; i < R; ++i) vr_sum += VR[i];
      const double vr_mean = vr_sum / R;
      for (int i = 0; i < R; ++i)
        row_factor[i] = double(static_cast<float>(1.0 / std::sqrt(VR[i] / vr_mean)));
      for (int j = 0; j < C; ++j)
        col_factor[j] = double(static_cast<float>(1.0 / std::sqrt(double(VC[j]))));

        // rms(u) with u[i,j] = g[i,j] * row_factor[i] * col_factor[j]
#pragma omp parallel for schedule(static) if (par)
      for (int i = 0; i < R; ++i) {
        const float* Gi = G + int64_t(i) * C;
        const float rf = float(row_factor[i]);
        double s = 0.0;
        for (int j = 0; j < C; ++j) {
          const float u = Gi[j] * rf * float(col_factor[j]);
          s += double(u) * u;
        }
        partial[i] = s;
      }
      const float inv_denom = clip_factor(partial, R, RC, clip);
#pragma omp parallel for schedule(static) if (par)
      for (int i = 0; i < R; ++i) {
        const float* Gi = G + int64_t(i) * C;
        float* Pi = P + int64_t(i) * C;
        const float rf = float(row_factor[i]);
        for (int j = 0; j < C; ++j) {
          const float u = Gi[j] * rf * float(col_factor[j]);
          Pi[j] = Pi[j] - lr * (u * inv_denom + weight_decay * Pi[j]);
        }
        if (p_bf16) {
          uint16_t* Bi = p_bf16 + k * RC + int64_t(i) * C;
          for (int j = 0; j < C; ++j) Bi[j] = float_to_bf16(Pi[j]);
        }
      }
    } else {
      float* V = v + k * RC;
      const int64_t nblocks = num_partial;
      // v = b2 v + (1-b2)(g^2 + eps1); u = g / sqrt(v); per-block sums of u^2.
#pragma omp parallel for schedule(static) if (par)
      for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t e0 = b * kElemBlock, e_end = std::min(RC, e0 + kElemBlock);
        double s = 0.0;
        for (int64_t e = e0; e < e_end; ++e) {
          const float ve = beta2t * V[e] + (1.0f - beta2t) * (G[e] * G[e] + eps1);
          V[e] = ve;
          const float u = G[e] / std::sqrt(ve);
          s += double(u) * u;
        }
        partial[b] = s;
      }
      const float inv_denom = clip_factor(partial, nblocks, RC, clip);
#pragma omp parallel for schedule(static) if (par)
      for (int64_t e = 0; e < RC; ++e) {
        const float u = G[e] / std::sqrt(V[e]);
        P[e] = P[e] - lr * (u * inv_denom + weight_decay * P[e]);
        if (p_bf16) p_bf16[k * RC + e] = float_to_bf16(P[e]);
      }
    }
  }
}

}  // namespace switcht5
