#include "backend/reference/reference_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "backend/router_confidence.h"
#include "core/check.h"
#include "core/rng.h"

namespace switcht5 {

namespace {

constexpr double kSqrt2OverPi = 0.7978845608028654;  // sqrt(2/pi)
constexpr double kGeluCubic = 0.044715;

double gelu_tanh(double a) {
  return 0.5 * a * (1.0 + std::tanh(kSqrt2OverPi * (a + kGeluCubic * a * a * a)));
}

// d/da gelu_tanh(a) = 0.5 (1 + tanh u) + 0.5 a (1 - tanh^2 u) du/da,
// u = sqrt(2/pi) (a + 0.044715 a^3),  du/da = sqrt(2/pi) (1 + 3 * 0.044715 a^2).
double gelu_tanh_grad(double a) {
  double th = std::tanh(kSqrt2OverPi * (a + kGeluCubic * a * a * a));
  double du = kSqrt2OverPi * (1.0 + 3.0 * kGeluCubic * a * a);
  return 0.5 * (1.0 + th) + 0.5 * a * (1.0 - th * th) * du;
}

// Softmax of row[0..n) in double; writes probabilities to out and returns logsumexp.
double softmax_row(const float* row, int n, std::vector<double>& out) {
  out.assign(n, 0.0);
  double mx = -std::numeric_limits<double>::infinity();
  for (int j = 0; j < n; ++j) mx = std::max(mx, double(row[j]));
  double z = 0.0;
  for (int j = 0; j < n; ++j) {
    out[j] = std::exp(double(row[j]) - mx);
    z += out[j];
  }
  for (int j = 0; j < n; ++j) out[j] /= z;
  return mx + std::log(z);
}

}  // namespace

// ---- memory -----------------------------------------------------------------------------------

void* ReferenceBackend::alloc_bytes(size_t bytes) {
  // std::aligned_alloc wants a size that is a multiple of the alignment.
  size_t rounded = std::max<size_t>(64, (bytes + 63) / 64 * 64);
  void* ptr = std::aligned_alloc(64, rounded);
  SWT_CHECK(ptr != nullptr, "out of host memory allocating {} bytes", bytes);
  std::memset(ptr, 0, rounded);
  return ptr;
}

void ReferenceBackend::free_bytes(void* ptr) { std::free(ptr); }

void ReferenceBackend::copy_to_host(void* dst, const void* src, size_t bytes) {
  count_host_sync();
  if (bytes > 0) std::memcpy(dst, src, bytes);
}

void ReferenceBackend::copy_to_device(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) std::memcpy(dst, src, bytes);
}

void ReferenceBackend::zero_bytes(void* x, size_t bytes) {
  if (bytes > 0) std::memset(x, 0, bytes);
}

void ReferenceBackend::copy(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) std::memmove(dst, src, bytes);
}

void ReferenceBackend::fill(float* x, float value, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = value;
}

// ---- GEMM -------------------------------------------------------------------------------------

void ReferenceBackend::gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                            const float* A, int lda, int64_t stride_a, const float* B, int ldb,
                            int64_t stride_b, float beta, float* C, int ldc, int64_t stride_c,
                            int batch) {
  SWT_CHECK(M >= 0 && N >= 0 && K >= 0 && batch >= 0, "gemm: negative size M={} N={} K={} batch={}",
            M, N, K, batch);
  SWT_CHECK(lda >= std::max(1, trans_a ? M : K), "gemm: lda={} too small", lda);
  SWT_CHECK(ldb >= std::max(1, trans_b ? K : N), "gemm: ldb={} too small", ldb);
  SWT_CHECK(ldc >= std::max(1, N), "gemm: ldc={} too small", ldc);
  for (int b = 0; b < batch; ++b) {
    const float* Ab = A + b * stride_a;
    const float* Bb = B + b * stride_b;
    float* Cb = C + b * stride_c;
    for (int m = 0; m < M; ++m) {
      for (int n = 0; n < N; ++n) {
        double acc = 0.0;
        for (int k = 0; k < K; ++k) {
          double a = trans_a ? Ab[int64_t(k) * lda + m] : Ab[int64_t(m) * lda + k];
          double bv = trans_b ? Bb[int64_t(n) * ldb + k] : Bb[int64_t(k) * ldb + n];
          acc += a * bv;
        }
        float& c = Cb[int64_t(m) * ldc + n];
        // beta == 0 must not read C (it may hold NaN from an uninitialised buffer).
        c = static_cast<float>(double(alpha) * acc + (beta == 0.0f ? 0.0 : double(beta) * c));
      }
    }
  }
}

