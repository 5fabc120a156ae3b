// The CUDA backend's kernels, one launcher per Backend op (backend/backend.h states each op's
// math; this file only adds how the CUDA backend calls them). CudaBackend (cuda_backend.h) owns
// the stream, the memory and the cuBLASLt GEMMs and forwards every other op to a launcher here.
//
// Conventions for every launcher
// - All pointers are device memory; scalars are host values. Launchers only enqueue work on
//   ctx.stream: they never synchronise, allocate, or copy to the host.
// - Same math, same rounding points as the CPU backend, and deterministic: a launcher's result
//   is a function of its inputs and shapes only (never of timing or the GPU model). No atomics:
//   every output element has one writer, and every reduction sums in a fixed tree (fixed block
//   and grid sizes chosen from the shapes alone; cross-block partial sums go through
//   ctx.workspace, never atomicAdd).
// - Launch errors are checked after each launch (SWT_CUDA_CHECK(cudaGetLastError()), see
//   cuda_check.h); n == 0 or an empty shape enqueues nothing.
// - Random numbers come from core/rng.h (constexpr, compiled for the device with
//   --expt-relaxed-constexpr), so a dropout mask or a jitter is bitwise the CPU's.
//
// This header is plain C++ (no CUDA headers beyond the stream type), so g++ code may include it.
#pragma once
#include <cstddef>
#include <cstdint>

#include "backend/cuda/cuda_memory.h"  // kWorkspaceBytes
#include "core/dtype.h"

struct CUstream_st;

