// CpuBackend: the production CPU path. GEMM goes to oneDNN's dnnl_sgemm (row-major, threaded
// by oneDNN itself, or one single-threaded sgemm per batch entry when the batch is large and the
// matrices small); every other op is an OpenMP loop with a static schedule in which each output
// element is written by exactly one thread with a fixed-order inner loop, so results do not
// depend on the thread count (reductions sum fixed-size blocks, then the blocks in order).
// Tested against ReferenceBackend in tests/test_backend_ops.cpp.
#pragma once
#include <compare>
#include <cstdint>
#include <map>
#include <span>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"

namespace switcht5 {

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  bool host_accessible() const override { return true; }

  void* alloc_bytes(size_t bytes) override;
  void free_bytes(void* ptr) override;
  void copy_to_host(void* dst, const void* src, size_t bytes) override;
  void copy_to_device(void* dst, const void* src, size_t bytes) override;
  void copy(void* dst, const void* src, size_t bytes) override;
  void fill(float* x, float value, int64_t n) override;
  void zero_bytes(void* x, size_t bytes) override;
  // Counted in 64-byte blocks, the multiple aligned_alloc is given (no transient blocks: the
  // GEMM's fp32 copies are host vectors, wide_a_ below).
  MemoryCounts memory_counts() const override;

