// ReferenceBackend optimizer kernels: plain loops, arithmetic and sums in double, one rounding to
// float per stored value. Formulas: backend/backend.h (adamw_update, adafactor_update).
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/reference/reference_backend.h"
#include "core/check.h"
#include "core/dtype.h"

namespace switcht5 {

// AdamW as torch.optim.AdamW: the decay term uses p before this step, i.e.
//   p_new = p - lr * (m_hat / (sqrt(v_hat) + eps)) - lr * wd * p
void ReferenceBackend::adamw_update(float* p, uint16_t* p_bf16, const float* g, float* m, float* v,
                                    int64_t n, float lr, float beta1, float beta2, float eps,
                                    float weight_decay, float bc1, float bc2) {
  for (int64_t i = 0; i < n; ++i) {
    const double gi = g[i];
    const double mi = double(beta1) * m[i] + (1.0 - double(beta1)) * gi;
    const double vi = double(beta2) * v[i] + (1.0 - double(beta2)) * gi * gi;
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
    const double pi = p[i];
    const double update = (mi / bc1) / (std::sqrt(vi / bc2) + double(eps));
    p[i] = static_cast<float>(pi - double(lr) * (update + double(weight_decay) * pi));
    if (p_bf16) p_bf16[i] = float_to_bf16(p[i]);
  }
}

// Adafactor, following HF transformers' Adafactor.step (src/transformers/optimization.py) with
// beta1=None, relative_step=False, and scale_parameter = (eps2 > 0):
//   lr = lr * max(eps[1], _rms(p))      (_get_lr with scale_parameter; eps[1] is our eps2, the
//                                        RMS of p before this step, over the whole tensor)
//   update = grad**2 + eps[0]
//   exp_avg_sq_row = beta2t*row + (1-beta2t)*update.mean(dim=-1)
//   exp_avg_sq_col = beta2t*col + (1-beta2t)*update.mean(dim=-2)
//   _approx_sq_grad: rsqrt(row / row.mean(dim=-1)) outer rsqrt(col);   update = that * grad
//   (unfactored: exp_avg_sq = beta2t*v + (1-beta2t)*update;  update = rsqrt(exp_avg_sq) * grad)
//   update /= max(1, _rms(update) / clip_threshold)
//   p += -weight_decay*lr*p;  p += -lr*update
// The last line is p_new = p - lr*(u + wd*p) with the pre-update p. The update u is computed from
// the state as stored (float). Clipping is per [R,C] matrix; HF clips per tensor, which is the
// same thing because HF keeps each expert matrix as its own parameter.
void ReferenceBackend::adafactor_update(float* p, uint16_t* p_bf16, const float* g, float* vr,
                                        float* vc, float* v, bool factored, int count, int R, int C,
                                        float lr, float beta2t, float eps1, float clip,
                                        float weight_decay, float eps2) {
  SWT_CHECK(count >= 1 && R >= 1 && C >= 1, "adafactor_update: bad shape count={} R={} C={}", count,
            R, C);
  SWT_CHECK(factored ? (vr && vc) : (v != nullptr), "adafactor_update: missing state");
  SWT_CHECK(eps2 >= 0.0f, "adafactor_update: eps2 {} < 0", eps2);
  const int64_t RC = int64_t(R) * C;
  const double b2 = beta2t;
  std::vector<double> u(RC);  // [R,C] update of the current matrix
  for (int k = 0; k < count; ++k) {
    float* P = p + k * RC;
    const float* G = g + k * RC;
    double lr_k = lr;
    if (eps2 > 0.0f) {
      double pp = 0.0;
      for (int64_t e = 0; e < RC; ++e) pp += double(P[e]) * P[e];
      lr_k *= std::max(double(eps2), std::sqrt(pp / double(RC)));
    }
    if (factored) {
      float* VR = vr + int64_t(k) * R;  // [R]
      float* VC = vc + int64_t(k) * C;  // [C]
      for (int i = 0; i < R; ++i) {
        double s = 0.0;
        for (int j = 0; j < C; ++j)
          s += double(G[i * int64_t(C) + j]) * G[i * int64_t(C) + j] + eps1;
        VR[i] = static_cast<float>(b2 * VR[i] + (1.0 - b2) * (s / C));
      }
      for (int j = 0; j < C; ++j) {
        double s = 0.0;
        for (int i = 0; i < R; ++i)
          s += double(G[i * int64_t(C) + j]) * G[i * int64_t(C) + j] + eps1;
        VC[j] = static_cast<float>(b2 * VC[j] + (1.0 - b2) * (s / R));
      }
      double vr_sum = 0.0;
      for (int i = 0; i < R; ++i) vr_sum += VR[i];
      const double vr_mean = vr_sum / R;
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < C; ++j)
          u[i * int64_t(C) + j] = double(G[i * int64_t(C) + j]) /
                                  std::sqrt(double(VR[i]) / vr_mean) / std::sqrt(double(VC[j]));
    } else {
      float* V = v + k * RC;
      for (int64_t e = 0; e < RC; ++e) {
        V[e] = static_cast<float>(b2 * V[e] + (1.0 - b2) * (double(G[e]) * G[e] + eps1));
        u[e] = double(G[e]) / std::sqrt(double(V[e]));
      }
    }
    double ss = 0.0;
    for (int64_t e = 0; e < RC; ++e) ss += u[e] * u[e];
    const double denom = std::max(1.0, std::sqrt(ss / double(RC)) / double(clip));
    for (int64_t e = 0; e < RC; ++e) {
      const double pe = P[e];
      P[e] = static_cast<float>(pe - lr_k * (u[e] / denom + double(weight_decay) * pe));
      if (p_bf16) p_bf16[k * RC + e] = float_to_bf16(P[e]);
    }
  }
}

}  // namespace switcht5