namespace {
// Element i of a buffer of type t, as a double (fp32 and bf16 are exact in double).
double load(const void* p, DType t, int64_t i) {
  return t == DType::kBF16 ? double(bf16_to_float(static_cast<const uint16_t*>(p)[i]))
                           : double(static_cast<const float*>(p)[i]);
}
void store(void* p, DType t, int64_t i, float v) {
  if (t == DType::kBF16) static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
  else static_cast<float*>(p)[i] = v;
}
void check_float_type(DType t, const char* what) {
  SWT_CHECK(t == DType::kF32 || t == DType::kBF16, "{}: {} is not a floating-point type", what,
            dtype_name(t));
}
}  // namespace

// The oracle of mixed precision: the exact products summed in double, then C formed in double
// and rounded once to C's type (a backend summing in fp32 differs by fp32 rounding only).
void ReferenceBackend::gemm_ex(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                               const void* A, DType a_type, int lda, int64_t stride_a,
                               const void* B, DType b_type, int ldb, int64_t stride_b,
                               float beta, void* C, DType c_type, int ldc, int64_t stride_c,
                               int batch) {
  SWT_CHECK(M >= 0 && N >= 0 && K >= 0 && batch >= 0,
            "gemm_ex: negative size M={} N={} K={} batch={}", M, N, K, batch);
  SWT_CHECK(lda >= std::max(1, trans_a ? M : K), "gemm_ex: lda={} too small", lda);
  SWT_CHECK(ldb >= std::max(1, trans_b ? K : N), "gemm_ex: ldb={} too small", ldb);
  SWT_CHECK(ldc >= std::max(1, N), "gemm_ex: ldc={} too small", ldc);
  check_float_type(a_type, "gemm_ex A");
  check_float_type(b_type, "gemm_ex B");
  check_float_type(c_type, "gemm_ex C");
  for (int b = 0; b < batch; ++b) {
    const int64_t oa = b * stride_a, ob = b * stride_b, oc = b * stride_c;
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        double acc = 0.0;
        for (int k = 0; k < K; ++k) {
          const double a = load(A, a_type, oa + (trans_a ? int64_t(k) * lda + m : int64_t(m) * lda + k));
          const double bv = load(B, b_type, ob + (trans_b ? int64_t(n) * ldb + k : int64_t(k) * ldb + n));
          acc += a * bv;
        }
        const int64_t ic = oc + int64_t(m) * ldc + n;
        const double c = beta == 0.0f ? 0.0 : double(beta) * load(C, c_type, ic);
        store(C, c_type, ic, static_cast<float>(double(alpha) * acc + c));
      }
  }
}

void ReferenceBackend::cast(void* out, DType out_type, const void* in, DType in_type, int64_t n) {
  check_float_type(out_type, "cast output");
  check_float_type(in_type, "cast input");
  for (int64_t i = 0; i < n; ++i) store(out, out_type, i, static_cast<float>(load(in, in_type, i)));
}

void ReferenceBackend::round_to_bf16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = switcht5::round_to_bf16(x[i]);
}

// ---- elementwise and reductions -----------------------------------------------------------------

void ReferenceBackend::add(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void ReferenceBackend::axpy(float* y, float alpha, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(double(y[i]) + double(alpha) * x[i]);
}

void ReferenceBackend::scale(float* x, float alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
}

double ReferenceBackend::sum(const float* x, int64_t n) {
  count_host_sync();
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += x[i];
  return acc;
}

double ReferenceBackend::sum_squares(const float* x, int64_t n) {
  count_host_sync();
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) acc += double(x[i]) * x[i];
  return acc;
}

void ReferenceBackend::sum_over_batch(float* out, const float* in, int batch, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    double acc = out[i];
    for (int b = 0; b < batch; ++b) acc += in[b * n + i];
    out[i] = static_cast<float>(acc);
  }
}

