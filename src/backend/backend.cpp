#include "backend/backend.h"

#include "backend/cpu/cpu_backend.h"
#include "backend/reference/reference_backend.h"
#include "core/check.h"
#if defined(SWITCHT5_HAVE_CUDA)
#include "backend/cuda/cuda_backend.h"
#endif

namespace switcht5 {

void Backend::begin_recording() { SWT_CHECK(false, "backend '{}' cannot record work", name()); }
void Backend::end_recording() { SWT_CHECK(false, "backend '{}' cannot record work", name()); }
void Backend::replay() { SWT_CHECK(false, "backend '{}' cannot record work", name()); }

// The composition the model ran before the attention core was one op (backend.h).
void Backend::attention_core_forward(float* probs, float* ctx, const float* q, const float* k,
                                     const float* v, const float* bias, const float* key_mask,
                                     int B, int H, int Tq, int Tk, int K, bool causal, float p,
                                     RandomKey key, float* work) {
  const int BH = B * H;
  gemm(false, true, Tq, Tk, K, 1.0f, q, K, int64_t(Tq) * K, k, K, int64_t(Tk) * K, 0.0f, probs,
       Tk, int64_t(Tq) * Tk, BH);
  float* dropped = p > 0.0f ? work : nullptr;
  attention_softmax_dropout_forward(probs, DType::kF32, dropped, probs, bias, key_mask, B, H, Tq,
                                    Tk, causal, p, key);
  gemm(false, false, Tq, K, Tk, 1.0f, dropped ? dropped : probs, Tk, int64_t(Tq) * Tk, v, K,
       int64_t(Tk) * K, 0.0f, ctx, K, int64_t(Tq) * K, BH);
}

void Backend::attention_core_backward(float* dq, float* dk, float* dv, float* dbias,
                                      const float* dctx, const float* probs, const float* q,
                                      const float* k, const float* v, int B, int H, int Tq,
                                      int Tk, int K, float p, RandomKey key, float* work) {
  const int BH = B * H;
  const int64_t n = int64_t(BH) * Tq * Tk;
  const float* pd = probs;
  if (p > 0.0f) {
    dropout(work, probs, n, p, key);
    pd = work;
  }
  gemm(true, false, Tk, K, Tq, 1.0f, pd, Tk, int64_t(Tq) * Tk, dctx, K, int64_t(Tq) * K, 0.0f, dv,
       K, int64_t(Tk) * K, BH);
  gemm(false, true, Tq, Tk, K, 1.0f, dctx, K, int64_t(Tq) * K, v, K, int64_t(Tk) * K, 0.0f, work,
       Tk, int64_t(Tq) * Tk, BH);
  attention_softmax_dropout_backward(work, dbias, work, probs, B, H, Tq, Tk, p, key,
                                     /*round_bf16=*/false);
  gemm(false, false, Tq, K, Tk, 1.0f, work, Tk, int64_t(Tq) * Tk, k, K, int64_t(Tk) * K, 0.0f, dq,
       K, int64_t(Tq) * K, BH);
  gemm(true, false, Tk, K, Tq, 1.0f, work, Tk, int64_t(Tq) * Tk, q, K, int64_t(Tq) * K, 0.0f, dk,
       K, int64_t(Tk) * K, BH);
}

void Backend::gemm_ex_sum_squares(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                                  const void* A, DType a_type, int lda, int64_t stride_a,
                                  const void* B, DType b_type, int ldb, int64_t stride_b,
                                  float beta, float* C, int ldc, int64_t stride_c, int batch,
                                  double* acc) {
  gemm_ex(trans_a, trans_b, M, N, K, alpha, A, a_type, lda, stride_a, B, b_type, ldb, stride_b,
          beta, C, DType::kF32, ldc, stride_c, batch);
  if (M <= 0 || N <= 0 || batch <= 0) return;
  // Back-to-back blocks (a stacked weight gradient): one reduction over all of them, so a
  // device backend launches one, not one per expert.
  if (ldc == N && stride_c == int64_t(M) * N) {
    accumulate_sum_squares(acc, C, int64_t(batch) * M * N);
    return;
  }
  for (int b = 0; b < batch; ++b) {
    const float* c = C + b * stride_c;
    if (ldc == N) {
      accumulate_sum_squares(acc, c, int64_t(M) * N);
      continue;
    }
    for (int m = 0; m < M; ++m) accumulate_sum_squares(acc, c + int64_t(m) * ldc, N);
  }
}

void Backend::gemm_ex_rows(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                           const void* A, DType a_type, int lda, int64_t stride_a,
                           const void* B, DType b_type, int ldb, int64_t stride_b, float beta,
                           void* C, DType c_type, int ldc, int64_t stride_c, int batch,
                           const int32_t* /*a_rows*/, double* squares) {
  // The rows past a_rows are zero, so the full product is the result.
  if (!squares) {
    gemm_ex(trans_a, trans_b, M, N, K, alpha, A, a_type, lda, stride_a, B, b_type, ldb,
            stride_b, beta, C, c_type, ldc, stride_c, batch);
    return;
  }
  SWT_CHECK(c_type == DType::kF32, "gemm_ex_rows: squares of a {} C", dtype_name(c_type));
  gemm_ex_sum_squares(trans_a, trans_b, M, N, K, alpha, A, a_type, lda, stride_a, B, b_type, ldb,
                      stride_b, beta, static_cast<float*>(C), ldc, stride_c, batch, squares);
}

void Backend::relu_dropout_forward(float* out, const float* x, int64_t n, float p,
                                   RandomKey key) {
  relu_forward(out, x, n);
  if (p > 0.0f) dropout(out, out, n, p, key);
}

void Backend::relu_dropout_backward(float* dx, const float* dout, const float* x, int64_t n,
                                    float p, RandomKey key) {
  const float* g = dout;
  if (p > 0.0f) {
    dropout(dx, dout, n, p, key);
    g = dx;
  }
  relu_backward(dx, g, x, n);
}

std::unique_ptr<Backend> make_backend(const std::string& name, const BackendOptions& options) {
  if (name == "reference") return std::make_unique<ReferenceBackend>();
  if (name == "cpu") return std::make_unique<CpuBackend>();
  if (name == "cuda") {
#if defined(SWITCHT5_HAVE_CUDA)
    return make_cuda_backend(options);
#else
    throw UserError(
        "train.backend 'cuda': this build has no CUDA backend (configure with -DSWITCHT5_CUDA=ON "
        "where the CUDA toolkit is installed)");
#endif
  }
  throw UserError(
      fmt::format("unknown backend '{}': expected one of 'reference', 'cpu', 'cuda'", name));
}

}  // namespace switcht5
