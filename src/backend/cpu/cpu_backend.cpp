#include "backend/cpu/cpu_backend.h"

#include <omp.h>
#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "backend/cpu/cpu_kernels.h"
#include "backend/gemm_operands.h"
#include "backend/router_confidence.h"
#include "core/check.h"
#include "core/rng.h"

namespace switcht5 {

namespace {

// Loops shorter than this run on one thread: forking costs more than it saves. The result does
// not depend on it (every element is computed the same way either way).
constexpr int64_t kParallelMin = 1 << 14;

// sum / sum_squares add fixed blocks of this many elements in double, then the block sums in
// block order: the order depends on n only, not on the thread count.
constexpr int64_t kReduceBlock = 1 << 14;

// Column blocks for the column-parallel reductions (rmsnorm dw, embedding dtable): 16 floats,
// one cache line, so two threads never write the same line of an aligned row.
constexpr int kColumnBlock = 16;

constexpr float kSqrt2OverPi = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;

inline float gelu_tanh(float a) {
  return 0.5f * a * (1.0f + std::tanh(kSqrt2OverPi * (a + kGeluCubic * a * a * a)));
}

// d/da gelu_tanh(a) = 0.5 (1 + tanh u) + 0.5 a (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 a^2).
inline float gelu_tanh_grad(float a) {
  float th = std::tanh(kSqrt2OverPi * (a + kGeluCubic * a * a * a));
  float du = kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * a * a);
  return 0.5f * (1.0f + th) + 0.5f * a * (1.0f - th * th) * du;
}

// The sum of x[0..n) and of its squares, in double, in lane_sum's fixed order (one block, 32
// lanes).
SWT_CPU_CLONES double block_sum(const float* x, int64_t n) {
  return cpu::lane_sum<cpu::kWideSumLanes>(n, [x](int64_t i) { return double(x[i]); });
}
SWT_CPU_CLONES double block_sum_squares(const float* x, int64_t n) {
  return cpu::lane_sum<cpu::kWideSumLanes>(n, [x](int64_t i) { return double(x[i]) * x[i]; });
}

// Sum over i < n in double, blockwise (see kReduceBlock): block_sum(x + begin, length) of each
// block (block_sum or block_sum_squares), then the block sums in block order.
// `partial` holds at least ceil(n / kReduceBlock) doubles.
double blocked_sum(const float* x, int64_t n, double* partial,
                   double (*block_sum)(const float*, int64_t)) {
  const int64_t num_blocks = (n + kReduceBlock - 1) / kReduceBlock;
#pragma omp parallel for schedule(static) if (num_blocks > 1)
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    const int64_t begin = blk * kReduceBlock, end = std::min(n, begin + kReduceBlock);
    partial[blk] = block_sum(x + begin, end - begin);
  }
  double total = 0.0;
  for (int64_t blk = 0; blk < num_blocks; ++blk) total += partial[blk];
  return total;
}

// The sum of c[m*ldc + n]^2 over m < M, n < N in double, on this thread: contiguous rows (ldc ==
// N) in blocked_sum's order (blocks of kReduceBlock, then the block sums in order), else row by
// row, each row so. Equal to sum_squares_no_sync over the same contiguous floats.
SWT_CPU_CLONES double matrix_sum_squares(const float* c, int M, int N, int ldc) {
  auto contiguous = [](const float* x, int64_t n) {
    double total = 0.0;
    for (int64_t begin = 0; begin < n; begin += kReduceBlock)
      total += block_sum_squares(x + begin, std::min(kReduceBlock, n - begin));
    return total;
  };
  if (ldc == N) return contiguous(c, int64_t(M) * N);
  double total = 0.0;
  for (int m = 0; m < M; ++m) total += contiguous(c + int64_t(m) * ldc, N);
  return total;
}

// ---- attention rows ---------------------------------------------------------------------------------
// The max of a row (16 lanes, so that it vectorizes: a max is exact in any order).
SWT_CPU_CLONES float row_max(const float* x, int n) {
  constexpr int kLanes = 16;
  float m[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = -std::numeric_limits<float>::infinity();
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) m[l] = std::max(m[l], x[i + l]);
  for (int l = 0; i < n; ++i, ++l) m[l] = std::max(m[l], x[i]);
  float mx = m[0];
  for (int l = 1; l < kLanes; ++l) mx = std::max(mx, m[l]);
  return mx;
}

// One row of attention_softmax_forward: p[j] = softmax over allowed j of s[j] + bi[j], allowed:
// j < jmax and (km null or km[j] != 0). The logits t[j] = s[j] + bi[j] in fp32 go into p with
// -inf where not allowed, so that every pass is a plain loop that vectorizes (the max too:
// row_max's lanes; a max is exact in any order). Then e[j] = exp_f32(t[j] - max) (0 where -inf),
// the normaliser in double (lane_sum), p[j] = e[j] * float(1/z). A row with nothing allowed is
// all zeros. p may alias s: each pass reads index j before writing it. Not inline: a clone per
// vector width (its callers are not cloned).
SWT_CPU_CLONES void softmax_row(float* p, const float* s, const float* bi, const float* km,
                                int jmax, int Tk) {
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  if (bi)
    for (int j = 0; j < Tk; ++j) p[j] = s[j] + bi[j];
  else if (p != s)
    for (int j = 0; j < Tk; ++j) p[j] = s[j];
  for (int j = jmax; j < Tk; ++j) p[j] = kMasked;
  if (km)
    for (int j = 0; j < jmax; ++j) p[j] = km[j] != 0.0f ? p[j] : kMasked;
  const float mx = row_max(p, Tk);
  if (mx == kMasked) {  // nothing allowed (a fully masked row): exp(-inf - -inf) would be NaN
    for (int j = 0; j < Tk; ++j) p[j] = 0.0f;
    return;
  }
  for (int j = 0; j < Tk; ++j) p[j] = cpu::exp_f32(p[j] - mx);  // exp_f32(-inf) = +0
  const double z = cpu::lane_sum(Tk, [&](int64_t j) { return double(p[j]); });
  const float inv_z = z > 0.0 ? static_cast<float>(1.0 / z) : 0.0f;
  for (int j = 0; j < Tk; ++j) p[j] *= inv_z;
}

// Cross-entropy rows (their max: row_max above): sum_v e^(x[v] - mx) in double, and
// d[v] = factor * e^(x[v] - l).
SWT_CPU_CLONES double sum_exp(const float* x, int n, float mx) {
  return cpu::lane_sum(n, [&](int64_t v) { return double(cpu::exp_f32(x[v] - mx)); });
}

SWT_CPU_CLONES void scaled_exp(float* d, const float* x, int n, float l, float factor) {
  for (int v = 0; v < n; ++v) d[v] = factor * cpu::exp_f32(x[v] - l);
}

// One row of softmax_backward: ds[j] = p[j] * (dp[j] - float(sum_j double(dp[j]) * p[j])), the
// sum in lane_sum's fixed order (a single running sum was a chain of dependent adds: the fused
// attention backward's largest own cost). ds may alias dp.
SWT_CPU_CLONES void softmax_backward_row(float* ds, const float* dp, const float* p, int Tk) {
  const float dotf = static_cast<float>(
      cpu::lane_sum(Tk, [&](int64_t j) { return double(dp[j]) * double(p[j]); }));
  for (int j = 0; j < Tk; ++j) ds[j] = p[j] * (dp[j] - dotf);
}

// acc[j] += x[j] in double (the attention bias gradient's sum over the batch, row by row).
SWT_CPU_CLONES void accumulate_row(double* acc, const float* x, int n) {
  for (int j = 0; j < n; ++j) acc[j] += double(x[j]);
}

