// The Backend interface: every operation the model and optimizers perform on tensors.
//
// Model code calls only this interface (STYLE habit 3): it never touches a raw loop over tensor
// data, so the same model runs on the reference backend (plain loops, the oracle every other
// backend is tested against), the CPU backend (oneDNN sgemm + OpenMP), and later CUDA.
//
// Conventions
// - Pointers are backend memory (host memory on CPU backends, device memory on CUDA). Only
//   copy_to_host / copy_to_device cross that boundary: code outside a backend never dereferences
//   backend memory, except where host_accessible() says the host may (checkpoints then skip
//   their host staging). tests/test_device_memory.cpp holds everything else to it.
// - Every matrix is row-major. Shapes are written [dim0, dim1, ...], the last dim contiguous.
// - Activation gradients (dx, dscores, ...) are ASSIGNED; parameter gradients (dw, dtable, ...)
//   are ACCUMULATED with +=, as in llm.c, so several uses of a parameter can add up.
// - Every reduction sums in a fixed order that depends only on the shapes, never on thread
//   count or scheduling: same inputs give bitwise the same outputs on a given backend. The one
//   exception is gemm on the CPU backend: oneDNN's sgemm blocks K differently for different
//   thread counts, so it is bitwise repeatable only at a fixed thread count.
// - Masks are float: 1 = attend/keep, 0 = masked.
// - Integer tensors are int32.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "core/dtype.h"
#include "core/rng.h"

namespace switcht5 {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // Whether the host may dereference this backend's pointers (its memory is host memory).
  virtual bool host_accessible() const = 0;

  // ---- memory ------------------------------------------------------------------------------
  virtual void* alloc_bytes(size_t bytes) = 0;  // zero-initialised, 64-byte aligned (CUDA: 256)
  virtual void free_bytes(void* ptr) = 0;
  // Host <-> backend copies, synchronous on the host side: copy_to_host returns with the data
  // in `dst`, copy_to_device returns when `src` may be overwritten (checkpoint staging reuses
  // one host buffer for consecutive copies).
  virtual void copy_to_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy_to_device(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;  // device to device
  virtual void fill(float* x, float value, int64_t n) = 0;
  virtual void zero_bytes(void* x, size_t bytes) = 0;  // any dtype: all bits 0 (0.0, 0)
  virtual void synchronize() {}

  // ---- recorded work (CUDA graphs, train.cuda_graphs) -------------------------------------------
  // A backend that records (can_record()): the ops issued between begin_recording() and
  // end_recording() are recorded, not run, and replay() runs the recording again, as often as
  // asked: the same ops on the same pointers with the same by-value arguments. So anything that
  // changes between replays must be read from backend memory when the op runs (RandomKey's step
  // counter, cross_entropy_backward's scale_by, inputs copied in before replay()). While
  // recording, the calls that involve the host (copy_to_host, copy_to_device, synchronize, sum,
  // sum_squares, count_nonfinite) are errors, and memory freed is kept until the recording is
  // discarded (the recording still uses it; allocations are allowed). One recording per backend:
  // begin_recording() discards the previous one. Backends that cannot record throw Error.
  virtual bool can_record() const { return false; }
  virtual void begin_recording();
  virtual void end_recording();
  virtual void replay();

  // The backend memory this backend holds, as it holds it: every live block rounded up to the
  // backend's block_bytes (64 on the CPU, 256 in the CUDA arena), which is how `switcht5 plan`
  // counts (train/memory_plan.h), so bench_step can hold a run's peak to its plan. Transient
  // blocks are those a backend takes and frees inside one op (the CUDA backend's GEMM widening
  // scratch, cuda_backend.h), which the plan does not count:
  //   peak <= held_peak + transient_peak,   held_peak <= peak.
  struct MemoryCounts {
    bool counted = false;        // false: this backend does not count (reference); all 0
    int64_t block_bytes = 0;
    int64_t in_use = 0;          // bytes of live blocks now
    int64_t live_blocks = 0;
    int64_t peak = 0;            // the most bytes ever live (CUDA: the arena's high-water mark)
    int64_t held_peak = 0;       // the most ever live outside transient blocks
    int64_t transient_peak = 0;  // the most transient bytes ever live at once
  };
  virtual MemoryCounts memory_counts() const { return {}; }
  // The bytes this backend can give one run before an allocation fails, known without
  // allocating: the CUDA arena (reserved, or the size it will reserve: cuda_memory.h). 0 for
  // backends in host memory, which the trainer checks against the host's available memory
  // (train/memory_plan.h, require_memory_fits).
  virtual int64_t memory_capacity() const { return 0; }
  // The device's peak matmul FLOP/s for operands of `dtype` (dense, no sparsity), for the MFU
  // the progress line shows; 0 when unknown (CPUs: it depends on the kernel chosen and clocks).
  virtual double peak_flops(DType dtype) const { return 0.0; }

  // ---- GEMM ---------------------------------------------------------------------------------
  // For each b in [0, batch):
  //   C_b[M,N] = alpha * op(A_b) * op(B_b) + beta * C_b,   op(X) = X or X^T
  // where A_b = A + b*stride_a is [M,K] (or [K,M] when trans_a) with leading dimension lda,
  // B_b = B + b*stride_b is [K,N] (or [N,K] when trans_b) with leading dimension ldb,
  // C_b = C + b*stride_c is [M,N] with leading dimension ldc. beta == 0 ignores C's contents.
  virtual void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                    const float* A, int lda, int64_t stride_a, const float* B, int ldb,
                    int64_t stride_b, float beta, float* C, int ldc, int64_t stride_c,
                    int batch) = 0;