int64_t ReferenceBackend::count_nonfinite(const float* x, int64_t n) {
  count_host_sync();
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += std::isfinite(x[i]) ? 0 : 1;
  return count;
}

// ---- statistics accumulated in backend memory ---------------------------------------------------

void ReferenceBackend::accumulate_sum_squares(double* acc, const float* x, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += double(x[i]) * x[i];
  acc[0] += s;
}

void ReferenceBackend::accumulate_loss_statistics(double* acc, const float* loss, const float* lse,
                                                  const int32_t* labels, int64_t N) {
  double loss_sum = 0.0, lse_sq = 0.0, valid = 0.0;
  for (int64_t r = 0; r < N; ++r) {
    loss_sum += loss[r];
    if (labels[r] >= 0) {
      lse_sq += double(lse[r]) * lse[r];
      valid += 1.0;
    }
  }
  acc[0] += loss_sum;
  acc[1] += lse_sq;
  acc[2] += valid;
}

void ReferenceBackend::accumulate_router_statistics(double* acc, const float* lb, const float* lse,
                                                    const float* counts, int G, int S, int E,
                                                    int C) {
  const int64_t T = int64_t(G) * S;
  double lb_sum = 0.0, z_sum = 0.0, dropped = 0.0;
  for (int g = 0; g < G; ++g) lb_sum += lb[g];
  for (int64_t t = 0; t < T; ++t) z_sum += double(lse[t]) * lse[t];
  for (int e = 0; e < E; ++e) {
    double routed = 0.0;
    for (int g = 0; g < G; ++g) {
      const double c = counts[int64_t(g) * E + e];
      routed += c;
      dropped += std::max(0.0, c - C);
    }
    acc[5 + e] += routed;
  }
  acc[0] += lb_sum / G;
  acc[1] += z_sum / double(T);
  acc[2] += 1.0;
  acc[3] += double(T);
  acc[4] += dropped;
}

void ReferenceBackend::accumulate_router_confidence(double* acc, const float* probs,
                                                    const float* logits, const float* lse,
                                                    int64_t T, int E) {
  double entropy = 0.0, top1 = 0.0, margin = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const TokenConfidence c = token_confidence(probs + t * E, logits + t * E, lse[t], E);
    entropy += c.entropy;
    top1 += c.top1;
    margin += c.margin;
  }
  if (T <= 0) return;
  acc[0] += entropy / double(T);
  acc[1] += top1 / double(T);
  acc[2] += margin / double(T);
}

// ---- layout -----------------------------------------------------------------------------------

void ReferenceBackend::permute_0213(float* out, const float* in, int A, int B, int C, int D) {
  for (int a = 0; a < A; ++a)
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < C; ++c)
        for (int d = 0; d < D; ++d)
          out[((int64_t(a) * C + c) * B + b) * D + d] = in[((int64_t(a) * B + b) * C + c) * D + d];
}

// ---- embedding --------------------------------------------------------------------------------

void ReferenceBackend::embedding_forward(float* out, const int32_t* ids, const float* table,
                                         int64_t n, int D) {
  for (int64_t t = 0; t < n; ++t) {
    SWT_CHECK(ids[t] >= 0, "embedding_forward: negative id {} at token {}", ids[t], t);
    for (int d = 0; d < D; ++d) out[t * D + d] = table[int64_t(ids[t]) * D + d];
  }
}

void ReferenceBackend::embedding_backward(float* dtable, const int32_t* ids, const float* dout,
                                          int64_t n, int D, int V) {
  // Visit tokens grouped by id, increasing t within an id (stable sort), summing each touched
  // row in double before rounding it once.
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return ids[x] < ids[y]; });
  std::vector<double> acc(D);
  for (int64_t start = 0; start < n;) {
    int32_t id = ids[order[start]];
    SWT_CHECK(id >= 0 && id < V, "embedding_backward: id {} out of range [0, {})", id, V);
    float* row = dtable + int64_t(id) * D;
    for (int d = 0; d < D; ++d) acc[d] = row[d];
    int64_t end = start;
    for (; end < n && ids[order[end]] == id; ++end)
      for (int d = 0; d < D; ++d) acc[d] += dout[order[end] * D + d];
    for (int d = 0; d < D; ++d) row[d] = static_cast<float>(acc[d]);
    start = end;
  }
}