SWT_CPU_CLONES void round_row_to_bf16(float* x, int n) {
  for (int j = 0; j < n; ++j) x[j] = switcht5::round_to_bf16(x[j]);
}

}  // namespace

// ---- memory -----------------------------------------------------------------------------------

void* CpuBackend::alloc_bytes(size_t bytes) {
  size_t rounded = std::max<size_t>(64, (bytes + 63) / 64 * 64);  // aligned_alloc wants a multiple
  void* ptr = std::aligned_alloc(64, rounded);
  SWT_CHECK(ptr != nullptr, "out of host memory allocating {} bytes", bytes);
  std::memset(ptr, 0, rounded);
  live_.emplace(ptr, rounded);
  in_use_ += rounded;
  peak_ = std::max(peak_, in_use_);
  return ptr;
}

void CpuBackend::free_bytes(void* ptr) {
  if (!ptr) return;
  const auto it = live_.find(ptr);
  SWT_CHECK(it != live_.end(), "CpuBackend::free_bytes({}): not a live block of this backend "
            "(freed twice, or memory of another backend)", ptr);
  in_use_ -= it->second;
  live_.erase(it);
  std::free(ptr);
}

Backend::MemoryCounts CpuBackend::memory_counts() const {
  return {.counted = true, .block_bytes = 64, .in_use = int64_t(in_use_),
          .live_blocks = int64_t(live_.size()), .peak = int64_t(peak_),
          .held_peak = int64_t(peak_), .transient_peak = 0};
}

void CpuBackend::copy_to_host(void* dst, const void* src, size_t bytes) {
  count_host_sync();
  if (bytes > 0) std::memcpy(dst, src, bytes);
}

void CpuBackend::copy_to_device(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) std::memcpy(dst, src, bytes);
}

void CpuBackend::zero_bytes(void* x, size_t bytes) {
  if (bytes > 0) std::memset(x, 0, bytes);
}

void CpuBackend::copy(void* dst, const void* src, size_t bytes) {
  if (bytes > 0) std::memmove(dst, src, bytes);
}

void CpuBackend::fill(float* x, float value, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) x[i] = value;
}

// ---- GEMM -------------------------------------------------------------------------------------

void CpuBackend::gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A,
                      int lda, int64_t stride_a, const float* B, int ldb, int64_t stride_b,
                      float beta, float* C, int ldc, int64_t stride_c, int batch) {
  sgemm_batch(trans_a, trans_b, M, N, K, alpha, A, lda, stride_a, B, ldb, stride_b, beta, C, ldc,
              stride_c, batch, nullptr, nullptr);
}

namespace {
// C's rows [m0, m1) of an M x N block (leading dimension ldc) = beta * C; beta == 0 writes 0
// (C's contents ignored, as gemm's contract says), beta == 1 leaves them.
void scale_rows(float* C, int m0, int m1, int N, int ldc, float beta) {
  if (beta == 1.0f) return;
  for (int m = m0; m < m1; ++m) {
    float* c = C + int64_t(m) * ldc;
    for (int n = 0; n < N; ++n) c[n] = beta == 0.0f ? 0.0f : beta * c[n];
  }
}
}  // namespace

void CpuBackend::sgemm_batch(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                             const float* A, int lda, int64_t stride_a, const float* B, int ldb,
                             int64_t stride_b, float beta, float* C, int ldc, int64_t stride_c,
                             int batch, double* squares, const int32_t* a_rows) {
  if (squares)
    for (int b = 0; b < batch; ++b) squares[b] = 0.0;
  SWT_CHECK(M >= 0 && N >= 0 && K >= 0 && batch >= 0, "gemm: negative size M={} N={} K={} batch={}",
            M, N, K, batch);
  if (M == 0 || N == 0 || batch == 0) return;
  // Entry b's product: A_b's first `live` rows as stored, the rest zero (gemm_ex_rows), so
  // M_b x N x K_b with M_b = live (not trans_a; C's later rows are beta * C) or K_b = live
  // (trans_a: the zero rows add nothing to the sum over K).
  // The counts are checked here, before any parallel region (an exception must not leave one).
  const int full = trans_a ? K : M;
  auto shape = [&](int b) {  // {M_b, K_b}
    const int rows = a_rows ? int(a_rows[b]) : full;
    return trans_a ? std::pair{M, rows} : std::pair{rows, K};
  };
  int64_t products = 0;  // sum over entries of M_b * K_b
  for (int b = 0; b < batch; ++b) {
    SWT_CHECK(!a_rows || (a_rows[b] >= 0 && a_rows[b] <= full),
              "gemm_ex_rows: a_rows[{}] = {} outside [0, {}]", b, a_rows[b], full);
    const auto [Mb, Kb] = shape(b);
    products += int64_t(Mb) * Kb;
  }
  const char ta = trans_a ? 'T' : 'N';
  const char tb = trans_b ? 'T' : 'N';
  const auto t0 = gemm_profile_ ? std::chrono::steady_clock::now()
                                : std::chrono::steady_clock::time_point{};
  auto one = [&](int b) {
    const auto [Mb, Kb] = shape(b);
    float* c = C + b * stride_c;
    // K_b == 0: C = beta * C (oneDNN leaves C untouched when K == 0).
    dnnl_status_t st = dnnl_success;
    if (Mb > 0 && Kb > 0)
      st = dnnl_sgemm(ta, tb, Mb, N, Kb, alpha, A + b * stride_a, lda, B + b * stride_b, ldb,
                      beta, c, ldc);
    scale_rows(c, Kb > 0 ? Mb : 0, M, N, ldc, beta);
    return st;
  };
  // With at least one batch entry per thread, the threads split the batch and each runs whole
  // sgemms (nested OpenMP regions are inactive by default, so each sgemm stays on its thread);
  // otherwise oneDNN threads each product itself. Measured on 16 Xeon cores, GFLOP/s
  // batch-parallel vs oneDNN-threaded: attention 128x128x64 x256: 1166 vs 186, 512x512x64 x64:
  // 1090 vs 847; experts 512x4096x1024 x16: 1243 vs 453, x24: 970 vs 477; but with fewer
  // entries than threads, 512x512x64 x8: 596 vs 926. Entries of different sizes (a_rows) are
  // handed out one at a time, so a thread with small ones takes more.
  // Squares (gemm_ex_sum_squares): the thread that computed C_b sums its squares next, while
  // C_b is still in its cache (an expert's weight gradient, 1 MB on bench-small, fits a core's
  // L2); the order depends on the shapes only, so either branch gives the same sums.
  if (batch > 1 && batch >= omp_get_max_threads()) {
    int failures = 0;
    auto entry = [&](int b) {
      const int failed = one(b) == dnnl_success ? 0 : 1;
      if (squares) squares[b] = matrix_sum_squares(C + b * stride_c, M, N, ldc);
      return failed;
    };
    if (a_rows) {
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : failures)
      for (int b = 0; b < batch; ++b) failures += entry(b);
    } else {
#pragma omp parallel for schedule(static) reduction(+ : failures)
      for (int b = 0; b < batch; ++b) failures += entry(b);
    }
    SWT_CHECK(failures == 0,
              "dnnl_sgemm failed for {} of {} batch entries (M={} N={} K={} lda={} ldb={} ldc={})",
              failures, batch, M, N, K, lda, ldb, ldc);
  } else {
    for (int b = 0; b < batch; ++b) {
      dnnl_status_t st = one(b);
      SWT_CHECK(st == dnnl_success,
                "dnnl_sgemm failed with status {} (trans {}{} M={} N={} K={} lda={} ldb={} ldc={})",
                int(st), ta, tb, M, N, K, lda, ldb, ldc);
      if (!squares) continue;
      // oneDNN threaded this product: the threads share the sum too (same order).
      squares[b] = ldc == N ? sum_squares_no_sync(C + b * stride_c, int64_t(M) * N)
                            : matrix_sum_squares(C + b * stride_c, M, N, ldc);
    }
  }
  const double flops = 2.0 * double(products) * N;
  gemm_flops_ += flops;
  if (gemm_profile_) {
    GemmTime& t = (*gemm_profile_)[GemmShape{trans_a, trans_b, M, N, K, batch}];
    t.calls += 1;
    t.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    t.flops += flops;
  }
}

