// CudaBackend: the Backend on one NVIDIA GPU (sm_90). Owns the stream, the memory and the
// cuBLASLt GEMMs; every other op forwards to its launcher in kernels.h (same math and rounding
// points as the CPU backend, deterministic, no atomics). Tested against ReferenceBackend in
// tests/test_backend_ops.cpp (ctest label gpu).
//
// Execution: all work goes, in order, to ONE non-blocking stream of this backend. Ops return
// once their work is queued, except those that hand data to the host (copy_to_host, sum,
// sum_squares, count_nonfinite: they wait for the stream and count a host synchronisation) and
// copy_to_device (returns when the source buffer may be reused). A backend is used from one
// host thread at a time; its constructor makes its device current on the constructing thread.
//
// Memory: a device arena reserved at the first allocation (the constructor's workspaces): ONE
// cudaMalloc of SWITCHT5_CUDA_MEMORY_FRACTION (default 0.9, a number in (0, 1]) times the
// device's free memory at that moment, sub-allocated by DeviceArena (best fit, freed neighbours
// merged, 256-byte aligned blocks). Steady-state steps make no cudaMalloc / cudaFree. A request
// the arena cannot hold is an Error naming the request, the bytes in use, the arena size and the
// variable to raise. Blocks are reused as soon as they are freed, which is safe because all work
// is on one in-order stream (device_arena.h). alloc_bytes zeroes on the stream.
//
// GEMM: cuBLASLt (cuda_gemm.h), fp32 compute (never TF32). gemm_ex with bf16 A and B runs
// cuBLASLt's bf16 kernels (exact products, fp32 sums, C fp32 or rounded once to bf16); with one
// bf16 and one fp32 operand, the bf16 one is widened (exactly) into arena scratch and the fp32
// GEMM runs; fp32 operands with a bf16 C (no such cuBLASLt kernel) compute into an fp32 scratch
// C that is rounded into C once. K == 0 gives C = beta C (zeros when beta == 0).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/kernels.h"
#include "backend/device_arena.h"

struct CUstream_st;
struct CUevent_st;
struct CUgraphExec_st;

namespace switcht5 {

namespace cuda {
class CublasLtGemm;
}

// kCudaMemoryFractionEnv, the environment variable that sizes the arena: cuda_memory.h.

class CudaBackend final : public Backend {
 public:
  // cuda_memory.h holds these (and the other sizes), for `switcht5 plan`.
  static constexpr double kDefaultMemoryFraction = cuda::kDefaultMemoryFraction;
  static constexpr size_t kCublasWorkspaceBytes = cuda::kCublasWorkspaceBytes;

  // `device`: a CUDA device ordinal among the visible devices. Throws Error when a CUDA call
  // fails, UserError for a bad SWITCHT5_CUDA_MEMORY_FRACTION.
  explicit CudaBackend(int device);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  bool host_accessible() const override { return false; }

  int device() const { return device_; }
  // The stream every op above is issued to (the compute stream), and the communication stream:
  // made at the first call (non-blocking, the device's highest priority, so collectives are not
  // queued behind compute kernels), shared by every NCCL data plane on this backend
  // (comm/nccl/nccl_data_plane.h orders the two with events) and synchronised and destroyed
  // before the arena is freed. Nothing in this backend issues work to it.
  CUstream_st* stream() const { return stream_; }
  CUstream_st* communication_stream();
  // Arena: its size, the bytes in use now and the most ever in use (benchmarks report it),
  // including the backend's own workspaces (kWorkspaceBytes + kCublasWorkspaceBytes + 256).
  size_t arena_bytes() const { return arena_.capacity(); }
  size_t bytes_in_use() const { return arena_.bytes_in_use(); }
  size_t peak_bytes() const { return arena_.peak_bytes(); }
  // The arena's counts (Backend::MemoryCounts); transient blocks are the GEMM and copy scratch
  // (Scratch below), so held_peak is what `switcht5 plan` counts and peak exceeds it by at most
  // transient_peak.
  MemoryCounts memory_counts() const override;
  int64_t memory_capacity() const override;
  double peak_flops(DType dtype) const override;
  // What cudaMemGetInfo says of this backend's device now (every process's use, the CUDA
  // context, cuBLASLt's handle and this arena included): bench_step reports it.
  struct DeviceMemory {
    size_t total = 0, free = 0;
  };
  DeviceMemory device_memory() const;

  void* alloc_bytes(size_t bytes) override;
  void free_bytes(void* ptr) override;
  void copy_to_host(void* dst, const void* src, size_t bytes) override;
  void copy_to_device(void* dst, const void* src, size_t bytes) override;
  void copy(void* dst, const void* src, size_t bytes) override;
  void fill(float* x, float value, int64_t n) override;
  void zero_bytes(void* x, size_t bytes) override;
  void synchronize() override;