// ---- T5 RMSNorm -------------------------------------------------------------------------------

void ReferenceBackend::rmsnorm_forward(float* out, float* rstd, const float* x, const float* w,
                                       int64_t N, int D, float eps) {
  for (int64_t r = 0; r < N; ++r) {
    const float* xr = x + r * D;
    double ss = 0.0;
    for (int j = 0; j < D; ++j) ss += double(xr[j]) * xr[j];
    double rs = 1.0 / std::sqrt(ss / D + double(eps));
    rstd[r] = static_cast<float>(rs);
    for (int j = 0; j < D; ++j) out[r * D + j] = static_cast<float>(double(xr[j]) * rs * w[j]);
  }
}

void ReferenceBackend::rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x,
                                        const float* w, const float* rstd, int64_t N, int D) {
  std::vector<double> dw_acc(D);
  for (int j = 0; j < D; ++j) dw_acc[j] = dw[j];
  for (int64_t r = 0; r < N; ++r) {
    const float* xr = x + r * D;
    const float* gr = dout + r * D;
    double rs = rstd[r];
    double dot = 0.0;  // sum_j dout*w*x
    for (int j = 0; j < D; ++j) dot += double(gr[j]) * w[j] * xr[j];
    double mean = dot / D;
    for (int j = 0; j < D; ++j) {
      dx[r * D + j] = static_cast<float>(rs * w[j] * gr[j] - double(xr[j]) * rs * rs * rs * mean);
      dw_acc[j] += double(gr[j]) * xr[j] * rs;
    }
  }
  for (int j = 0; j < D; ++j) dw[j] = static_cast<float>(dw_acc[j]);
}

// ---- attention --------------------------------------------------------------------------------

void ReferenceBackend::attention_softmax_forward(float* probs, const float* scores,
                                                 const float* bias, const float* key_mask, int B,
                                                 int H, int Tq, int Tk, bool causal) {
  std::vector<double> e(Tk);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      for (int i = 0; i < Tq; ++i) {
        int64_t row = ((int64_t(b) * H + h) * Tq + i) * Tk;
        auto allowed = [&](int j) {
          return (key_mask == nullptr || key_mask[int64_t(b) * Tk + j] != 0.0f) &&
                 (!causal || j <= i);
        };
        // Read the whole row before writing: probs may alias scores.
        double mx = -std::numeric_limits<double>::infinity();
        for (int j = 0; j < Tk; ++j) {
          e[j] =
              double(scores[row + j]) + (bias ? double(bias[(int64_t(h) * Tq + i) * Tk + j]) : 0.0);
          if (allowed(j)) mx = std::max(mx, e[j]);
        }
        double z = 0.0;
        for (int j = 0; j < Tk; ++j) {
          e[j] = allowed(j) ? std::exp(e[j] - mx) : 0.0;
          z += e[j];
        }
        for (int j = 0; j < Tk; ++j) probs[row + j] = z > 0.0 ? static_cast<float>(e[j] / z) : 0.0f;
      }
    }
  }
}

void ReferenceBackend::softmax_backward(float* dscores, const float* dprobs, const float* probs,
                                        int64_t rows, int Tk) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* dp = dprobs + r * Tk;
    const float* p = probs + r * Tk;
    double dot = 0.0;
    for (int j = 0; j < Tk; ++j) dot += double(dp[j]) * p[j];
    for (int j = 0; j < Tk; ++j)
      dscores[r * Tk + j] = static_cast<float>(double(p[j]) * (double(dp[j]) - dot));
  }
}

// The fused attention ops are the compositions backend.h states, op by op.
void ReferenceBackend::attention_softmax_dropout_forward(void* probs, DType probs_type,
                                                         float* dropped, const float* scores,
                                                         const float* bias, const float* key_mask,
                                                         int B, int H, int Tq, int Tk, bool causal,
                                                         float p, RandomKey key) {
  check_float_type(probs_type, "attention_softmax_dropout_forward probs");
  SWT_CHECK(dropped || p == 0.0f, "attention_softmax_dropout_forward: p={} needs `dropped`", p);
  const int64_t n = int64_t(B) * H * Tq * Tk;
  const bool bf16 = probs_type == DType::kBF16;
  std::vector<float> pr(size_t(std::max<int64_t>(n, 0)));  // dropped and probs may alias scores
  attention_softmax_forward(pr.data(), scores, bias, key_mask, B, H, Tq, Tk, causal);
  if (bf16) round_to_bf16(pr.data(), n);
  if (dropped) {
    dropout(dropped, pr.data(), n, p, key);
    if (bf16) round_to_bf16(dropped, n);
  }
  cast(probs, probs_type, pr.data(), DType::kF32, n);
}