void CpuBackend::gemm_ex(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                         const void* A, DType a_type, int lda, int64_t stride_a, const void* B,
                         DType b_type, int ldb, int64_t stride_b, float beta, void* C,
                         DType c_type, int ldc, int64_t stride_c, int batch) {
  gemm_ex_rows(trans_a, trans_b, M, N, K, alpha, A, a_type, lda, stride_a, B, b_type, ldb,
               stride_b, beta, C, c_type, ldc, stride_c, batch, nullptr, nullptr);
}

void CpuBackend::gemm_ex_sum_squares(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                                     const void* A, DType a_type, int lda, int64_t stride_a,
                                     const void* B, DType b_type, int ldb, int64_t stride_b,
                                     float beta, float* C, int ldc, int64_t stride_c, int batch,
                                     double* acc) {
  gemm_ex_rows(trans_a, trans_b, M, N, K, alpha, A, a_type, lda, stride_a, B, b_type, ldb,
               stride_b, beta, C, DType::kF32, ldc, stride_c, batch, nullptr, acc);
}

// bf16 storage emulation: bf16 operands are widened (exactly) to fp32 copies and the fp32 GEMM
// runs on them, which sums the exact products in fp32 as a GPU's bf16 GEMM does; a bf16 C is
// formed in fp32 and rounded once. The copies live in buffers grown once and reused.
void CpuBackend::gemm_ex_rows(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                              const void* A, DType a_type, int lda, int64_t stride_a,
                              const void* B, DType b_type, int ldb, int64_t stride_b, float beta,
                              void* C, DType c_type, int ldc, int64_t stride_c, int batch,
                              const int32_t* a_rows, double* squares) {
  check_gemm_ex_types(a_type, b_type, c_type);
  SWT_CHECK(!squares || c_type == DType::kF32, "gemm_ex_rows: squares of a {} C",
            dtype_name(c_type));
  const float* a = widened(wide_a_, A, a_type,
                           gemm_extent(batch, stride_a, trans_a ? K : M, lda, trans_a ? M : K));
  const float* b = widened(wide_b_, B, b_type,
                           gemm_extent(batch, stride_b, trans_b ? N : K, ldb, trans_b ? K : N));
  if (c_type == DType::kF32) {
    float* c = static_cast<float*>(C);
    if (!squares) {
      sgemm_batch(trans_a, trans_b, M, N, K, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c,
                  ldc, stride_c, batch, nullptr, a_rows);
      return;
    }
    if (batch <= 0) return;
    if (gemm_squares_.size() < size_t(batch)) gemm_squares_.resize(size_t(batch));
    sgemm_batch(trans_a, trans_b, M, N, K, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c,
                ldc, stride_c, batch, gemm_squares_.data(), a_rows);
    for (int i = 0; i < batch; ++i) squares[0] += gemm_squares_[size_t(i)];  // entry by entry
    return;
  }
  const int64_t nc = gemm_extent(batch, stride_c, M, ldc, N);
  if (int64_t(wide_c_.size()) < nc) wide_c_.resize(size_t(nc));
  if (beta != 0.0f) cast(wide_c_.data(), DType::kF32, C, DType::kBF16, nc);
  sgemm_batch(trans_a, trans_b, M, N, K, alpha, a, lda, stride_a, b, ldb, stride_b, beta,
              wide_c_.data(), ldc, stride_c, batch, nullptr, a_rows);
  uint16_t* c = static_cast<uint16_t*>(C);
  for (int bi = 0; bi < batch; ++bi)
#pragma omp parallel for schedule(static) if (int64_t(M) * N >= kParallelMin)
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        const int64_t i = bi * stride_c + int64_t(m) * ldc + n;
        c[i] = float_to_bf16(wide_c_[size_t(i)]);
      }
}

const float* CpuBackend::widened(std::vector<float>& buf, const void* p, DType t, int64_t n) {
  if (t == DType::kF32) return static_cast<const float*>(p);
  if (int64_t(buf.size()) < n) buf.resize(size_t(n));
  cast(buf.data(), DType::kF32, p, t, n);
  return buf.data();
}

void CpuBackend::cast(void* out, DType out_type, const void* in, DType in_type, int64_t n) {
  check_float_type(out_type, "cast output");
  check_float_type(in_type, "cast input");
  if (out_type == in_type) {
    copy(out, in, dtype_size(in_type) * size_t(n));
  } else if (out_type == DType::kBF16) {
    const float* x = static_cast<const float*>(in);
    uint16_t* y = static_cast<uint16_t*>(out);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) y[i] = float_to_bf16(x[i]);
  } else {
    const uint16_t* x = static_cast<const uint16_t*>(in);
    float* y = static_cast<float*>(out);
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_float(x[i]);
  }
}

void CpuBackend::round_to_bf16(float* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) x[i] = switcht5::round_to_bf16(x[i]);
}

// ---- elementwise and reductions -----------------------------------------------------------------

void CpuBackend::add(float* out, const float* a, const float* b, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

void CpuBackend::axpy(float* y, float alpha, const float* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void CpuBackend::scale(float* x, float alpha, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
}

double CpuBackend::sum(const float* x, int64_t n) {
  count_host_sync();
  return blocked_sum(x, n, scratch(size_t((n + kReduceBlock - 1) / kReduceBlock)), block_sum);
}

double CpuBackend::sum_squares(const float* x, int64_t n) {
  count_host_sync();
  return sum_squares_no_sync(x, n);
}

double CpuBackend::sum_squares_no_sync(const float* x, int64_t n) {
  return blocked_sum(x, n, scratch(size_t((n + kReduceBlock - 1) / kReduceBlock)),
                     block_sum_squares);
}

void CpuBackend::sum_over_batch(float* out, const float* in, int batch, int64_t n) {
#pragma omp parallel for schedule(static) if (n * batch >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) {
    double acc = out[i];
    for (int b = 0; b < batch; ++b) acc += in[b * n + i];
    out[i] = static_cast<float>(acc);
  }
}

int64_t CpuBackend::count_nonfinite(const float* x, int64_t n) {
  count_host_sync();
  int64_t count = 0;
#pragma omp parallel for schedule(static) reduction(+ : count) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) count += std::isfinite(x[i]) ? 0 : 1;
  return count;
}

// ---- statistics accumulated in backend memory ---------------------------------------------------
// The sums use the blocked order of sum / sum_squares, so a statistic read back here equals the
// one those ops return.

void CpuBackend::accumulate_sum_squares(double* acc, const float* x, int64_t n) {
  acc[0] += sum_squares_no_sync(x, n);
}

void CpuBackend::accumulate_loss_statistics(double* acc, const float* loss, const float* lse,
                                            const int32_t* labels, int64_t N) {
  const double loss_sum =
      blocked_sum(loss, N, scratch(size_t((N + kReduceBlock - 1) / kReduceBlock)), block_sum);
  double lse_sq = 0.0, valid = 0.0;  // rows in order (N is a micro-batch's target tokens)
  for (int64_t r = 0; r < N; ++r)
    if (labels[r] >= 0) {
      lse_sq += double(lse[r]) * lse[r];
      valid += 1.0;
    }
  acc[0] += loss_sum;
  acc[1] += lse_sq;
  acc[2] += valid;
}

void CpuBackend::accumulate_router_confidence(double* acc, const float* probs,
                                              const float* logits, const float* lse, int64_t T,
                                              int E) {
  if (T <= 0) return;
  // Blocks of kTokens tokens, each summed in token order, then the blocks in order: the same
  // result for any thread count (the reference's one serial sum differs by double rounding).
  constexpr int64_t kTokens = 256;
  const int64_t blocks = (T + kTokens - 1) / kTokens;
  double* partial = scratch(size_t(3 * blocks));
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    double entropy = 0.0, top1 = 0.0, margin = 0.0;
    for (int64_t t = b * kTokens; t < std::min(T, (b + 1) * kTokens); ++t) {
      const TokenConfidence c = token_confidence(probs + t * E, logits + t * E, lse[t], E);
      entropy += c.entropy;
      top1 += c.top1;
      margin += c.margin;
    }
    partial[3 * b] = entropy;
    partial[3 * b + 1] = top1;
    partial[3 * b + 2] = margin;
  }
  double total[3] = {0.0, 0.0, 0.0};
  for (int64_t b = 0; b < blocks; ++b)
    for (int k = 0; k < 3; ++k) total[k] += partial[3 * b + k];
  for (int k = 0; k < 3; ++k) acc[k] += total[k] / double(T);
}