namespace switcht5::cuda {

// What a launcher may use besides its arguments.
struct Ctx {
  CUstream_st* stream = nullptr;  // cudaStream_t
  // Device scratch for multi-pass reductions (partial sums of a fixed grid), kWorkspaceBytes,
  // 256-byte aligned. Only one launcher uses it at a time (all launches are on one stream).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  int sm_count = 0;  // informational; launch shapes must NOT depend on it (determinism)
};

// ---- memory and casts (elementwise.cu) ---------------------------------------------------------
void fill(const Ctx& c, float* x, float value, int64_t n);
void cast(const Ctx& c, void* out, DType out_type, const void* in, DType in_type, int64_t n);
void round_to_bf16(const Ctx& c, float* x, int64_t n);

// ---- elementwise and layout (elementwise.cu) ---------------------------------------------------
void add(const Ctx& c, float* out, const float* a, const float* b, int64_t n);
void axpy(const Ctx& c, float* y, float alpha, const float* x, int64_t n);
void scale(const Ctx& c, float* x, float alpha, int64_t n);
void sum_over_batch(const Ctx& c, float* out, const float* in, int batch, int64_t n);
void permute_0213(const Ctx& c, float* out, const float* in, int A, int B, int C, int D);
void embedding_forward(const Ctx& c, float* out, const int32_t* ids, const float* table,
                       int64_t n, int D);
// No atomics: e.g. one thread block per table row (or per (row, column block)) that walks the
// tokens with that id in increasing t (sort or segment the ids first, in ctx.workspace), so each
// dtable element has one writer and sums in the CPU's order.
void embedding_backward(const Ctx& c, float* dtable, const int32_t* ids, const float* dout,
                        int64_t n, int D, int V);
void relpos_bias_forward(const Ctx& c, float* bias, const float* table, const int32_t* buckets,
                         int H, int Tq, int Tk);
void relpos_bias_backward(const Ctx& c, float* dtable, const float* dbias, const int32_t* buckets,
                          int H, int Tq, int Tk, int num_buckets);
void relu_forward(const Ctx& c, float* out, const float* x, int64_t n);
void relu_backward(const Ctx& c, float* dx, const float* dout, const float* x, int64_t n);
void gated_gelu_forward(const Ctx& c, float* out, const float* a, const float* b, int64_t n);
void gated_gelu_backward(const Ctx& c, float* da, float* db, const float* dout, const float* a,
                         const float* b, int64_t n);
// threshold = dropout_threshold(p) (core/rng.h) and keep_scale = 1.0f - p, both computed on the
// host; kept elements are x / keep_scale, a true (correctly rounded) division as on the CPU, so
// the result is bitwise the CPU backend's.
// The stream's seed is derive_seed(seed, *step) when `step` (device memory) is not null, read by
// the kernel when it runs (RandomKey, core/rng.h), else `seed`.
void dropout(const Ctx& c, float* out, const float* x, int64_t n, uint32_t threshold,
             float keep_scale, uint64_t seed, const uint64_t* step);
void uniform_jitter(const Ctx& c, float* out, const float* x, int64_t n, float eps, uint64_t seed,
                    const uint64_t* step, uint64_t offset);

// ---- reductions and statistics (reduce.cu) -----------------------------------------------------
// out is ONE device value, assigned (the backend copies it to the host where the op returns
// one). Sums in double over a fixed tree.
void sum(const Ctx& c, double* out, const float* x, int64_t n);
void sum_squares(const Ctx& c, double* out, const float* x, int64_t n);
void count_nonfinite(const Ctx& c, int64_t* out, const float* x, int64_t n);
// Backend::accumulate_*: ADD into acc (device doubles), as backend.h states.
void accumulate_sum_squares(const Ctx& c, double* acc, const float* x, int64_t n);
void accumulate_loss_statistics(const Ctx& c, double* acc, const float* loss, const float* lse,
                                const int32_t* labels, int64_t N);
void accumulate_router_statistics(const Ctx& c, double* acc, const float* lb, const float* lse,
                                  const float* counts, int G, int S, int E, int C);
void accumulate_router_confidence(const Ctx& c, double* acc, const float* probs,
                                  const float* logits, const float* lse, int64_t T, int E);

// ---- RMSNorm, attention softmax alone and fused with dropout (norm_attention.cu) ----------------
void rmsnorm_forward(const Ctx& c, float* out, float* rstd, const float* x, const float* w,
                     int64_t N, int D, float eps);
void rmsnorm_backward(const Ctx& c, float* dx, float* dw, const float* dout, const float* x,
                      const float* w, const float* rstd, int64_t N, int D);
void attention_softmax_forward(const Ctx& c, float* probs, const float* scores, const float* bias,
                               const float* key_mask, int B, int H, int Tq, int Tk, bool causal);
void softmax_backward(const Ctx& c, float* dscores, const float* dprobs, const float* probs,
                      int64_t rows, int Tk);
// Backend::attention_softmax_dropout_forward / _backward. probs is bf16 when probs_bf16 (fp32
// otherwise); threshold, keep_scale as for dropout (p == 0: threshold 0, keep_scale 1, which
// copies); the seed is derive_seed(seed, *step) when step is not null, read when the kernel runs.
void attention_softmax_dropout_forward(const Ctx& c, void* probs, bool probs_bf16, float* dropped,
                                       const float* scores, const float* bias,
                                       const float* key_mask, int B, int H, int Tq, int Tk,
                                       bool causal, uint32_t threshold, float keep_scale,
                                       uint64_t seed, const uint64_t* step);
void attention_softmax_dropout_backward(const Ctx& c, float* dscores, float* dbias,
                                        const float* dprobs, const float* probs, int B, int H,
                                        int Tq, int Tk, bool round_bf16, uint32_t threshold,
                                        float keep_scale, uint64_t seed, const uint64_t* step);

// ---- loss, router, dispatch (loss_router.cu) ----------------------------------------------------
void cross_entropy_forward(const Ctx& c, float* loss, float* lse, const float* logits,
                           const int32_t* labels, int64_t N, int V);
void cross_entropy_backward(const Ctx& c, float* dlogits, const float* logits, const float* lse,
                            const int32_t* labels, int64_t N, int V, float scale,
                            const float* scale_by, float z_coef);
// Positions by a deterministic scan per group (lowest token index first, exactly the CPU order),
// then each expert's kept tokens packed group after group, with the offsets in ctx.workspace
// (as many groups at a time as it holds: more than one pass when G*E > 2^20).
void router_forward(const Ctx& c, float* probs, float* lse, int32_t* expert, int32_t* slot,
                    int32_t* rows, float* gate, float* counts, const float* logits, int G, int S,
                    int E, int C);
void router_balance_loss(const Ctx& c, float* lb, const float* probs, const float* counts, int G,
                         int S, int E);
void router_backward(const Ctx& c, float* dlogits, const float* probs, const float* lse,
                     const int32_t* expert, const float* dgate, const float* counts, int G, int S,
                     int E, float lb_scale, float z_scale);
void moe_dispatch(const Ctx& c, float* buf, const float* x, const int32_t* expert,
                  const int32_t* slot, int64_t T, int D, int E, int GC);
void moe_dispatch_backward(const Ctx& c, float* dx, const float* dbuf, const int32_t* expert,
                           const int32_t* slot, int64_t T, int D, int GC);
void moe_combine(const Ctx& c, float* out, const float* buf, const float* gate,
                 const int32_t* expert, const int32_t* slot, int64_t T, int D, int GC);
void moe_combine_backward(const Ctx& c, float* dbuf, float* dgate, const float* dout,
                          const float* buf, const float* gate, const int32_t* expert,
                          const int32_t* slot, int64_t T, int D, int E, int GC);

// ---- optimizers (optim.cu) ----------------------------------------------------------------------
// p_bf16 may be null (fp32 training); otherwise the bf16 compute copy, written in the same pass.
void adamw_update(const Ctx& c, float* p, uint16_t* p_bf16, const float* g, float* m, float* v,
                  int64_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                  float bc1, float bc2);
void adafactor_update(const Ctx& c, float* p, uint16_t* p_bf16, const float* g, float* vr,
                      float* vc, float* v, bool factored, int count, int R, int C, float lr,
                      float beta2t, float eps1, float clip, float weight_decay, float eps2);

}  // namespace switcht5::cuda
