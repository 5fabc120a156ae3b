// ReferenceBackend: the oracle every other backend is tested against (STYLE habit 1).
//
// Plain loops, one thread, every sum and dot product accumulated in double and rounded to float
// once at the end. Clarity over speed: each op reads like the formula documented in
// backend/backend.h, and checks its integer inputs (ids, labels, buckets, slots) with SWT_CHECK.
#pragma once
#include "backend/backend.h"

namespace switcht5 {

class ReferenceBackend final : public Backend {
 public:
  std::string name() const override { return "reference"; }
  bool host_accessible() const override { return true; }

  void* alloc_bytes(size_t bytes) override;
  void free_bytes(void* ptr) override;
  void copy_to_host(void* dst, const void* src, size_t bytes) override;
  void copy_to_device(void* dst, const void* src, size_t bytes) override;
  void copy(void* dst, const void* src, size_t bytes) override;
  void fill(float* x, float value, int64_t n) override;
  void zero_bytes(void* x, size_t bytes) override;

  void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
            int64_t stride_a, const float* B, int ldb, int64_t stride_b, float beta, float* C,
            int ldc, int64_t stride_c, int batch) override;
  void gemm_ex(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const void* A,
               DType a_type, int lda, int64_t stride_a, const void* B, DType b_type, int ldb,
               int64_t stride_b, float beta, void* C, DType c_type, int ldc, int64_t stride_c,
               int batch) override;
  void cast(void* out, DType out_type, const void* in, DType in_type, int64_t n) override;
  void round_to_bf16(float* x, int64_t n) override;

  void add(float* out, const float* a, const float* b, int64_t n) override;
  void axpy(float* y, float alpha, const float* x, int64_t n) override;
  void scale(float* x, float alpha, int64_t n) override;
  double sum(const float* x, int64_t n) override;
  double sum_squares(const float* x, int64_t n) override;
  void sum_over_batch(float* out, const float* in, int batch, int64_t n) override;
  int64_t count_nonfinite(const float* x, int64_t n) override;
  void accumulate_sum_squares(double* acc, const float* x, int64_t n) override;
  void accumulate_loss_statistics(double* acc, const float* loss, const float* lse,
                                  const int32_t* labels, int64_t N) override;
  void accumulate_router_statistics(double* acc, const float* lb, const float* lse,
                                    const float* counts, int G, int S, int E, int C) override;
  void accumulate_router_confidence(double* acc, const float* probs, const float* logits,
                                    const float* lse, int64_t T, int E) override;

  void permute_0213(float* out, const float* in, int A, int B, int C, int D) override;

  void embedding_forward(float* out, const int32_t* ids, const float* table, int64_t n,
                         int D) override;
  void embedding_backward(float* dtable, const int32_t* ids, const float* dout, int64_t n, int D,
                          int V) override;

  void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int D,
                       float eps) override;
  void rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w,
                        const float* rstd, int64_t N, int D) override;

  void attention_softmax_forward(float* probs, const float* scores, const float* bias,
                                 const float* key_mask, int B, int H, int Tq, int Tk,
                                 bool causal) override;
  void softmax_backward(float* dscores, const float* dprobs, const float* probs, int64_t rows,
                        int Tk) override;
  void attention_softmax_dropout_forward(void* probs, DType probs_type, float* dropped,
                                         const float* scores, const float* bias,
                                         const float* key_mask, int B, int H, int Tq, int Tk,
                                         bool causal, float p, RandomKey key) override;
  void attention_softmax_dropout_backward(float* dscores, float* dbias, const float* dprobs,
                                          const float* probs, int B, int H, int Tq, int Tk,
                                          float p, RandomKey key, bool round_bf16) override;
  void relpos_bias_forward(float* bias, const float* table, const int32_t* buckets, int H, int Tq,
                           int Tk) override;
  void relpos_bias_backward(float* dtable, const float* dbias, const int32_t* buckets, int H,
                            int Tq, int Tk, int num_buckets) override;

  void relu_forward(float* out, const float* x, int64_t n) override;
  void relu_backward(float* dx, const float* dout, const float* x, int64_t n) override;
  void gated_gelu_forward(float* out, const float* a, const float* b, int64_t n) override;
  void gated_gelu_backward(float* da, float* db, const float* dout, const float* a, const float* b,
                           int64_t n) override;

  void dropout(float* out, const float* x, int64_t n, float p, RandomKey key) override;
  void uniform_jitter(float* out, const float* x, int64_t n, float eps, RandomKey key,
                      uint64_t offset = 0) override;

  void cross_entropy_forward(float* loss, float* lse, const float* logits, const int32_t* labels,
                             int64_t N, int V) override;
  void cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                              const int32_t* labels, int64_t N, int V, float scale,
                              const float* scale_by, float z_coef) override;

  void router_forward(float* probs, float* lse, int32_t* expert, int32_t* slot, int32_t* rows,
                      float* gate, float* counts, const float* logits, int G, int S, int E,
                      int C) override;
  void router_balance_loss(float* lb, const float* probs, const float* counts, int G, int S,
                           int E) override;
  void router_backward(float* dlogits, const float* probs, const float* lse, const int32_t* expert,
                       const float* dgate, const float* counts, int G, int S, int E, float lb_scale,
                       float z_scale) override;
  void moe_dispatch(float* buf, const float* x, const int32_t* expert, const int32_t* slot,
                    int64_t T, int D, int E, int GC) override;
  void moe_dispatch_backward(float* dx, const float* dbuf, const int32_t* expert,
                             const int32_t* slot, int64_t T, int D, int GC) override;
  void moe_combine(float* out, const float* buf, const float* gate, const int32_t* expert,
                   const int32_t* slot, int64_t T, int D, int GC) override;
  void moe_combine_backward(float* dbuf, float* dgate, const float* dout, const float* buf,
                            const float* gate, const int32_t* expert, const int32_t* slot,
                            int64_t T, int D, int E, int GC) override;

  // Defined in reference/optim_reference.cpp.
  void adamw_update(float* p, uint16_t* p_bf16, const float* g, float* m, float* v, int64_t n,
                    float lr, float beta1, float beta2, float eps, float weight_decay, float bc1,
                    float bc2) override;
  void adafactor_update(float* p, uint16_t* p_bf16, const float* g, float* vr, float* vc, float* v,
                        bool factored, int count, int R, int C, float lr, float beta2t, float eps1,
                        float clip, float weight_decay, float eps2) override;
};

}  // namespace switcht5