void CpuBackend::accumulate_router_statistics(double* acc, const float* lb, const float* lse,
                                              const float* counts, int G, int S, int E, int C) {
  const int64_t T = int64_t(G) * S;
  const double lb_sum =
      blocked_sum(lb, G, scratch(size_t((G + kReduceBlock - 1) / kReduceBlock)), block_sum);
  const double z_sum = sum_squares_no_sync(lse, T);
  double dropped = 0.0;
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

// ---- layout -----------------------------------------------------------------------------------

void CpuBackend::permute_0213(float* out, const float* in, int A, int B, int C, int D) {
  // One output row block out[a,c,:,:] per iteration.
#pragma omp parallel for collapse(2) schedule(static) if (int64_t(A) * B * C * D >= kParallelMin)
  for (int a = 0; a < A; ++a)
    for (int c = 0; c < C; ++c)
      for (int b = 0; b < B; ++b)
        std::memcpy(out + ((int64_t(a) * C + c) * B + b) * D,
                    in + ((int64_t(a) * B + b) * C + c) * D, sizeof(float) * D);
}

// ---- embedding --------------------------------------------------------------------------------

void CpuBackend::embedding_forward(float* out, const int32_t* ids, const float* table, int64_t n,
                                   int D) {
#pragma omp parallel for schedule(static) if (n * D >= kParallelMin)
  for (int64_t t = 0; t < n; ++t)
    std::memcpy(out + t * D, table + int64_t(ids[t]) * D, sizeof(float) * D);
}

void CpuBackend::embedding_backward(float* dtable, const int32_t* ids, const float* dout, int64_t n,
                                    int D, int V) {
  // Parallel over column blocks; each thread walks all tokens in increasing t, so every
  // dtable element receives its additions in token order whatever the thread count.
  const int num_blocks = (D + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static) if (n * D >= kParallelMin)
  for (int blk = 0; blk < num_blocks; ++blk) {
    const int j0 = blk * kColumnBlock, j1 = std::min(D, j0 + kColumnBlock);
    for (int64_t t = 0; t < n; ++t) {
      float* row = dtable + int64_t(ids[t]) * D;
      const float* g = dout + t * D;
      for (int j = j0; j < j1; ++j) row[j] += g[j];
    }
  }
}

// ---- T5 RMSNorm -------------------------------------------------------------------------------

void CpuBackend::rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N,
                                 int D, float eps) {
#pragma omp parallel for schedule(static) if (N * D >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const float* xr = x + r * D;
    double ss = 0.0;
    for (int j = 0; j < D; ++j) ss += double(xr[j]) * xr[j];
    const float rs = static_cast<float>(1.0 / std::sqrt(ss / D + double(eps)));
    rstd[r] = rs;
    float* o = out + r * D;
    for (int j = 0; j < D; ++j) o[j] = xr[j] * rs * w[j];
  }
}

void CpuBackend::rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x,
                                  const float* w, const float* rstd, int64_t N, int D) {
  // dx: one row per iteration.
#pragma omp parallel for schedule(static) if (N * D >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const float* xr = x + r * D;
    const float* gr = dout + r * D;
    const float rs = rstd[r];
    double dot = 0.0;  // sum_j dout*w*x
    for (int j = 0; j < D; ++j) dot += double(gr[j]) * w[j] * xr[j];
    const float c = static_cast<float>(dot / D) * rs * rs * rs;
    float* d = dx + r * D;
    for (int j = 0; j < D; ++j) d[j] = rs * w[j] * gr[j] - xr[j] * c;
  }
  // dw: one column block per iteration, rows summed in order.
  const int num_blocks = (D + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static) if (N * D >= kParallelMin)
  for (int blk = 0; blk < num_blocks; ++blk) {
    const int j0 = blk * kColumnBlock, j1 = std::min(D, j0 + kColumnBlock);
    double acc[kColumnBlock] = {};
    for (int64_t r = 0; r < N; ++r) {
      const float rs = rstd[r];
      for (int j = j0; j < j1; ++j) acc[j - j0] += double(dout[r * D + j] * x[r * D + j] * rs);
    }
    for (int j = j0; j < j1; ++j) dw[j] = static_cast<float>(dw[j] + acc[j - j0]);
  }
}

// ---- attention --------------------------------------------------------------------------------

void CpuBackend::attention_softmax_forward(float* probs, const float* scores, const float* bias,
                                           const float* key_mask, int B, int H, int Tq, int Tk,
                                           bool causal) {
  const int64_t rows = int64_t(B) * H * Tq;
#pragma omp parallel for schedule(static) if (rows * Tk >= kParallelMin)
  for (int64_t row = 0; row < rows; ++row) {
    const int i = static_cast<int>(row % Tq);
    const int h = static_cast<int>((row / Tq) % H);
    const int b = static_cast<int>(row / (int64_t(Tq) * H));
    const float* bi = bias ? bias + (int64_t(h) * Tq + i) * Tk : nullptr;
    const float* km = key_mask ? key_mask + int64_t(b) * Tk : nullptr;
    const int jmax = causal ? std::min(Tk, i + 1) : Tk;  // allowed keys lie in [0, jmax)
    softmax_row(probs + row * Tk, scores + row * Tk, bi, km, jmax, Tk);
  }
}

void CpuBackend::softmax_backward(float* dscores, const float* dprobs, const float* probs,
                                  int64_t rows, int Tk) {
#pragma omp parallel for schedule(static) if (rows * Tk >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r)
    softmax_backward_row(dscores + r * Tk, dprobs + r * Tk, probs + r * Tk, Tk);
}