  // Mixed precision: gemm with an element type per operand. A and B are each fp32 or bf16, C is
  // fp32 or bf16 (strides and leading dimensions count elements of the operand's type).
  // Products are formed and summed in fp32 (a bf16 x bf16 product is exact in fp32), then
  //   C = alpha * op(A) op(B) + beta * C     in fp32, rounded once to bf16 (nearest even) when C
  // is bf16. gemm() above is the all-fp32 case. Entries of C outside the M x N blocks are left
  // untouched; beta == 0 ignores C's contents.
  virtual void gemm_ex(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                       const void* A, DType a_type, int lda, int64_t stride_a, const void* B,
                       DType b_type, int ldb, int64_t stride_b, float beta, void* C,
                       DType c_type, int ldc, int64_t stride_c, int batch) = 0;
  // gemm_ex with an fp32 C, then the squares of what it stored, into backend memory:
  //   acc[0] += sum_b sum_{m<M, n<N} C_b[m,n]^2        (in double, as accumulate_sum_squares)
  // A weight-gradient GEMM that makes a gradient final squares it here for the gradient norm
  // while it is still in cache, instead of a later pass reading it back from memory. The
  // default is gemm_ex, then accumulate_sum_squares over the blocks (one call when they lie
  // back to back); a backend that can take each block's squares right after computing it
  // overrides this (the CPU: each block's sum, added to acc[0] block by block).
  virtual void gemm_ex_sum_squares(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                                   const void* A, DType a_type, int lda, int64_t stride_a,
                                   const void* B, DType b_type, int ldb, int64_t stride_b,
                                   float beta, float* C, int ldc, int64_t stride_c, int batch,
                                   double* acc);
  // gemm_ex over a batch whose A_b is zero past its first a_rows[b] rows as stored (rows of
  // [M,K], or of [K,M] when trans_a): the experts' capacity buffers, whose rows past an expert's
  // kept tokens are empty (router_forward's rows). a_rows is backend memory, int32 [batch],
  // 0 <= a_rows[b] <= M (K when trans_a). The result is the full product's; a backend may skip
  // the zero rows: C_b's rows from a_rows[b] on are then beta * C_b (not trans_a), or the sum
  // runs over the first a_rows[b] terms of K (trans_a). With `squares` (C fp32), also
  // squares[0] += the squares of what it stored, as gemm_ex_sum_squares. The default runs the
  // full product (gemm_ex or gemm_ex_sum_squares); the CPU skips the rows.
  virtual void gemm_ex_rows(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                            const void* A, DType a_type, int lda, int64_t stride_a,
                            const void* B, DType b_type, int ldb, int64_t stride_b, float beta,
                            void* C, DType c_type, int ldc, int64_t stride_c, int batch,
                            const int32_t* a_rows, double* squares);
  // out[i] = in[i] as out_type: fp32 -> bf16 rounds to nearest even (core/dtype.h), bf16 ->
  // fp32 is exact, equal types copy. Only fp32 and bf16. out must not overlap in.
  virtual void cast(void* out, DType out_type, const void* in, DType in_type, int64_t n) = 0;
  // x[i] = round_to_bf16(x[i]) in place: the value a bf16 store keeps, in an fp32 buffer. The
  // bf16 training mode rounds its activations here, at the points where a GPU kernel stores a
  // bf16 result, while their buffers are still fp32.
  virtual void round_to_bf16(float* x, int64_t n) = 0;