  void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
            int64_t stride_a, const float* B, int ldb, int64_t stride_b, float beta, float* C,
            int ldc, int64_t stride_c, int batch) override;
  void gemm_ex(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const void* A,
               DType a_type, int lda, int64_t stride_a, const void* B, DType b_type, int ldb,
               int64_t stride_b, float beta, void* C, DType c_type, int ldc, int64_t stride_c,
               int batch) override;
  // Each batch entry's squares taken by the thread that just computed it, while in its cache.
  void gemm_ex_sum_squares(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                           const void* A, DType a_type, int lda, int64_t stride_a, const void* B,
                           DType b_type, int ldb, int64_t stride_b, float beta, float* C, int ldc,
                           int64_t stride_c, int batch, double* acc) override;
  // Skips A's zero rows: each entry is an M_b x N x K_b product (sgemm_batch).
  void gemm_ex_rows(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const void* A,
                    DType a_type, int lda, int64_t stride_a, const void* B, DType b_type, int ldb,
                    int64_t stride_b, float beta, void* C, DType c_type, int ldc,
                    int64_t stride_c, int batch, const int32_t* a_rows, double* squares) override;
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
  void attention_core_forward(float* probs, float* ctx, const float* q, const float* k,
                              const float* v, const float* bias, const float* key_mask, int B,
                              int H, int Tq, int Tk, int K, bool causal, float p, RandomKey key,
                              float* work) override;
  void attention_core_backward(float* dq, float* dk, float* dv, float* dbias, const float* dctx,
                               const float* probs, const float* q, const float* k, const float* v,
                               int B, int H, int Tq, int Tk, int K, float p, RandomKey key,
                               float* work) override;
  void relpos_bias_forward(float* bias, const float* table, const int32_t* buckets, int H, int Tq,
                           int Tk) override;
  void relpos_bias_backward(float* dtable, const float* dbias, const int32_t* buckets, int H,
                            int Tq, int Tk, int num_buckets) override;

  void relu_forward(float* out, const float* x, int64_t n) override;
  void relu_backward(float* dx, const float* dout, const float* x, int64_t n) override;
  void relu_dropout_forward(float* out, const float* x, int64_t n, float p,
                            RandomKey key) override;
  void relu_dropout_backward(float* dx, const float* dout, const float* x, int64_t n, float p,
                             RandomKey key) override;
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

  // Defined in cpu/optim_cpu.cpp.
  void adamw_update(float* p, uint16_t* p_bf16, const float* g, float* m, float* v, int64_t n,
                    float lr, float beta1, float beta2, float eps, float weight_decay, float bc1,
                    float bc2) override;
  void adafactor_update(float* p, uint16_t* p_bf16, const float* g, float* vr, float* vc, float* v,
                        bool factored, int count, int R, int C, float lr, float beta2t, float eps1,
                        float clip, float weight_decay, float eps2) override;

  // Per-shape GEMM time, for `bench_step --gemm-shapes` (where the step's matmul time goes):
  // while a profile is set, every gemm call that reaches oneDNN is timed on the wall clock and
  // added to its shape's row (gemm_ex's bf16 operands count once, as the fp32 product they
  // become; gemm_ex_sum_squares' time includes its squares). Null, the default, costs one
  // branch per call.
  struct GemmShape {
    bool trans_a, trans_b;
    int M, N, K, batch;
    auto operator<=>(const GemmShape&) const = default;
  };
  struct GemmTime {
    int64_t calls = 0;
    double seconds = 0.0;
    double flops = 0.0;  // as executed: 2*M*N*K per entry, less the rows gemm_ex_rows skipped
  };
  using GemmProfile = std::map<GemmShape, GemmTime>;
  void set_gemm_profile(GemmProfile* profile) { gemm_profile_ = profile; }
  // Matmul FLOPs this backend has executed so far (2*M*N*K per product as run, so the rows
  // gemm_ex_rows skips are not counted): bench_step's "executed" rate. Always counted.
  double executed_gemm_flops() const { return gemm_flops_; }

 private:
  GemmProfile* gemm_profile_ = nullptr;
  double gemm_flops_ = 0.0;
  // The attention core problem by problem (cpu_backend.cpp): whether it runs that way, its
  // single-threaded products (timed into `seconds` when profiling), and their profile entries.
  struct ProblemGemm {
    char ta, tb;
    int M, N, K;
  };
  bool attention_by_problem(int problems) const;
  static void profiled_sgemm(char ta, char tb, int M, int N, int K, const float* A, int lda,
                             const float* B, int ldb, float* C, int ldc, double* seconds);
  void record_problem_gemms(std::span<const ProblemGemm> gemms, int problems,
                            const std::vector<double>& thread_seconds);
  double sum_squares_no_sync(const float* x, int64_t n);  // sum_squares' body, not counted
  // gemm's body; with `squares` (batch doubles), squares[b] = the sum of C_b's squares; with
  // `a_rows` (host int32 [batch]), A_b's rows past a_rows[b] are zero and skipped (gemm_ex_rows).
  void sgemm_batch(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A,
                   int lda, int64_t stride_a, const float* B, int ldb, int64_t stride_b,
                   float beta, float* C, int ldc, int64_t stride_c, int batch, double* squares,
                   const int32_t* a_rows);
  // gemm_ex's operand as fp32: p itself, or its widened copy in buf.
  const float* widened(std::vector<float>& buf, const void* p, DType t, int64_t n);
  // Host scratch for reductions (block partials, per-row factors), grown on first use and then
  // reused, so steady-state steps make no heap allocations. Ops run one at a time per backend.
  double* scratch(size_t n) {
    if (scratch_.size() < n) scratch_.resize(n);
    return scratch_.data();
  }
  std::vector<double> scratch_;
  // Host int32 scratch (router_forward's group offsets), grown like scratch().
  int32_t* int_scratch(size_t n) {
    if (int_scratch_.size() < n) int_scratch_.resize(n);
    return int_scratch_.data();
  }
  std::vector<int32_t> int_scratch_;
  // Host fp32 scratch (the fused attention forward's per-thread rows, Adafactor's row and column
  // factors), grown like scratch().
  float* row_scratch(size_t n) {
    if (row_scratch_.size() < n) row_scratch_.resize(n);
    return row_scratch_.data();
  }
  std::vector<float> row_scratch_;
  std::vector<float> wide_a_, wide_b_, wide_c_;  // gemm_ex's fp32 copies of bf16 operands
  std::vector<double> gemm_squares_;              // gemm_ex_sum_squares' per-entry sums
  // alloc_bytes' live blocks (address -> rounded bytes) and their sum, for memory_counts().
  std::unordered_map<void*, size_t> live_;
  size_t in_use_ = 0, peak_ = 0;
};

}  // namespace switcht5