// One pass per row: the row's softmax is computed where it is kept in fp32 (probs itself, else
// dropped, else this thread's scratch row), then stored, dropped out and rounded while it is in
// cache. Each op of the composition in backend.h is the same arithmetic on the same values, so
// the result is bitwise that composition's on this backend.
void CpuBackend::attention_softmax_dropout_forward(void* probs, DType probs_type, float* dropped,
                                                   const float* scores, const float* bias,
                                                   const float* key_mask, int B, int H, int Tq,
                                                   int Tk, bool causal, float p, RandomKey key) {
  check_float_type(probs_type, "attention_softmax_dropout_forward probs");
  SWT_CHECK(p >= 0.0f && p < 1.0f, "attention_softmax_dropout_forward: p={} outside [0, 1)", p);
  SWT_CHECK(dropped || p == 0.0f, "attention_softmax_dropout_forward: p={} needs `dropped`", p);
  const bool bf16 = probs_type == DType::kBF16;
  const uint64_t seed = key.host_seed();
  const float keep_scale = 1.0f - p;
  const uint32_t threshold = dropout_threshold(p);
  const int64_t rows = int64_t(B) * H * Tq;
  float* own_rows = bf16 && !dropped ? row_scratch(size_t(omp_get_max_threads()) * Tk) : nullptr;
#pragma omp parallel for schedule(static) if (rows * Tk >= kParallelMin)
  for (int64_t row = 0; row < rows; ++row) {
    const int i = static_cast<int>(row % Tq);
    const int h = static_cast<int>((row / Tq) % H);
    const int b = static_cast<int>(row / (int64_t(Tq) * H));
    const float* bi = bias ? bias + (int64_t(h) * Tq + i) * Tk : nullptr;
    const float* km = key_mask ? key_mask + int64_t(b) * Tk : nullptr;
    const int jmax = causal ? std::min(Tk, i + 1) : Tk;
    float* dr = dropped ? dropped + row * Tk : nullptr;
    float* pr = !bf16 ? static_cast<float*>(probs) + row * Tk
                : dr  ? dr
                      : own_rows + int64_t(omp_get_thread_num()) * Tk;
    softmax_row(pr, scores + row * Tk, bi, km, jmax, Tk);
    if (bf16) {
      uint16_t* pb = static_cast<uint16_t*>(probs) + row * Tk;
      for (int j = 0; j < Tk; ++j) {
        pr[j] = switcht5::round_to_bf16(pr[j]);
        pb[j] = float_to_bf16(pr[j]);  // exact: pr[j] is a bf16 value
      }
    }
    if (!dr) continue;
    if (p > 0.0f) {
      cpu::dropout_span(dr, pr, Tk, uint64_t(row) * uint64_t(Tk), seed, threshold, keep_scale);
      if (bf16)
        for (int j = 0; j < Tk; ++j) dr[j] = switcht5::round_to_bf16(dr[j]);
    } else if (dr != pr) {
      std::memcpy(dr, pr, sizeof(float) * size_t(Tk));
    }
  }
}

// One (h, i) per iteration, its B rows in order, so the bias gradient of (h, i, j) is summed in
// double over b in order from dbias's value (sum_over_batch's order) while the rows are in cache:
// the dropout mask is written into dscores (as Backend::dropout would write dprobs), the softmax
// backward is done in place there, and the row rounded after its sum is taken.
void CpuBackend::attention_softmax_dropout_backward(float* dscores, float* dbias,
                                                    const float* dprobs, const float* probs, int B,
                                                    int H, int Tq, int Tk, float p, RandomKey key,
                                                    bool round_bf16) {
  SWT_CHECK(p >= 0.0f && p < 1.0f, "attention_softmax_dropout_backward: p={} outside [0, 1)", p);
  const uint64_t seed = key.host_seed();
  const float keep_scale = 1.0f - p;
  const uint32_t threshold = dropout_threshold(p);
  const int64_t head_rows = int64_t(H) * Tq;  // (h, i) pairs
  double* acc_all = dbias ? scratch(size_t(omp_get_max_threads()) * Tk) : nullptr;
#pragma omp parallel for schedule(static) if (head_rows * B * Tk >= kParallelMin)
  for (int64_t hi = 0; hi < head_rows; ++hi) {
    double* acc = acc_all ? acc_all + int64_t(omp_get_thread_num()) * Tk : nullptr;
    float* db = dbias ? dbias + hi * Tk : nullptr;
    if (db)
      for (int j = 0; j < Tk; ++j) acc[j] = db[j];
    for (int b = 0; b < B; ++b) {
      const int64_t row = int64_t(b) * head_rows + hi;
      float* ds = dscores + row * Tk;
      const float* dp = dprobs + row * Tk;
      if (p > 0.0f)
        cpu::dropout_span(ds, dp, Tk, uint64_t(row) * uint64_t(Tk), seed, threshold, keep_scale);
      else if (ds != dp)
        std::memcpy(ds, dp, sizeof(float) * size_t(Tk));
      softmax_backward_row(ds, ds, probs + row * Tk, Tk);
      if (acc) accumulate_row(acc, ds, Tk);
      if (round_bf16) round_row_to_bf16(ds, Tk);
    }
    if (db)
      for (int j = 0; j < Tk; ++j) db[j] = static_cast<float>(acc[j]);
  }
}

// ---- the attention core, problem by problem --------------------------------------------------
// Backend::attention_core_forward/_backward as a loop over the B*H (b,h) problems, each thread
// running whole problems: a problem's scores, probabilities and their gradients are 1 MB at
// Tq = Tk = 512, so they stay in the core's cache from the GEMM that writes them through the
// row passes to the GEMM that reads them. The composition streams the [B,H,Tq,Tk] tensors
// through memory five times forward and nine times backward; this writes probs once forward and,
// backward, reads probs and writes dscores once (and reads them once more for the bias
// gradient's sum over b). Measured by bench/bench_attention. Bitwise the composition: the same
// single-threaded dnnl_sgemm per problem that gemm() runs when the batch is at least the thread
// count (the only case taken here), the same row functions, dropout by element index. With fewer
// problems than threads the composition runs (oneDNN then threads each product).
bool CpuBackend::attention_by_problem(int problems) const {
  return problems >= omp_get_max_threads();
}