  // ---- elementwise and reductions -------------------------------------------------------------
  virtual void add(float* out, const float* a, const float* b, int64_t n) = 0;  // out = a + b; out may alias a or b
  virtual void axpy(float* y, float alpha, const float* x, int64_t n) = 0;      // y += alpha * x
  virtual void scale(float* x, float alpha, int64_t n) = 0;                      // x *= alpha
  virtual double sum(const float* x, int64_t n) = 0;                              // returned to the host
  virtual double sum_squares(const float* x, int64_t n) = 0;                      // sum x^2, to the host
  // out[i] += sum_b in[b*n + i] for i < n (b in order): reduces a per-batch gradient, e.g. the
  // position-bias gradient [B,H,Tq,Tk] -> [H,Tq,Tk].
  virtual void sum_over_batch(float* out, const float* in, int batch, int64_t n) = 0;
  // Number of non-finite (NaN or Inf) entries, to the host.
  virtual int64_t count_nonfinite(const float* x, int64_t n) = 0;

  // ---- statistics accumulated in backend memory ----------------------------------------------
  // A training step adds its losses, router statistics and gradient norms into one backend
  // array of doubles and reads it back once (copy_to_host) at the end of the step, instead of
  // returning every sum to the host as it is made. `acc` is backend memory; each op ADDS to it,
  // in double, in an order that depends on the shapes only.
  //   acc[0] += sum_i x[i]^2
  virtual void accumulate_sum_squares(double* acc, const float* x, int64_t n) = 0;
  // Cross-entropy of N rows (labels -100 ignored; their loss is 0):
  //   acc[0] += sum_r loss[r];  acc[1] += sum_{r: label >= 0} lse[r]^2;  acc[2] += #{r: label >= 0}
  virtual void accumulate_loss_statistics(double* acc, const float* loss, const float* lse,
                                          const int32_t* labels, int64_t N) = 0;
  // One router call over G groups of S tokens (T = G*S), E experts, capacity C (RouterStatsSlot
  // in model/router.h names the entries):
  //   acc[0] += (1/G) sum_g lb[g]            load-balancing loss of the call (lb is [G])
  //   acc[1] += (1/T) sum_t lse[t]^2         router z-loss of the call (lse is [T])
  //   acc[2] += 1                            calls
  //   acc[3] += T                            routed tokens
  //   acc[4] += sum_{g,e} max(0, counts[g,e] - C)    tokens past capacity (dropped)
  //   acc[5 + e] += sum_g counts[g,e]        tokens whose top-1 is e (counts is [G,E])
  virtual void accumulate_router_statistics(double* acc, const float* lb, const float* lse,
                                            const float* counts, int G, int S, int E, int C) = 0;
  // How sure one router call is, over its T tokens (probs, logits [T,E], lse [T] of the same
  // call; p1 >= p2 the two largest probabilities of token t, p2 = 0 when E = 1):
  //   acc[0] += (1/T) sum_t H_t,   H_t = -sum_e p_e log p_e = lse_t - sum_e p_e logit_e  (nats)
  //   acc[1] += (1/T) sum_t p1_t                      mean top-1 probability
  //   acc[2] += (1/T) sum_t (p1_t - p2_t)             mean top-1 / top-2 margin
  // (RouterStatsSlot in model/router.h: the entries after the per-expert counts.)
  virtual void accumulate_router_confidence(double* acc, const float* probs, const float* logits,
                                            const float* lse, int64_t T, int E) = 0;