  // CUDA graphs: the stream is captured (cudaStreamCaptureModeThreadLocal) between
  // begin_recording and end_recording, which instantiates the graph; replay launches it on the
  // stream. Arena blocks freed while capturing (GEMM scratch), and blocks allocated while
  // capturing whenever they are freed, stay reserved for the graph until the next
  // begin_recording or the backend's end, so no later allocation reuses memory a replay writes.
  bool can_record() const override { return true; }
  void begin_recording() override;
  void end_recording() override;
  void replay() override;

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

  void adamw_update(float* p, uint16_t* p_bf16, const float* g, float* m, float* v, int64_t n,
                    float lr, float beta1, float beta2, float eps, float weight_decay, float bc1,
                    float bc2) override;
  void adafactor_update(float* p, uint16_t* p_bf16, const float* g, float* vr, float* vc, float* v,
                        bool factored, int count, int R, int C, float lr, float beta2t, float eps1,
                        float clip, float weight_decay, float eps2) override;

 private:
  // A block of arena memory (not zeroed), freed on destruction: GEMM scratch. Freed while the
  // work using it may still be queued, which the single stream makes safe (file comment).
  class Scratch;

  void release() noexcept;  // the destructor's body (also undoes a constructor that threw)
  // Error (internal: a caller bug) when `what`, a call that involves the host, is made while
  // recording; a captured stream would fail it with a less direct CUDA error.
  void check_not_recording(const char* what) const;
  void discard_recording() noexcept;
  void reserve_arena();
  // `transient`: a Scratch block (counted apart from the blocks the backend's callers hold).
  void* arena_alloc(size_t bytes, bool transient = false);
  template <class T>
  T fetch_result();  // the launcher's result in result_device_, waited for and counted
  // C = beta * C over C's M x N blocks (gemm_ex with K == 0).
  void scale_blocks(void* C, DType c_type, float beta, int M, int N, int ldc, int64_t stride_c,
                    int batch);
  // out[b, r, :cols] = in[b, r, :cols] as out_type, for `batch` blocks of `rows` rows each with
  // its own leading dimension and batch stride (one cast when both are contiguous).
  void cast_blocks(void* out, DType out_type, int64_t out_ld, int64_t out_stride, const void* in,
                   DType in_type, int64_t in_ld, int64_t in_stride, int rows, int cols, int batch);

  int device_ = 0;
  CUstream_st* stream_ = nullptr;
  CUstream_st* comm_stream_ = nullptr;  // communication_stream(), or null until asked for
  double memory_fraction_ = kDefaultMemoryFraction;
  void* pool_ = nullptr;   // the arena's one cudaMalloc
  DeviceArena arena_;
  // Of the arena's bytes in use: Scratch blocks now, their most at once, and the most ever in
  // use outside them (memory_counts()).
  size_t transient_in_use_ = 0, transient_peak_ = 0, held_peak_ = 0;
  cuda::Ctx ctx_;          // stream, kWorkspaceBytes of workspace, SM count
  void* blas_workspace_ = nullptr;
  void* result_device_ = nullptr;  // sum / sum_squares / count_nonfinite write here
  void* result_host_ = nullptr;    // pinned: where the result is copied for the host
  // copy_to_device's staging ring: kStagingSlots pinned slots of kStagingSlotBytes, each with
  // the event of its last copy. A copy goes through the next slot once that event has passed,
  // so the host's buffer is free when the call returns without draining the stream.
  static constexpr int kStagingSlots = 4;
  static constexpr size_t kStagingSlotBytes = size_t(4) << 20;
  void* staging_ = nullptr;        // pinned, kStagingSlots * kStagingSlotBytes
  CUevent_st* staging_done_[kStagingSlots] = {};
  int staging_next_ = 0;
  std::unique_ptr<cuda::CublasLtGemm> gemm_;
  bool recording_ = false;
  CUgraphExec_st* graph_ = nullptr;       // the instantiated recording, or null
  // Arena blocks the graph may use on every replay: those allocated while recording, and those
  // freed while recording or later (kept, not freed, until the graph is discarded).
  std::unordered_set<void*> graph_blocks_;
  std::vector<void*> kept_for_graph_;
};

// make_backend("cuda", options): a CudaBackend on device options.local_rank % (visible
// devices). UserError when no CUDA GPU is visible (the runtime's reason and
// CUDA_VISIBLE_DEVICES in the message).
std::unique_ptr<Backend> make_cuda_backend(const BackendOptions& options);

}  // namespace switcht5