void CpuBackend::profiled_sgemm(char ta, char tb, int M, int N, int K, const float* A, int lda,
                                const float* B, int ldb, float* C, int ldc, double* seconds) {
  const auto t0 = seconds ? std::chrono::steady_clock::now()
                          : std::chrono::steady_clock::time_point{};
  const dnnl_status_t st = dnnl_sgemm(ta, tb, M, N, K, 1.0f, A, lda, B, ldb, 0.0f, C, ldc);
  SWT_CHECK(st == dnnl_success,
            "dnnl_sgemm failed with status {} (trans {}{} M={} N={} K={} lda={} ldb={} ldc={})",
            int(st), ta, tb, M, N, K, lda, ldb, ldc);
  if (seconds)
    *seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// --gemm-shapes: the problems' products go into the profile as the batched products they replace
// (one call of B*H each); their time is the threads' summed sgemm time over the thread count,
// the wall time they would take if every thread spent the same share of the loop in them.
void CpuBackend::record_problem_gemms(std::span<const ProblemGemm> gemms, int problems,
                                      const std::vector<double>& thread_seconds) {
  for (const ProblemGemm& pg : gemms) gemm_flops_ += 2.0 * pg.M * pg.N * double(pg.K) * problems;
  if (!gemm_profile_) return;
  const int threads = omp_get_max_threads();
  for (size_t g = 0; g < gemms.size(); ++g) {
    const ProblemGemm& pg = gemms[g];
    GemmTime& t = (*gemm_profile_)[GemmShape{pg.ta == 'T', pg.tb == 'T', pg.M, pg.N, pg.K,
                                             problems}];
    t.calls += 1;
    double sum = 0.0;
    for (int th = 0; th < threads; ++th) sum += thread_seconds[size_t(th) * gemms.size() + g];
    t.seconds += sum / threads;
    t.flops += 2.0 * pg.M * pg.N * double(pg.K) * problems;
  }
}

void CpuBackend::attention_core_forward(float* probs, float* ctx, const float* q, const float* k,
                                        const float* v, const float* bias, const float* key_mask,
                                        int B, int H, int Tq, int Tk, int K, bool causal, float p,
                                        RandomKey key, float* work) {
  const int BH = B * H;
  if (!attention_by_problem(BH) || Tq == 0 || Tk == 0 || K == 0) {
    Backend::attention_core_forward(probs, ctx, q, k, v, bias, key_mask, B, H, Tq, Tk, K, causal,
                                    p, key, work);
    return;
  }
  SWT_CHECK(p >= 0.0f && p < 1.0f, "attention_core_forward: p={} outside [0, 1)", p);
  const uint64_t seed = key.host_seed();
  const float keep_scale = 1.0f - p;
  const uint32_t threshold = dropout_threshold(p);
  const int64_t qk = int64_t(Tq) * Tk;
  const std::array<ProblemGemm, 2> gemms = {{{'N', 'T', Tq, Tk, K}, {'N', 'N', Tq, K, Tk}}};
  std::vector<double> seconds(gemm_profile_ ? size_t(omp_get_max_threads()) * gemms.size() : 0);
  // dropout(probs) only feeds its problem's context product: one [Tq,Tk] of `work` per thread,
  // reused problem after problem so that it stays in cache (BH >= threads: work is large enough).
#pragma omp parallel for schedule(static)
  for (int bh = 0; bh < BH; ++bh) {
    double* sec = gemm_profile_ ? seconds.data() + omp_get_thread_num() * gemms.size() : nullptr;
    const int b = bh / H, h = bh % H;
    float* pr = probs + bh * qk;  // the scores, then the probabilities over them
    float* dr = p > 0.0f ? work + omp_get_thread_num() * qk : nullptr;
    profiled_sgemm('N', 'T', Tq, Tk, K, q + int64_t(bh) * Tq * K, K, k + int64_t(bh) * Tk * K, K,
                   pr, Tk, sec ? sec + 0 : nullptr);
    for (int i = 0; i < Tq; ++i) {
      const int64_t row = int64_t(bh) * Tq + i;
      const float* bi = bias ? bias + (int64_t(h) * Tq + i) * Tk : nullptr;
      const float* km = key_mask ? key_mask + int64_t(b) * Tk : nullptr;
      softmax_row(pr + int64_t(i) * Tk, pr + int64_t(i) * Tk, bi, km,
                  causal ? std::min(Tk, i + 1) : Tk, Tk);
      if (dr)
        cpu::dropout_span(dr + int64_t(i) * Tk, pr + int64_t(i) * Tk, Tk,
                          uint64_t(row) * uint64_t(Tk), seed, threshold, keep_scale);
    }
    profiled_sgemm('N', 'N', Tq, K, Tk, dr ? dr : pr, Tk, v + int64_t(bh) * Tk * K, K,
                   ctx + int64_t(bh) * Tq * K, K, sec ? sec + 1 : nullptr);
  }
  record_problem_gemms(gemms, BH, seconds);
}

void CpuBackend::attention_core_backward(float* dq, float* dk, float* dv, float* dbias,
                                         const float* dctx, const float* probs, const float* q,
                                         const float* k, const float* v, int B, int H, int Tq,
                                         int Tk, int K, float p, RandomKey key, float* work) {
  const int BH = B * H;
  if (!attention_by_problem(BH) || Tq == 0 || Tk == 0 || K == 0) {
    Backend::attention_core_backward(dq, dk, dv, dbias, dctx, probs, q, k, v, B, H, Tq, Tk, K, p,
                                     key, work);
    return;
  }
  SWT_CHECK(p >= 0.0f && p < 1.0f, "attention_core_backward: p={} outside [0, 1)", p);
  const uint64_t seed = key.host_seed();
  const float keep_scale = 1.0f - p;
  const uint32_t threshold = dropout_threshold(p);
  const int64_t qk = int64_t(Tq) * Tk;
  const std::array<ProblemGemm, 4> gemms = {{{'T', 'N', Tk, K, Tq},
                                             {'N', 'T', Tq, Tk, K},
                                             {'N', 'N', Tq, K, Tk},
                                             {'T', 'N', Tk, K, Tq}}};
  std::vector<double> seconds(gemm_profile_ ? size_t(omp_get_max_threads()) * gemms.size() : 0);
#pragma omp parallel for schedule(static)
  for (int bh = 0; bh < BH; ++bh) {
    double* sec = gemm_profile_ ? seconds.data() + omp_get_thread_num() * gemms.size() : nullptr;
    const float* pr = probs + bh * qk;
    float* w = work + bh * qk;  // dropout(probs), then dprobs, then dscores over them
    const float* dc = dctx + int64_t(bh) * Tq * K;
    if (p > 0.0f)
      cpu::dropout_span(w, pr, qk, uint64_t(bh) * uint64_t(qk), seed, threshold, keep_scale);
    profiled_sgemm('T', 'N', Tk, K, Tq, p > 0.0f ? w : pr, Tk, dc, K, dv + int64_t(bh) * Tk * K,
                   K, sec ? sec + 0 : nullptr);
    profiled_sgemm('N', 'T', Tq, Tk, K, dc, K, v + int64_t(bh) * Tk * K, K, w, Tk,
                   sec ? sec + 1 : nullptr);
    for (int i = 0; i < Tq; ++i) {
      float* ds = w + int64_t(i) * Tk;
      if (p > 0.0f)
        cpu::dropout_span(ds, ds, Tk, (uint64_t(bh) * Tq + i) * uint64_t(Tk), seed, threshold,
                          keep_scale);
      softmax_backward_row(ds, ds, pr + int64_t(i) * Tk, Tk);
    }
    // dctx is read for the last time above: dq may be written over it.
    profiled_sgemm('N', 'N', Tq, K, Tk, w, Tk, k + int64_t(bh) * Tk * K, K,
                   dq + int64_t(bh) * Tq * K, K, sec ? sec + 2 : nullptr);
    profiled_sgemm('T', 'N', Tk, K, Tq, w, Tk, q + int64_t(bh) * Tq * K, K,
                   dk + int64_t(bh) * Tk * K, K, sec ? sec + 3 : nullptr);
  }
  record_problem_gemms(gemms, BH, seconds);
  if (!dbias) return;
  // dbias[h,i,:] += sum over b of dscores[b,h,i,:], in double, b in order (as the composition).
  const int64_t head_rows = int64_t(H) * Tq;
  double* acc_all = scratch(size_t(omp_get_max_threads()) * Tk);
#pragma omp parallel for schedule(static)
  for (int64_t hi = 0; hi < head_rows; ++hi) {
    double* acc = acc_all + int64_t(omp_get_thread_num()) * Tk;
    float* db = dbias + hi * Tk;
    for (int j = 0; j < Tk; ++j) acc[j] = db[j];
    for (int b = 0; b < B; ++b) accumulate_row(acc, work + (int64_t(b) * head_rows + hi) * Tk, Tk);
    for (int j = 0; j < Tk; ++j) db[j] = static_cast<float>(acc[j]);
  }
}

void CpuBackend::relpos_bias_forward(float* bias, const float* table, const int32_t* buckets, int H,
                                     int Tq, int Tk) {
#pragma omp parallel for collapse(2) schedule(static) if (int64_t(H) * Tq * Tk >= kParallelMin)
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < Tq; ++i) {
      float* out = bias + (int64_t(h) * Tq + i) * Tk;
      const int32_t* bk = buckets + int64_t(i) * Tk;
      for (int j = 0; j < Tk; ++j) out[j] = table[int64_t(bk[j]) * H + h];
    }
}

