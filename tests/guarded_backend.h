// GuardedBackend: a stand-in for a device backend, for tests. It wraps a host backend (cpu or
// reference) and hands out "device pointers" the host cannot dereference: every pointer from
// alloc_bytes is the wrapped backend's pointer plus kDeviceBit (bit 55), an address no process
// maps (x86-64: non-canonical under 4-level paging, never handed out under 5-level; AArch64:
// the kernel half), so any read or write through it outside the backend ends the process with
// SIGSEGV, as reading CUDA device memory on the host would. Pointer arithmetic on such
// pointers still works: a block at p + offset translates to the wrapped pointer + offset.
//
// Every op translates its pointers back and forwards to the wrapped backend, so results are
// bitwise those of the wrapped backend. copy_to_host / copy_to_device translate their device
// side only, and host_accessible() is false: checkpoints stage through the host. An op handed a
// host pointer where device memory belongs (or copy_to_host a device destination) throws Error,
// which catches host buffers passed to device ops, a mix-up the real device would not forgive.
//
// It also counts the bytes of its live allocations and their peak, as requested (tests/
// test_plan.cpp holds `switcht5 plan`'s memory plan to what a real Trainer allocates).
//
// Selected where the trainer builds its backend, with no global registration: pass
// guarded_backend_factory() as Trainer's make_backend_named or TrainOptions::make_backend_named.
#pragma once
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <functional>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "core/check.h"

namespace switcht5::testing {

class GuardedBackend final : public Backend {
 public:
  static constexpr uintptr_t kDeviceBit = uintptr_t{1} << 55;

  explicit GuardedBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {
    SWT_CHECK(inner_->host_accessible(), "GuardedBackend wraps a host backend, not {}",
              inner_->name());
  }
  std::string name() const override { return "guarded(" + inner_->name() + ")"; }
  bool host_accessible() const override { return false; }

  // Whether `p` is (within) memory of some GuardedBackend.
  static bool is_device(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & kDeviceBit) != 0;
  }