void ReferenceBackend::attention_softmax_dropout_backward(float* dscores, float* dbias,
                                                          const float* dprobs, const float* probs,
                                                          int B, int H, int Tq, int Tk, float p,
                                                          RandomKey key, bool round_bf16) {
  const int64_t n = int64_t(B) * H * Tq * Tk;
  std::vector<float> d(size_t(std::max<int64_t>(n, 0)));
  dropout(d.data(), dprobs, n, p, key);
  softmax_backward(d.data(), d.data(), probs, int64_t(B) * H * Tq, Tk);
  if (dbias) sum_over_batch(dbias, d.data(), B, int64_t(H) * Tq * Tk);
  if (round_bf16) round_to_bf16(d.data(), n);
  copy(dscores, d.data(), sizeof(float) * size_t(std::max<int64_t>(n, 0)));
}

void ReferenceBackend::relpos_bias_forward(float* bias, const float* table, const int32_t* buckets,
                                           int H, int Tq, int Tk) {
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < Tq; ++i)
      for (int j = 0; j < Tk; ++j) {
        int32_t k = buckets[int64_t(i) * Tk + j];
        SWT_CHECK(k >= 0, "relpos_bias_forward: negative bucket {} at ({}, {})", k, i, j);
        bias[(int64_t(h) * Tq + i) * Tk + j] = table[int64_t(k) * H + h];
      }
}

void ReferenceBackend::relpos_bias_backward(float* dtable, const float* dbias,
                                            const int32_t* buckets, int H, int Tq, int Tk,
                                            int num_buckets) {
  std::vector<double> acc(dtable, dtable + int64_t(num_buckets) * H);  // [num_buckets, H]
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < Tq; ++i)
      for (int j = 0; j < Tk; ++j) {
        int32_t k = buckets[int64_t(i) * Tk + j];
        SWT_CHECK(k >= 0 && k < num_buckets, "relpos_bias_backward: bucket {} out of range [0, {})",
                  k, num_buckets);
        acc[int64_t(k) * H + h] += dbias[(int64_t(h) * Tq + i) * Tk + j];
      }
  for (size_t i = 0; i < acc.size(); ++i) dtable[i] = static_cast<float>(acc[i]);
}

// ---- activations ------------------------------------------------------------------------------

void ReferenceBackend::relu_forward(float* out, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

void ReferenceBackend::relu_backward(float* dx, const float* dout, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = x[i] > 0.0f ? dout[i] : 0.0f;
}

void ReferenceBackend::gated_gelu_forward(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(gelu_tanh(a[i]) * b[i]);
}

void ReferenceBackend::gated_gelu_backward(float* da, float* db, const float* dout, const float* a,
                                           const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    double g = dout[i];  // read before writing: da or db may alias dout
    da[i] = static_cast<float>(g * b[i] * gelu_tanh_grad(a[i]));
    db[i] = static_cast<float>(g * gelu_tanh(a[i]));
  }
}

// ---- randomness -------------------------------------------------------------------------------

void ReferenceBackend::dropout(float* out, const float* x, int64_t n, float p, RandomKey key) {
  SWT_CHECK(p >= 0.0f && p < 1.0f, "dropout: p={} outside [0, 1)", p);
  const uint64_t seed = key.host_seed();
  for (int64_t i = 0; i < n; ++i) {
    if (p == 0.0f) {
      out[i] = x[i];
    } else {
      bool keep = random16(seed, static_cast<uint64_t>(i)) >= dropout_threshold(p);
      out[i] = keep ? static_cast<float>(double(x[i]) / (1.0 - double(p))) : 0.0f;
    }
  }
}