  // Host synchronisations so far: calls that wait for the backend and hand data to the host
  // (copy_to_host, sum, sum_squares, count_nonfinite). The benchmark reports them per step.
  // A backend that wraps another reports the inner one's count.
  virtual int64_t host_syncs() const { return host_syncs_; }

  // ---- layout ---------------------------------------------------------------------------------
  // out[a,c,b,d] = in[a,b,c,d] for in of shape [A,B,C,D]. Its own inverse with B and C swapped:
  // used to go between [batch, seq, heads, d_kv] and [batch, heads, seq, d_kv].
  virtual void permute_0213(float* out, const float* in, int A, int B, int C, int D) = 0;

  // ---- embedding ------------------------------------------------------------------------------
  // out[t,:] = table[ids[t],:]; table is [V,D], out is [n,D].
  virtual void embedding_forward(float* out, const int32_t* ids, const float* table, int64_t n,
                                 int D) = 0;
  // dtable[ids[t],:] += dout[t,:], tokens in increasing t for every row (deterministic).
  virtual void embedding_backward(float* dtable, const int32_t* ids, const float* dout, int64_t n,
                                  int D, int V) = 0;

  // ---- T5 RMSNorm -------------------------------------------------------------------------------
  // rstd[r] = 1 / sqrt(mean_j x[r,j]^2 + eps);  out[r,j] = x[r,j] * rstd[r] * w[j]
  // x and out are [N,D] (out must not alias x), rstd is [N] (kept for backward), w is [D].
  virtual void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N,
                               int D, float eps) = 0;
  // dx = rstd*w*dout - x * rstd^3 * mean_j(dout*w*x);  dw[j] += sum_r dout[r,j]*x[r,j]*rstd[r]
  virtual void rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x,
                                const float* w, const float* rstd, int64_t N, int D) = 0;

  // ---- attention --------------------------------------------------------------------------------
  // T5 attention weights (no 1/sqrt(d_kv) scaling; that is folded into the q initialisation):
  //   probs[b,h,i,j] = softmax_j( scores[b,h,i,j] + bias[h,i,j] )   over allowed j
  // where j is allowed iff (key_mask == null or key_mask[b,j] != 0) and (!causal or j <= i).
  // Disallowed entries get probability 0; a row with no allowed key is all zeros.
  // scores/probs are [B,H,Tq,Tk] (may alias); bias is [H,Tq,Tk] or null; key_mask [B,Tk] or null.
  virtual void attention_softmax_forward(float* probs, const float* scores, const float* bias,
                                         const float* key_mask, int B, int H, int Tq, int Tk,
                                         bool causal) = 0;
  // Softmax backward per row of length Tk: dscores = probs * (dprobs - sum_j dprobs*probs).
  // dscores may alias dprobs. Masked entries come out 0 because their prob is 0.
  virtual void softmax_backward(float* dscores, const float* dprobs, const float* probs,
                                int64_t rows, int Tk) = 0;

  // The attention core as the model runs it: bias, masks, softmax and dropout in one pass over
  // each row, bitwise the composition of the ops above (what the CPU backend's model computed
  // before this op existed, so training numbers do not move). Shapes as above.
  //   probs   = attention_softmax_forward(scores, bias, key_mask, causal)
  //   dropped = dropout(probs, p, key)     (Backend::dropout over the whole [B,H,Tq,Tk] tensor:
  //                                         element (b,h,i,j) draws random16(s, index of b,h,i,j);
  //                                         p == 0 copies)
  // probs_type is fp32 or bf16. bf16 (train.precision: bf16) stores probs as bf16 and drops out
  // the rounded probs, rounding dropped to bf16 values too (it stays fp32 storage: a GEMM
  // operand), i.e. the composition
  //   attention_softmax_forward; round_to_bf16; cast to bf16 (probs); dropout; round_to_bf16.
  // dropped may be null when p == 0. An fp32 probs, or dropped, may alias scores (not each other).
  virtual void attention_softmax_dropout_forward(void* probs, DType probs_type, float* dropped,
                                                 const float* scores, const float* bias,
                                                 const float* key_mask, int B, int H, int Tq,
                                                 int Tk, bool causal, float p, RandomKey key) = 0;
  // Its backward, with the position-bias gradient (probs is the forward's, fp32):
  //   g       = dropout(dprobs, p, key)               (the forward's mask: same key, same index)
  //   d       = softmax_backward(g, probs)            per row of Tk
  //   dbias  += sum_over_batch(d)   when dbias ([H,Tq,Tk]) is not null: in double, b in order
  //   dscores = round_bf16 ? round_to_bf16(d) : d     (dbias sums the unrounded d)
  // dscores may alias dprobs.
  virtual void attention_softmax_dropout_backward(float* dscores, float* dbias,
                                                  const float* dprobs, const float* probs, int B,
                                                  int H, int Tq, int Tk, float p, RandomKey key,
                                                  bool round_bf16) = 0;

  // The fp32 attention core between the head-major projections and the context, over the B*H
  // independent (b,h) problems: q [B,H,Tq,K], k and v [B,H,Tk,K], ctx [B,H,Tq,K],
  //   scores = q k^T                          per (b,h), [Tq,Tk], written in probs
  //   attention_softmax_dropout_forward(probs, fp32, dropped, scores, bias, key_mask, B, H, Tq,
  //                                     Tk, causal, p, key)   (dropped = work when p > 0)
  //   ctx    = dropped v     (probs v when p == 0)
  // probs [B,H,Tq,Tk] is kept for the backward; work is [B,H,Tq,Tk] floats of scratch. The default
  // is that composition of the ops above; a backend may override it with a schedule that keeps
  // each (b,h) problem in cache from its scores to its context, and must then give bitwise the
  // composition's outputs (the CPU backend does; tests/test_backend_ops.cpp holds it to that).
  virtual void attention_core_forward(float* probs, float* ctx, const float* q, const float* k,
                                      const float* v, const float* bias, const float* key_mask,
                                      int B, int H, int Tq, int Tk, int K, bool causal, float p,
                                      RandomKey key, float* work);
  // Its backward, from dctx [B,H,Tq,K] and the forward's probs, q, k, v:
  //   pd     = dropout(probs, p, key)            (p > 0; the forward's mask, in work)
  //   dv     = pd^T dctx                         (probs^T dctx when p == 0)
  //   dprobs = dctx v^T                          (in work)
  //   attention_softmax_dropout_backward(dscores = work, dbias, dprobs, probs, ..., p, key,
  //                                      round_bf16 = false)     (dbias [H,Tq,Tk] or null)
  //   dq     = dscores k,   dk = dscores^T q
  // dq, dk, dv are assigned (head-major like q, k, v); dbias accumulates. dq may alias dctx (each
  // (b,h) problem reads its dctx before it writes its dq); nothing else may alias.
  virtual void attention_core_backward(float* dq, float* dk, float* dv, float* dbias,
                                       const float* dctx, const float* probs, const float* q,
                                       const float* k, const float* v, int B, int H, int Tq,
                                       int Tk, int K, float p, RandomKey key, float* work);

  // T5 relative position bias, gathered from a [num_buckets, H] table:
  //   bias[h,i,j] = table[buckets[i,j], h]       buckets is [Tq,Tk] (int32), bias [H,Tq,Tk]
  virtual void relpos_bias_forward(float* bias, const float* table, const int32_t* buckets, int H,
                                   int Tq, int Tk) = 0;
  // dtable[buckets[i,j], h] += dbias[h,i,j], summed in (i,j) order.
  virtual void relpos_bias_backward(float* dtable, const float* dbias, const int32_t* buckets,
                                    int H, int Tq, int Tk, int num_buckets) = 0;

  // ---- activations --------------------------------------------------------------------------------
  virtual void relu_forward(float* out, const float* x, int64_t n) = 0;  // out may alias x
  // dx = dout * (x > 0); dx may alias dout.
  virtual void relu_backward(float* dx, const float* dout, const float* x, int64_t n) = 0;
  // The feed-forward hidden layer's relu and dropout, as the compositions
  //   relu_dropout_forward:  out = dropout(relu_forward(x), p, key)        (p == 0: relu only)
  //   relu_dropout_backward: dx = relu_backward(dropout(dout, p, key), x)  (p == 0: relu only)
  // with dropout's element indexing over the whole tensor. Defaults: those compositions; a
  // backend that fuses them into one pass must give bitwise the same outputs. out may alias x,
  // dx may alias dout.
  virtual void relu_dropout_forward(float* out, const float* x, int64_t n, float p,
                                    RandomKey key);
  virtual void relu_dropout_backward(float* dx, const float* dout, const float* x, int64_t n,
                                     float p, RandomKey key);
  // out = gelu_tanh(a) * b, gelu_tanh(a) = 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))
  // (HF "gelu_new", T5 1.1's gated-gelu). out may alias a or b.
  virtual void gated_gelu_forward(float* out, const float* a, const float* b, int64_t n) = 0;
  // da = dout * b * gelu'(a); db = dout * gelu(a). da/db must not alias a/b.
  virtual void gated_gelu_backward(float* da, float* db, const float* dout, const float* a,
                                   const float* b, int64_t n) = 0;

  // ---- randomness (counter-based, see core/rng.h) -----------------------------------------------
  // `key` gives the stream's seed s: key.seed, or derive_seed(key.seed, *key.step) when the key
  // carries a step counter in backend memory, read when the op runs (RandomKey, core/rng.h).
  // Inverted dropout: out[i] = x[i] / (1-p) if random16(s, i) >= dropout_threshold(p) else 0
  // (core/rng.h). Its backward is the same call on dout with the same key. p == 0 copies.
  // out may alias x.
  virtual void dropout(float* out, const float* x, int64_t n, float p, RandomKey key) = 0;
  // Multiplicative jitter: out[i] = x[i] * (1 - eps + 2*eps*uniform01(s, offset + i)). Linear
  // in x, so its backward is the same call on dout with the same key and offset. `offset` places
  // this tensor in a larger logical one (a rank's rows of the global batch), so the noise a token
  // gets does not depend on how the batch is split. out may alias x.
  virtual void uniform_jitter(float* out, const float* x, int64_t n, float eps, RandomKey key,
                              uint64_t offset = 0) = 0;

  // ---- loss -------------------------------------------------------------------------------------
  // Per row r of logits [N,V]: lse[r] = logsumexp_v logits[r,v]; loss[r] = lse[r] - logits[r,label]
  // for labels[r] >= 0; rows with label -100 (ignored) get loss 0 (lse is still written).
  virtual void cross_entropy_forward(float* loss, float* lse, const float* logits,
                                     const int32_t* labels, int64_t N, int V) = 0;
  // Gradient of  s * sum_{r not ignored} (loss[r] + z_coef * lse[r]^2)  w.r.t. the logits:
  //   dlogits[r,v] = s * (softmax[r,v] * (1 + 2 z_coef lse[r]) - [v == label[r]])
  // and 0 on ignored rows, with s = scale * *scale_by (float product) when scale_by (backend
  // memory, one float, read when the op runs: a per-step value a recorded step replays with)
  // is not null, else s = scale. dlogits may alias logits.
  virtual void cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                                      const int32_t* labels, int64_t N, int V, float scale,
                                      const float* scale_by, float z_coef) = 0;

  // ---- Switch router and token dispatch -----------------------------------------------------------
  // Legend: G groups of S tokens (T = G*S tokens, token t = g*S + s), E experts, capacity C
  // tokens per expert per group. An expert's buffer holds G*C rows: its kept tokens first, group
  // by group and in token order within a group, then empty rows. Which tokens are kept is decided
  // per group (at most C each, as in the paper); packing them to the front lets a backend skip
  // the empty rows of the experts' products (gemm_ex_rows).
  //
  // router_forward, per token t of logits [T,E] (float32):
  //   probs[t,:] = softmax(logits[t,:]);  lse[t] = logsumexp(logits[t,:])
  //   expert[t]  = argmax_e probs[t,e] (lowest index on ties);  gate[t] = probs[t, expert[t]]
  //   position   = number of tokens s' < s of the same group with the same expert
  //   counts[g,e] = number of tokens of group g whose top-1 is e, before dropping (float)
  //   kept[g,e]  = min(counts[g,e], C)
  //   slot[t]    = sum_{g' < g} kept[g',e] + position if position < C, else -1 (dropped: the
  //                token skips the expert), e = expert[t]
  //   rows[e]    = sum_g kept[g,e]: the rows of expert e's buffer that hold tokens (int32, [E])
  virtual void router_forward(float* probs, float* lse, int32_t* expert, int32_t* slot,
                              int32_t* rows, float* gate, float* counts, const float* logits,
                              int G, int S, int E, int C) = 0;
  // Load-balancing loss per group (Switch eq. 4): lb[g] = E * sum_e f[g,e] * P[g,e] with
  //   f[g,e] = counts[g,e] / S,   P[g,e] = (1/S) * sum_s probs[g*S+s, e].   lb is [G].
  virtual void router_balance_loss(float* lb, const float* probs, const float* counts, int G,
                                   int S, int E) = 0;
  // Router backward. The objective's router-dependent part is
  //   lb_scale * sum_g lb[g]  +  z_scale * sum_t lse[t]^2  +  sum_t dgate[t] * gate[t]
  // (f is a count, not differentiable). Hence
  //   dprobs[t,e] = lb_scale * E * counts[g,e] / S^2  +  [e == expert[t]] * dgate[t]
  //   dlogits[t,e] = probs*(dprobs - sum_e' dprobs*probs) + z_scale * 2 * lse[t] * probs[t,e]
  // dgate is [T] (0 for dropped tokens); dlogits is [T,E] (assigned).
  virtual void router_backward(float* dlogits, const float* probs, const float* lse,
                               const int32_t* expert, const float* dgate, const float* counts,
                               int G, int S, int E, float lb_scale, float z_scale) = 0;
  // buf[e, r, :] = x[t, :] where e = expert[t], r = slot[t] >= 0; every other row of buf is 0.
  // x is [T,D], buf is [E, GC, D].
  virtual void moe_dispatch(float* buf, const float* x, const int32_t* expert,
                            const int32_t* slot, int64_t T, int D, int E, int GC) = 0;
  // dx[t,:] = dbuf[expert[t], slot[t], :] for kept tokens, 0 for dropped ones.
  virtual void moe_dispatch_backward(float* dx, const float* dbuf, const int32_t* expert,
                                     const int32_t* slot, int64_t T, int D, int GC) = 0;
  // out[t,:] = gate[t] * buf[expert[t], slot[t], :] for kept tokens, 0 for dropped ones.
  virtual void moe_combine(float* out, const float* buf, const float* gate, const int32_t* expert,
                           const int32_t* slot, int64_t T, int D, int GC) = 0;
  // dbuf[e,r,:] = gate[t] * dout[t,:] for the token t in (e,r), 0 for empty rows (dbuf is
  // [E,GC,D], fully written); dgate[t] = <dout[t,:], buf[e,r,:]> (0 for dropped tokens).
  virtual void moe_combine_backward(float* dbuf, float* dgate, const float* dout, const float* buf,
                                    const float* gate, const int32_t* expert, const int32_t* slot,
                                    int64_t T, int D, int E, int GC) = 0;

  // ---- optimizers ----------------------------------------------------------------------------------
  // AdamW (Loshchilov & Hutter), decoupled weight decay:
  //   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
  //   p -= lr * ( (m / bc1) / (sqrt(v / bc2) + eps) + wd * p )      bc1 = 1-b1^t, bc2 = 1-b2^t
  // Both optimizers: when p_bf16 is not null, p_bf16[i] = float_to_bf16(new p[i]) (nearest
  // even) in the same pass: the bf16 compute copy the next step's GEMMs read (bitwise what a
  // cast after the update gives). p_bf16 has p's layout.
  virtual void adamw_update(float* p, uint16_t* p_bf16, const float* g, float* m, float* v,
                            int64_t n, float lr, float beta1, float beta2, float eps,
                            float weight_decay, float bc1, float bc2) = 0;
  // Adafactor (Shazeer & Stern 2018) as T5 uses it: no momentum, external learning rate.
  // p and g hold `count` independent matrices of [R,C] (a stacked expert tensor is E matrices).
  // factored (vr is [count,R], vc is [count,C], v unused):
  //   g2 = g^2 + eps1
  //   vr = beta2t vr + (1-beta2t) mean_c g2;   vc = beta2t vc + (1-beta2t) mean_r g2
  //   u  = g / sqrt( (vr / mean_r vr) outer vc )
  // unfactored (v is [count,R*C], vr/vc unused):
  //   v = beta2t v + (1-beta2t) g2;   u = g / sqrt(v)
  // then per matrix: u /= max(1, rms(u) / clip);  p -= lr_k * (u + weight_decay * p), where
  //   lr_k = lr * max(eps2, rms(p))  when eps2 > 0 (the parameter scale: HF's scale_parameter,
  //                                  T5X's multiply_by_parameter_scale; rms of the matrix
  //                                  before this step)
  //   lr_k = lr                      when eps2 == 0
  virtual void adafactor_update(float* p, uint16_t* p_bf16, const float* g, float* vr, float* vc,
                                float* v, bool factored, int count, int R, int C, float lr,
                                float beta2t, float eps1, float clip, float weight_decay,
                                float eps2) = 0;

 protected:
  void count_host_sync() { ++host_syncs_; }

 private:
  int64_t host_syncs_ = 0;
};