  // ---- memory -----------------------------------------------------------------------------------
  void* alloc_bytes(size_t bytes) override {
    void* p = to_device(inner_->alloc_bytes(bytes));
    if (recording_) recorded_blocks_.insert(p);
    live_[p] = bytes;
    requested_ += bytes;
    peak_requested_ = std::max(peak_requested_, requested_);
    return p;
  }
  void free_bytes(void* ptr) override {
    if (!ptr) return;
    auto it = live_.find(ptr);
    SWT_CHECK(it != live_.end(), "GuardedBackend::free_bytes({}): not a live allocation", ptr);
    requested_ -= it->second;
    live_.erase(it);
    if (recording_ || recorded_blocks_.count(ptr)) {
      kept_.push_back(ptr);  // the recording may use it on every replay (as CudaBackend)
      return;
    }
    inner_->free_bytes(host(ptr));
  }
  // Bytes of the live allocations (as requested), and the most ever live.
  size_t requested_bytes() const { return requested_; }
  size_t peak_requested_bytes() const { return peak_requested_; }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    not_recording("copy_to_host");
    SWT_CHECK(!is_device(dst), "copy_to_host into device memory");
    inner_->copy_to_host(dst, host(src), bytes);
  }
  void copy_to_device(void* dst, const void* src, size_t bytes) override {
    not_recording("copy_to_device");
    SWT_CHECK(!is_device(src), "copy_to_device from device memory");
    inner_->copy_to_device(host(dst), src, bytes);
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    run([=, this] { inner_->copy(host(dst), host(src), bytes); });
  }
  void fill(float* x, float value, int64_t n) override {
    run([=, this] { inner_->fill(host(x), value, n); });
  }
  void zero_bytes(void* x, size_t bytes) override {
    run([=, this] { inner_->zero_bytes(host(x), bytes); });
  }
  void gemm_ex(bool ta, bool tb, int M, int N, int K, float alpha, const void* A, DType at,
               int lda, int64_t sa, const void* B, DType bt, int ldb, int64_t sb, float beta,
               void* C, DType ct, int ldc, int64_t sc, int batch) override {
    run([=, this] { inner_->gemm_ex(ta, tb, M, N, K, alpha, host(A), at, lda, sa, host(B), bt, ldb, sb, beta,
                    host(C), ct, ldc, sc, batch); });
  }
  void gemm_ex_sum_squares(bool ta, bool tb, int M, int N, int K, float alpha, const void* A,
                           DType at, int lda, int64_t sa, const void* B, DType bt, int ldb,
                           int64_t sb, float beta, float* C, int ldc, int64_t sc, int batch,
                           double* acc) override {
    run([=, this] { inner_->gemm_ex_sum_squares(ta, tb, M, N, K, alpha, host(A), at, lda, sa, host(B), bt,
                    ldb, sb, beta, host(C), ldc, sc, batch, host(acc)); });
  }
  void gemm_ex_rows(bool ta, bool tb, int M, int N, int K, float alpha, const void* A, DType at,
                    int lda, int64_t sa, const void* B, DType bt, int ldb, int64_t sb, float beta,
                    void* C, DType ct, int ldc, int64_t sc, int batch, const int32_t* a_rows,
                    double* squares) override {
    run([=, this] { inner_->gemm_ex_rows(ta, tb, M, N, K, alpha, host(A), at, lda, sa, host(B),
                                         bt, ldb, sb, beta, host(C), ct, ldc, sc, batch,
                                         host(a_rows), host(squares)); });
  }
  void cast(void* out, DType ot, const void* in, DType it, int64_t n) override {
    run([=, this] { inner_->cast(host(out), ot, host(in), it, n); });
  }
  void round_to_bf16(float* x, int64_t n) override {
    run([=, this] { inner_->round_to_bf16(host(x), n); });
  }
  void accumulate_sum_squares(double* acc, const float* x, int64_t n) override {
    run([=, this] { inner_->accumulate_sum_squares(host(acc), host(x), n); });
  }
  void accumulate_loss_statistics(double* acc, const float* loss, const float* lse,
                                  const int32_t* labels, int64_t N) override {
    run([=, this] { inner_->accumulate_loss_statistics(host(acc), host(loss), host(lse), host(labels), N); });
  }
  void accumulate_router_statistics(double* acc, const float* lb, const float* lse,
                                    const float* counts, int G, int S, int E, int C) override {
    run([=, this] { inner_->accumulate_router_statistics(host(acc), host(lb), host(lse), host(counts), G, S, E, C); });
  }
  void accumulate_router_confidence(double* acc, const float* probs, const float* logits,
                                    const float* lse, int64_t T, int E) override {
    run([=, this] { inner_->accumulate_router_confidence(host(acc), host(probs), host(logits), host(lse), T, E); });
  }
  int64_t host_syncs() const override { return inner_->host_syncs(); }
  void synchronize() override {
    not_recording("synchronize");
    inner_->synchronize();
  }

  // ---- recorded work: CUDA graph semantics on the host --------------------------------------------
  // While recording, every op is stored as a closure over its (translated) pointers and by-value
  // arguments instead of running; replay() runs them in order. So a replayed step computes what
  // a CUDA graph of it would: host values baked in at recording time stay fixed, inputs read
  // from backend memory are current. The calls a captured CUDA stream refuses throw here too.
  bool can_record() const override { return true; }
  void begin_recording() override {
    not_recording("begin_recording");
    discard_recording();
    recording_ = true;
  }
  void end_recording() override {
    SWT_CHECK(recording_, "GuardedBackend::end_recording without begin_recording");
    recording_ = false;
    has_recording_ = true;
  }
  void replay() override {
    not_recording("replay");
    SWT_CHECK(has_recording_, "GuardedBackend::replay: nothing recorded");
    for (const auto& op : recorded_) op();
    ++replays_;
  }
  int64_t replays() const { return replays_; }
  size_t recorded_ops() const { return recorded_.size(); }
  ~GuardedBackend() override { discard_recording(); }

  // ---- compute: translate and forward ---------------------------------------------------------
  void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
            int64_t stride_a, const float* B, int ldb, int64_t stride_b, float beta, float* C,
            int ldc, int64_t stride_c, int batch) override {
    run([=, this] { inner_->gemm(trans_a, trans_b, M, N, K, alpha, host(A), lda, stride_a, host(B), ldb,
                 stride_b, beta, host(C), ldc, stride_c, batch); });
  }
  void add(float* out, const float* a, const float* b, int64_t n) override {
    run([=, this] { inner_->add(host(out), host(a), host(b), n); });
  }
  void axpy(float* y, float alpha, const float* x, int64_t n) override {
    run([=, this] { inner_->axpy(host(y), alpha, host(x), n); });
  }
  void scale(float* x, float alpha, int64_t n) override {
    run([=, this] { inner_->scale(host(x), alpha, n); });
  }
  double sum(const float* x, int64_t n) override {
    not_recording("sum");
    return inner_->sum(host(x), n);
  }
  double sum_squares(const float* x, int64_t n) override {
    not_recording("sum_squares");
    return inner_->sum_squares(host(x), n);
  }
  void sum_over_batch(float* out, const float* in, int batch, int64_t n) override {
    run([=, this] { inner_->sum_over_batch(host(out), host(in), batch, n); });
  }
  int64_t count_nonfinite(const float* x, int64_t n) override {
    not_recording("count_nonfinite");
    return inner_->count_nonfinite(host(x), n);
  }
  void permute_0213(float* out, const float* in, int A, int B, int C, int D) override {
    run([=, this] { inner_->permute_0213(host(out), host(in), A, B, C, D); });
  }
  void embedding_forward(float* out, const int32_t* ids, const float* table, int64_t n,
                         int D) override {
    run([=, this] { inner_->embedding_forward(host(out), host(ids), host(table), n, D); });
  }
  void embedding_backward(float* dtable, const int32_t* ids, const float* dout, int64_t n, int D,
                          int V) override {
    run([=, this] { inner_->embedding_backward(host(dtable), host(ids), host(dout), n, D, V); });
  }
  void rmsnorm_forward(float* out, float* rstd, const float* x, const float* w, int64_t N, int D,
                       float eps) override {
    run([=, this] { inner_->rmsnorm_forward(host(out), host(rstd), host(x), host(w), N, D, eps); });
  }
  void rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x, const float* w,
                        const float* rstd, int64_t N, int D) override {
    run([=, this] { inner_->rmsnorm_backward(host(dx), host(dw), host(dout), host(x), host(w), host(rstd), N, D); });
  }
  void attention_softmax_forward(float* probs, const float* scores, const float* bias,
                                 const float* key_mask, int B, int H, int Tq, int Tk,
                                 bool causal) override {
    run([=, this] { inner_->attention_softmax_forward(host(probs), host(scores), host(bias), host(key_mask), B, H,
                                      Tq, Tk, causal); });
  }
  void softmax_backward(float* dscores, const float* dprobs, const float* probs, int64_t rows,
                        int Tk) override {
    run([=, this] { inner_->softmax_backward(host(dscores), host(dprobs), host(probs), rows, Tk); });
  }
  void attention_softmax_dropout_forward(void* probs, DType probs_type, float* dropped,
                                         const float* scores, const float* bias,
                                         const float* key_mask, int B, int H, int Tq, int Tk,
                                         bool causal, float p, RandomKey key) override {
    run([=, this] {
      inner_->attention_softmax_dropout_forward(host(probs), probs_type, host(dropped),
                                                host(scores), host(bias), host(key_mask), B, H,
                                                Tq, Tk, causal, p, host(key));
    });
  }
  void attention_softmax_dropout_backward(float* dscores, float* dbias, const float* dprobs,
                                          const float* probs, int B, int H, int Tq, int Tk,
                                          float p, RandomKey key, bool round_bf16) override {
    run([=, this] {
      inner_->attention_softmax_dropout_backward(host(dscores), host(dbias), host(dprobs),
                                                 host(probs), B, H, Tq, Tk, p, host(key),
                                                 round_bf16);
    });
  }
  void relpos_bias_forward(float* bias, const float* table, const int32_t* buckets, int H, int Tq,
                           int Tk) override {
    run([=, this] { inner_->relpos_bias_forward(host(bias), host(table), host(buckets), H, Tq, Tk); });
  }
  void relpos_bias_backward(float* dtable, const float* dbias, const int32_t* buckets, int H,
                            int Tq, int Tk, int num_buckets) override {
    run([=, this] { inner_->relpos_bias_backward(host(dtable), host(dbias), host(buckets), H, Tq, Tk, num_buckets); });
  }
  void relu_forward(float* out, const float* x, int64_t n) override {
    run([=, this] { inner_->relu_forward(host(out), host(x), n); });
  }
  void relu_backward(float* dx, const float* dout, const float* x, int64_t n) override {
    run([=, this] { inner_->relu_backward(host(dx), host(dout), host(x), n); });
  }
  void gated_gelu_forward(float* out, const float* a, const float* b, int64_t n) override {
    run([=, this] { inner_->gated_gelu_forward(host(out), host(a), host(b), n); });
  }
  void gated_gelu_backward(float* da, float* db, const float* dout, const float* a,
                           const float* b, int64_t n) override {
    run([=, this] { inner_->gated_gelu_backward(host(da), host(db), host(dout), host(a), host(b), n); });
  }
  void dropout(float* out, const float* x, int64_t n, float p, RandomKey key) override {
    run([=, this] { inner_->dropout(host(out), host(x), n, p, host(key)); });
  }
  void uniform_jitter(float* out, const float* x, int64_t n, float eps, RandomKey key,
                      uint64_t offset) override {
    run([=, this] { inner_->uniform_jitter(host(out), host(x), n, eps, host(key), offset); });
  }
  void cross_entropy_forward(float* loss, float* lse, const float* logits, const int32_t* labels,
                             int64_t N, int V) override {
    run([=, this] { inner_->cross_entropy_forward(host(loss), host(lse), host(logits), host(labels), N, V); });
  }
  void cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                              const int32_t* labels, int64_t N, int V, float scale,
                              const float* scale_by, float z_coef) override {
    run([=, this] { inner_->cross_entropy_backward(host(dlogits), host(logits), host(lse), host(labels), N, V,
                                   scale, host(scale_by), z_coef); });
  }
  void router_forward(float* probs, float* lse, int32_t* expert, int32_t* slot, int32_t* rows,
                      float* gate, float* counts, const float* logits, int G, int S, int E,
                      int C) override {
    run([=, this] { inner_->router_forward(host(probs), host(lse), host(expert), host(slot),
                                           host(rows), host(gate), host(counts), host(logits), G,
                                           S, E, C); });
  }
  void router_balance_loss(float* lb, const float* probs, const float* counts, int G, int S,
                           int E) override {
    run([=, this] { inner_->router_balance_loss(host(lb), host(probs), host(counts), G, S, E); });
  }
  void router_backward(float* dlogits, const float* probs, const float* lse,
                       const int32_t* expert, const float* dgate, const float* counts, int G,
                       int S, int E, float lb_scale, float z_scale) override {
    run([=, this] { inner_->router_backward(host(dlogits), host(probs), host(lse), host(expert), host(dgate),
                            host(counts), G, S, E, lb_scale, z_scale); });
  }
  void moe_dispatch(float* buf, const float* x, const int32_t* expert, const int32_t* slot,
                    int64_t T, int D, int E, int GC) override {
    run([=, this] { inner_->moe_dispatch(host(buf), host(x), host(expert), host(slot), T, D, E, GC); });
  }
  void moe_dispatch_backward(float* dx, const float* dbuf, const int32_t* expert,
                             const int32_t* slot, int64_t T, int D, int GC) override {
    run([=, this] { inner_->moe_dispatch_backward(host(dx), host(dbuf), host(expert), host(slot), T, D, GC); });
  }
  void moe_combine(float* out, const float* buf, const float* gate, const int32_t* expert,
                   const int32_t* slot, int64_t T, int D, int GC) override {
    run([=, this] { inner_->moe_combine(host(out), host(buf), host(gate), host(expert), host(slot), T, D, GC); });
  }
  void moe_combine_backward(float* dbuf, float* dgate, const float* dout, const float* buf,
                            const float* gate, const int32_t* expert, const int32_t* slot,
                            int64_t T, int D, int E, int GC) override {
    run([=, this] { inner_->moe_combine_backward(host(dbuf), host(dgate), host(dout), host(buf), host(gate),
                                 host(expert), host(slot), T, D, E, GC); });
  }
  void adamw_update(float* p, uint16_t* p_bf16, const float* g, float* m, float* v, int64_t n,
                    float lr, float beta1, float beta2, float eps, float weight_decay, float bc1,
                    float bc2) override {
    run([=, this] { inner_->adamw_update(host(p), host(p_bf16), host(g), host(m), host(v), n, lr, beta1, beta2, eps,
                         weight_decay, bc1, bc2); });
  }
  void adafactor_update(float* p, uint16_t* p_bf16, const float* g, float* vr, float* vc, float* v,
                        bool factored, int count, int R, int C, float lr, float beta2t, float eps1,
                        float clip, float weight_decay, float eps2) override {
    run([=, this] { inner_->adafactor_update(host(p), host(p_bf16), host(g), host(vr), host(vc), host(v), factored,
                             count, R, C, lr, beta2t, eps1, clip, weight_decay, eps2); });
  }

 private:
  static void* to_device(void* p) {
    return p ? reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) | kDeviceBit) : nullptr;
  }
  // A device pointer -> the wrapped backend's pointer; null stays null (optional inputs).
  template <class T>
  static T* host(T* p) {
    if (!p) return nullptr;
    SWT_CHECK(is_device(p), "a host pointer ({}) passed to a GuardedBackend op as device memory",
              static_cast<const void*>(p));
    return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p) & ~kDeviceBit);
  }

  static RandomKey host(RandomKey key) { return {key.seed, host(key.step)}; }

  // Runs `op` now, or records it while recording.
  template <class F>
  void run(F&& op) {
    if (recording_) {
      recorded_.emplace_back(std::forward<F>(op));
    } else {
      op();
    }
  }
  void not_recording(const char* what) const {
    SWT_CHECK(!recording_, "GuardedBackend::{} while recording: a recorded step must take its "
              "inputs from backend memory and hand nothing to the host", what);
  }
  void discard_recording() {
    recorded_.clear();
    has_recording_ = false;
    for (void* p : kept_) inner_->free_bytes(host(p));
    kept_.clear();
    recorded_blocks_.clear();
  }

  bool recording_ = false, has_recording_ = false;
  std::vector<std::function<void()>> recorded_;
  std::unordered_set<void*> recorded_blocks_;  // allocated while recording
  std::vector<void*> kept_;                    // freed but kept for the recording
  int64_t replays_ = 0;

  std::unique_ptr<Backend> inner_;
  std::unordered_map<void*, size_t> live_;  // device pointer -> requested bytes
  size_t requested_ = 0, peak_requested_ = 0;
};

// A BackendFactory for Trainer / TrainOptions: the named backend, guarded.
inline BackendFactory guarded_backend_factory() {
  return [](const std::string& name, const BackendOptions& options) -> std::unique_ptr<Backend> {
    return std::make_unique<GuardedBackend>(make_backend(name, options));
  };
}

}  // namespace switcht5::testing