void ReferenceBackend::uniform_jitter(float* out, const float* x, int64_t n, float eps,
                                      RandomKey key, uint64_t offset) {
  const uint64_t seed = key.host_seed();
  for (int64_t i = 0; i < n; ++i) {
    double u = uniform01(seed, offset + static_cast<uint64_t>(i));
    out[i] = static_cast<float>(double(x[i]) * (1.0 - double(eps) + 2.0 * double(eps) * u));
  }
}

// ---- loss -------------------------------------------------------------------------------------

void ReferenceBackend::cross_entropy_forward(float* loss, float* lse, const float* logits,
                                             const int32_t* labels, int64_t N, int V) {
  std::vector<double> p;
  for (int64_t r = 0; r < N; ++r) {
    const float* row = logits + r * V;
    double l = softmax_row(row, V, p);
    int32_t label = labels[r];
    SWT_CHECK(label == -100 || (label >= 0 && label < V),
              "cross_entropy_forward: label {} at row {} is neither -100 nor in [0, {})", label, r,
              V);
    lse[r] = static_cast<float>(l);
    loss[r] = label >= 0 ? static_cast<float>(l - double(row[label])) : 0.0f;
  }
}

void ReferenceBackend::cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                                              const int32_t* labels, int64_t N, int V, float scale,
                                              const float* scale_by, float z_coef) {
  if (scale_by) scale = scale * *scale_by;
  for (int64_t r = 0; r < N; ++r) {
    int32_t label = labels[r];
    SWT_CHECK(label == -100 || (label >= 0 && label < V),
              "cross_entropy_backward: label {} at row {} is neither -100 nor in [0, {})", label, r,
              V);
    double l = lse[r];
    for (int v = 0; v < V; ++v) {
      int64_t idx = r * V + v;
      if (label < 0) {
        dlogits[idx] = 0.0f;
        continue;
      }
      double softmax = std::exp(double(logits[idx]) - l);
      double onehot = v == label ? 1.0 : 0.0;
      dlogits[idx] =
          static_cast<float>(double(scale) * (softmax * (1.0 + 2.0 * double(z_coef) * l) - onehot));
    }
  }
}

// ---- Switch router and token dispatch -----------------------------------------------------------

void ReferenceBackend::router_forward(float* probs, float* lse, int32_t* expert, int32_t* slot,
                                      int32_t* rows, float* gate, float* counts,
                                      const float* logits, int G, int S, int E, int C) {
  std::vector<double> p;
  for (int g = 0; g < G; ++g) {
    float* counts_g = counts + int64_t(g) * E;
    for (int e = 0; e < E; ++e) counts_g[e] = 0.0f;
    for (int s = 0; s < S; ++s) {  // tokens in order: position = earlier same-expert tokens
      int64_t t = int64_t(g) * S + s;
      lse[t] = static_cast<float>(softmax_row(logits + t * E, E, p));
      for (int e = 0; e < E; ++e) probs[t * E + e] = static_cast<float>(p[e]);
      int best = 0;  // argmax over the stored float probs, lowest index on ties
      for (int e = 1; e < E; ++e)
        if (probs[t * E + e] > probs[t * E + best]) best = e;
      expert[t] = best;
      gate[t] = probs[t * E + best];
      int position = static_cast<int>(counts_g[best]);
      slot[t] = position < C ? position : -1;  // the row within the group's share, for now
      counts_g[best] += 1.0f;
    }
  }
  // Each expert's kept tokens, packed group after group: rows[e] runs over the groups as the
  // offset of group g's share.
  std::vector<int32_t> offset(size_t(G) * E);
  for (int e = 0; e < E; ++e) rows[e] = 0;
  for (int g = 0; g < G; ++g)
    for (int e = 0; e < E; ++e) {
      offset[size_t(g) * E + e] = rows[e];
      rows[e] += std::min(static_cast<int32_t>(counts[int64_t(g) * E + e]), int32_t(C));
    }
  for (int64_t t = 0; t < int64_t(G) * S; ++t)
    if (slot[t] >= 0) slot[t] += offset[size_t(t / S) * E + expert[t]];
}