// Where a process's backend runs, decided by the trainer from the process grid.
struct BackendOptions {
  // This process's rank among the job's processes on its node (ProcessGrid::local_rank). The
  // CUDA backend takes device local_rank % (number of visible devices): one rank per GPU over a
  // node's GPUs, and CUDA_VISIBLE_DEVICES or a scheduler's per-task GPU binding (one visible
  // device per rank: device 0) is respected because the runtime only counts visible devices.
  int local_rank = 0;
};

// Backends by name: "reference" (plain loops, double accumulation, single thread: the oracle),
// "cpu" (oneDNN sgemm + OpenMP) and "cuda" (backend/cuda/cuda_backend.h; in a build with the
// CUDA backend and a visible GPU). Throws UserError for an unknown name, for "cuda" in a build
// without it, and for "cuda" when no GPU is visible.
std::unique_ptr<Backend> make_backend(const std::string& name, const BackendOptions& options = {});

// What builds a trainer's backend from train.backend: make_backend, or a test's substitute
// (tests/guarded_backend.h wraps a backend so that the host cannot read its memory), passed
// in explicitly (Trainer, TrainOptions) rather than registered globally.
using BackendFactory = std::function<std::unique_ptr<Backend>(const std::string& name,
                                                              const BackendOptions& options)>;

// A typed array in backend memory, freed on destruction. Move-only.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(Backend& be, int64_t n)
      : be_(&be), n_(n), ptr_(static_cast<T*>(n > 0 ? be.alloc_bytes(sizeof(T) * n) : nullptr)) {}
  DeviceArray(DeviceArray&& o) noexcept : be_(o.be_), n_(o.n_), ptr_(o.ptr_) { o.ptr_ = nullptr; o.n_ = 0; }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) { reset(); be_ = o.be_; n_ = o.n_; ptr_ = o.ptr_; o.ptr_ = nullptr; o.n_ = 0; }
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { reset(); }
  void reset() { if (ptr_) be_->free_bytes(ptr_); ptr_ = nullptr; n_ = 0; }
  T* data() { return ptr_; }
  const T* data() const { return ptr_; }
  int64_t size() const { return n_; }
  size_t bytes() const { return sizeof(T) * static_cast<size_t>(n_); }

 private:
  Backend* be_ = nullptr;
  int64_t n_ = 0;
  T* ptr_ = nullptr;
};

}  // namespace switcht5