void CpuBackend::relpos_bias_backward(float* dtable, const float* dbias, const int32_t* buckets,
                                      int H, int Tq, int Tk, int num_buckets) {
  // One head per iteration, (i,j) in order. Thousands of positions share a bucket, so the
  // per-bucket sums are kept in double.
  double* acc_all = scratch(size_t(H) * num_buckets);
#pragma omp parallel for schedule(static) if (int64_t(H) * Tq * Tk >= kParallelMin)
  for (int h = 0; h < H; ++h) {
    double* acc = acc_all + int64_t(h) * num_buckets;
    for (int k = 0; k < num_buckets; ++k) acc[k] = dtable[int64_t(k) * H + h];
    const float* g = dbias + int64_t(h) * Tq * Tk;
    for (int64_t ij = 0; ij < int64_t(Tq) * Tk; ++ij) acc[buckets[ij]] += g[ij];
    for (int k = 0; k < num_buckets; ++k) dtable[int64_t(k) * H + h] = static_cast<float>(acc[k]);
  }
}

// ---- activations ------------------------------------------------------------------------------

void CpuBackend::relu_forward(float* out, const float* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

void CpuBackend::relu_backward(float* dx, const float* dout, const float* x, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) dx[i] = x[i] > 0.0f ? dout[i] : 0.0f;
}

// relu and dropout in one pass over memory: each thread takes whole blocks of kBlock elements
// (a multiple of the dropout loops' 64) and runs both loops on a block while it is in L1, so the
// tensor is read and written once instead of twice. Bitwise the composition: relu is elementwise
// and a dropout draw depends only on the element's index.
namespace {
constexpr int64_t kActivationBlock = 2048;  // 8 KB of floats

// Runs dropout(p, key) over [0, n) block by block in parallel, with `before(begin, len)` and
// `after(begin, len)` on the same block around it: dropout_span(out, in) of the block in between
// (element indices are global, so the draws are Backend::dropout's).
template <class Before, class After>
void dropout_blocks(float* out, const float* in, int64_t n, float p, RandomKey key,
                    Before before, After after) {
  const uint64_t seed = key.host_seed();
  const float keep_scale = 1.0f - p;
  const uint32_t threshold = dropout_threshold(p);
  const cpu::DropoutGroups groups = cpu::best_dropout_groups();
  const int64_t blocks = (n + kActivationBlock - 1) / kActivationBlock;
#pragma omp parallel for schedule(static) if (n >= kParallelMin / 4)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t begin = blk * kActivationBlock, len = std::min(kActivationBlock, n - begin);
    before(begin, len);
    cpu::dropout_span(out + begin, in + begin, len, uint64_t(begin), seed, threshold, keep_scale,
                      groups);
    after(begin, len);
  }
}
}  // namespace

void CpuBackend::relu_dropout_forward(float* out, const float* x, int64_t n, float p,
                                      RandomKey key) {
  SWT_CHECK(p >= 0.0f && p < 1.0f, "relu_dropout_forward: p={} outside [0, 1)", p);
  if (p == 0.0f) return relu_forward(out, x, n);
  dropout_blocks(
      out, out, n, p, key,
      [&](int64_t begin, int64_t len) {
        for (int64_t i = begin; i < begin + len; ++i) out[i] = x[i] > 0.0f ? x[i] : 0.0f;
      },
      [](int64_t, int64_t) {});
}

void CpuBackend::relu_dropout_backward(float* dx, const float* dout, const float* x, int64_t n,
                                       float p, RandomKey key) {
  SWT_CHECK(p >= 0.0f && p < 1.0f, "relu_dropout_backward: p={} outside [0, 1)", p);
  if (p == 0.0f) return relu_backward(dx, dout, x, n);
  dropout_blocks(
      dx, dout, n, p, key, [](int64_t, int64_t) {},
      [&](int64_t begin, int64_t len) {
        for (int64_t i = begin; i < begin + len; ++i) dx[i] = x[i] > 0.0f ? dx[i] : 0.0f;
      });
}

void CpuBackend::gated_gelu_forward(float* out, const float* a, const float* b, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin / 4)
  for (int64_t i = 0; i < n; ++i) out[i] = gelu_tanh(a[i]) * b[i];
}

void CpuBackend::gated_gelu_backward(float* da, float* db, const float* dout, const float* a,
                                     const float* b, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= kParallelMin / 4)
  for (int64_t i = 0; i < n; ++i) {
    const float g = dout[i];  // read before writing: da or db may alias dout
    const float ai = a[i];
    da[i] = g * b[i] * gelu_tanh_grad(ai);
    db[i] = g * gelu_tanh(ai);
  }
}

// ---- randomness -------------------------------------------------------------------------------

// Each thread one contiguous chunk of whole 64-element blocks (cpu::dropout_span: the widest
// vector loop the CPU runs); an element's value depends only on its index, not on the chunking.
void CpuBackend::dropout(float* out, const float* x, int64_t n, float p, RandomKey key) {
  SWT_CHECK(p >= 0.0f && p < 1.0f, "dropout: p={} outside [0, 1)", p);
  const uint64_t seed = key.host_seed();
  if (p == 0.0f) {
    if (out != x) copy(out, x, sizeof(float) * n);
    return;
  }
  const float keep_scale = 1.0f - p;
  const uint32_t threshold = dropout_threshold(p);  // <= 65536
  const cpu::DropoutGroups groups = cpu::best_dropout_groups();
  constexpr int64_t kBlock = 64;
#pragma omp parallel if (n >= kParallelMin / 4)
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    const int64_t begin = std::min(n, (blocks * t / threads) * kBlock);
    const int64_t end = std::min(n, (blocks * (t + 1) / threads) * kBlock);
    cpu::dropout_span(out + begin, x + begin, end - begin, uint64_t(begin), seed, threshold,
                      keep_scale, groups);
  }
}

void CpuBackend::uniform_jitter(float* out, const float* x, int64_t n, float eps, RandomKey key,
                                uint64_t offset) {
  const uint64_t seed = key.host_seed();
#pragma omp parallel for schedule(static) if (n >= kParallelMin / 4)
  for (int64_t i = 0; i < n; ++i)
    out[i] = x[i] * (1.0f - eps + 2.0f * eps * uniform01(seed, offset + static_cast<uint64_t>(i)));
}

// ---- loss -------------------------------------------------------------------------------------

void CpuBackend::cross_entropy_forward(float* loss, float* lse, const float* logits,
                                       const int32_t* labels, int64_t N, int V) {
#pragma omp parallel for schedule(static) if (N * V >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const float* row = logits + r * V;
    const float mx = row_max(row, V);
    const double l = double(mx) + std::log(sum_exp(row, V, mx));
    lse[r] = static_cast<float>(l);
    loss[r] = labels[r] >= 0 ? static_cast<float>(l - double(row[labels[r]])) : 0.0f;
  }
}