void ReferenceBackend::router_balance_loss(float* lb, const float* probs, const float* counts,
                                           int G, int S, int E) {
  for (int g = 0; g < G; ++g) {
    double total = 0.0;
    for (int e = 0; e < E; ++e) {
      double prob_sum = 0.0;
      for (int s = 0; s < S; ++s) prob_sum += probs[(int64_t(g) * S + s) * E + e];
      double f = double(counts[int64_t(g) * E + e]) / S;
      double P = prob_sum / S;
      total += f * P;
    }
    lb[g] = static_cast<float>(E * total);
  }
}

void ReferenceBackend::router_backward(float* dlogits, const float* probs, const float* lse,
                                       const int32_t* expert, const float* dgate,
                                       const float* counts, int G, int S, int E, float lb_scale,
                                       float z_scale) {
  std::vector<double> dprobs(E);
  for (int g = 0; g < G; ++g) {
    for (int s = 0; s < S; ++s) {
      int64_t t = int64_t(g) * S + s;
      const float* p = probs + t * E;
      double dot = 0.0;
      for (int e = 0; e < E; ++e) {
        dprobs[e] = double(lb_scale) * E * double(counts[int64_t(g) * E + e]) / (double(S) * S) +
                    (e == expert[t] ? double(dgate[t]) : 0.0);
        dot += dprobs[e] * p[e];
      }
      for (int e = 0; e < E; ++e)
        dlogits[t * E + e] = static_cast<float>(double(p[e]) * (dprobs[e] - dot) +
                                                double(z_scale) * 2.0 * double(lse[t]) * p[e]);
    }
  }
}

void ReferenceBackend::moe_dispatch(float* buf, const float* x, const int32_t* expert,
                                    const int32_t* slot, int64_t T, int D, int E, int GC) {
  fill(buf, 0.0f, int64_t(E) * GC * D);
  for (int64_t t = 0; t < T; ++t) {
    if (slot[t] < 0) continue;
    SWT_CHECK(expert[t] >= 0 && expert[t] < E && slot[t] < GC,
              "moe_dispatch: token {} has expert {} slot {} outside [0,{}) x [0,{})", t, expert[t],
              slot[t], E, GC);
    float* row = buf + (int64_t(expert[t]) * GC + slot[t]) * D;
    for (int d = 0; d < D; ++d) row[d] = x[t * D + d];
  }
}

void ReferenceBackend::moe_dispatch_backward(float* dx, const float* dbuf, const int32_t* expert,
                                             const int32_t* slot, int64_t T, int D, int GC) {
  for (int64_t t = 0; t < T; ++t) {
    for (int d = 0; d < D; ++d)
      dx[t * D + d] = slot[t] < 0 ? 0.0f : dbuf[(int64_t(expert[t]) * GC + slot[t]) * D + d];
  }
}

void ReferenceBackend::moe_combine(float* out, const float* buf, const float* gate,
                                   const int32_t* expert, const int32_t* slot, int64_t T, int D,
                                   int GC) {
  for (int64_t t = 0; t < T; ++t) {
    for (int d = 0; d < D; ++d)
      out[t * D + d] =
          slot[t] < 0 ? 0.0f : gate[t] * buf[(int64_t(expert[t]) * GC + slot[t]) * D + d];
  }
}

void ReferenceBackend::moe_combine_backward(float* dbuf, float* dgate, const float* dout,
                                            const float* buf, const float* gate,
                                            const int32_t* expert, const int32_t* slot, int64_t T,
                                            int D, int E, int GC) {
  fill(dbuf, 0.0f, int64_t(E) * GC * D);
  for (int64_t t = 0; t < T; ++t) {
    if (slot[t] < 0) {
      dgate[t] = 0.0f;
      continue;
    }
    SWT_CHECK(expert[t] >= 0 && expert[t] < E && slot[t] < GC,
              "moe_combine_backward: token {} has expert {} slot {} outside [0,{}) x [0,{})", t,
              expert[t], slot[t], E, GC);
    int64_t row = (int64_t(expert[t]) * GC + slot[t]) * D;
    double dot = 0.0;
    for (int d = 0; d < D; ++d) {
      dbuf[row + d] = gate[t] * dout[t * D + d];
      dot += double(dout[t * D + d]) * buf[row + d];
    }
    dgate[t] = static_cast<float>(dot);
  }
}

}  // namespace switcht5