void CpuBackend::cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                                        const int32_t* labels, int64_t N, int V, float scale,
                                        const float* scale_by, float z_coef) {
  if (scale_by) scale = scale * *scale_by;
#pragma omp parallel for schedule(static) if (N * V >= kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    float* d = dlogits + r * V;  // may alias logits: elementwise
    const int32_t label = labels[r];
    if (label < 0) {
      std::fill(d, d + V, 0.0f);
      continue;
    }
    const float* row = logits + r * V;
    const float l = lse[r];
    const float factor = scale * (1.0f + 2.0f * z_coef * l);
    scaled_exp(d, row, V, l, factor);
    d[label] -= scale;
  }
}

// ---- Switch router and token dispatch -----------------------------------------------------------

void CpuBackend::router_forward(float* probs, float* lse, int32_t* expert, int32_t* slot,
                                int32_t* rows, float* gate, float* counts, const float* logits,
                                int G, int S, int E, int C) {
  // One group per iteration, its tokens in order. The softmax is in double, as in the reference,
  // so that both pick the same expert on near-ties (it is T*E exps, negligible next to the GEMMs).
#pragma omp parallel for schedule(static) if (int64_t(G) * S * E >= kParallelMin)
  for (int g = 0; g < G; ++g) {
    float* counts_g = counts + int64_t(g) * E;
    std::fill(counts_g, counts_g + E, 0.0f);
    for (int s = 0; s < S; ++s) {
      const int64_t t = int64_t(g) * S + s;
      const float* lg = logits + t * E;
      float* p = probs + t * E;
      double mx = -std::numeric_limits<double>::infinity();
      for (int e = 0; e < E; ++e) mx = std::max(mx, double(lg[e]));
      double z = 0.0;
      for (int e = 0; e < E; ++e) z += std::exp(double(lg[e]) - mx);
      for (int e = 0; e < E; ++e) p[e] = static_cast<float>(std::exp(double(lg[e]) - mx) / z);
      lse[t] = static_cast<float>(mx + std::log(z));
      int best = 0;  // argmax over the stored float probs, lowest index on ties
      for (int e = 1; e < E; ++e)
        if (p[e] > p[best]) best = e;
      expert[t] = best;
      gate[t] = p[best];
      const int position = static_cast<int>(counts_g[best]);
      slot[t] = position < C ? position : -1;  // the row within the group's share, for now
      counts_g[best] += 1.0f;
    }
  }
  // Each expert's kept tokens, packed group after group (backend.h): group g's share starts at
  // the kept tokens of the groups before it. G*E adds, serial.
  int32_t* offset = int_scratch(size_t(G) * E);
  std::fill(rows, rows + E, 0);
  for (int g = 0; g < G; ++g)
    for (int e = 0; e < E; ++e) {
      offset[int64_t(g) * E + e] = rows[e];
      rows[e] += std::min(static_cast<int32_t>(counts[int64_t(g) * E + e]), int32_t(C));
    }
  const int64_t T = int64_t(G) * S;
#pragma omp parallel for schedule(static) if (T >= kParallelMin)
  for (int64_t t = 0; t < T; ++t)
    if (slot[t] >= 0) slot[t] += offset[(t / S) * E + expert[t]];
}

void CpuBackend::router_balance_loss(float* lb, const float* probs, const float* counts, int G,
                                     int S, int E) {
  double* prob_sum_all = scratch(size_t(G) * E);
#pragma omp parallel for schedule(static) if (int64_t(G) * S * E >= kParallelMin)
  for (int g = 0; g < G; ++g) {
    double* prob_sum = prob_sum_all + int64_t(g) * E;
    for (int e = 0; e < E; ++e) prob_sum[e] = 0.0;
    for (int s = 0; s < S; ++s) {
      const float* p = probs + (int64_t(g) * S + s) * E;
      for (int e = 0; e < E; ++e) prob_sum[e] += p[e];
    }
    double total = 0.0;
    for (int e = 0; e < E; ++e) total += double(counts[int64_t(g) * E + e]) * prob_sum[e];
    lb[g] = static_cast<float>(E * total / (double(S) * S));
  }
}

void CpuBackend::router_backward(float* dlogits, const float* probs, const float* lse,
                                 const int32_t* expert, const float* dgate, const float* counts,
                                 int G, int S, int E, float lb_scale, float z_scale) {
  const int64_t T = int64_t(G) * S;
  const double lb_coef = double(lb_scale) * E / (double(S) * S);
#pragma omp parallel for schedule(static) if (T * E >= kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    const float* p = probs + t * E;
    const float* counts_g = counts + (t / S) * E;
    auto dprob = [&](int e) {
      return lb_coef * counts_g[e] + (e == expert[t] ? double(dgate[t]) : 0.0);
    };
    double dot = 0.0;
    for (int e = 0; e < E; ++e) dot += dprob(e) * p[e];
    const double z_term = double(z_scale) * 2.0 * double(lse[t]);
    for (int e = 0; e < E; ++e)
      dlogits[t * E + e] = static_cast<float>(double(p[e]) * (dprob(e) - dot + z_term));
  }
}

void CpuBackend::moe_dispatch(float* buf, const float* x, const int32_t* expert,
                              const int32_t* slot, int64_t T, int D, int E, int GC) {
  fill(buf, 0.0f, int64_t(E) * GC * D);
  // Each (expert, slot) row belongs to at most one token (router_forward), so rows are disjoint.
#pragma omp parallel for schedule(static) if (T * D >= kParallelMin)
  for (int64_t t = 0; t < T; ++t)
    if (slot[t] >= 0)
      std::memcpy(buf + (int64_t(expert[t]) * GC + slot[t]) * D, x + t * D, sizeof(float) * D);
}

void CpuBackend::moe_dispatch_backward(float* dx, const float* dbuf, const int32_t* expert,
                                       const int32_t* slot, int64_t T, int D, int GC) {
#pragma omp parallel for schedule(static) if (T * D >= kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    if (slot[t] >= 0)
      std::memcpy(dx + t * D, dbuf + (int64_t(expert[t]) * GC + slot[t]) * D, sizeof(float) * D);
    else
      std::fill(dx + t * D, dx + (t + 1) * D, 0.0f);
  }
}

void CpuBackend::moe_combine(float* out, const float* buf, const float* gate, const int32_t* expert,
                             const int32_t* slot, int64_t T, int D, int GC) {
#pragma omp parallel for schedule(static) if (T * D >= kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    float* o = out + t * D;
    if (slot[t] < 0) {
      std::fill(o, o + D, 0.0f);
      continue;
    }
    const float* row = buf + (int64_t(expert[t]) * GC + slot[t]) * D;
    const float gt = gate[t];
    for (int d = 0; d < D; ++d) o[d] = gt * row[d];
  }
}

void CpuBackend::moe_combine_backward(float* dbuf, float* dgate, const float* dout,
                                      const float* buf, const float* gate, const int32_t* expert,
                                      const int32_t* slot, int64_t T, int D, int E, int GC) {
  fill(dbuf, 0.0f, int64_t(E) * GC * D);
#pragma omp parallel for schedule(static) if (T * D >= kParallelMin)
  for (int64_t t = 0; t < T; ++t) {
    if (slot[t] < 0) {
      dgate[t] = 0.0f;
      continue;
    }
    const int64_t row = (int64_t(expert[t]) * GC + slot[t]) * D;
    const float* g = dout + t * D;
    const float gt = gate[t];
    double dot = 0.0;
    for (int d = 0; d < D; ++d) {
      dbuf[row + d] = gt * g[d];
      dot += double(g[d]) * buf[row + d];
    }
    dgate[t] = static_cast<float>(dot);
  }
}

}  // namespace switcht5
