// CudaBackend (cuda_backend.h): stream, arena, host transfers, the GEMM type handling around
// CublasLtGemm, and the forwarding of every other op to its kernels.h launcher. Compiled by the
// C++ compiler (no device code here).
#include "backend/cuda/cuda_backend.h"

#include <cuda_runtime.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/cuda_env.h"
#include "backend/cuda/cuda_gemm.h"
#include "backend/gemm_operands.h"
#include "core/check.h"
#include "core/rng.h"

namespace switcht5 {

namespace {

using cuda::kArenaGranule;  // cuda_memory.h
using cuda::kResultBytes;

// The lowest compute capability (e.g. 90 for sm_90) among the architectures this build's kernels
// are compiled for (SWITCHT5_CUDA_ARCHS, e.g. "90" or "80;90a"); 0 when none is numeric
// ("native", "all": no check).
int min_compute_capability() {
  const std::string list = SWITCHT5_CUDA_ARCHS_LIST;
  int best = 0;
  size_t i = 0;
  while (i < list.size()) {
    size_t j = i;
    while (j < list.size() && std::isdigit(static_cast<unsigned char>(list[j]))) ++j;
    if (j > i) {
      const int cc = std::stoi(list.substr(i, j - i));
      best = best == 0 ? cc : std::min(best, cc);
    }
    i = list.find(';', j);
    if (i == std::string::npos) break;
    ++i;
  }
  return best;
}

cudaDataType_t cuda_type(DType t) { return t == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F; }


double gib(size_t bytes) { return double(bytes) / double(size_t(1) << 30); }

}  // namespace

class CudaBackend::Scratch {
 public:
  Scratch(CudaBackend& be, size_t bytes)
      : be_(be), ptr_(be.arena_alloc(bytes, /*transient=*/true)),
        rounded_(DeviceArena::rounded(bytes)) {}
  ~Scratch() {
    be_.transient_in_use_ -= rounded_;
    be_.free_bytes(ptr_);  // kept for a graph recorded meanwhile (free_bytes)
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  CudaBackend& be_;
  void* ptr_;
  size_t rounded_;  // what the arena holds for it
};

// ---- construction -------------------------------------------------------------------------------

CudaBackend::CudaBackend(int device) : device_(device) {
  memory_fraction_ = cuda::memory_fraction(std::getenv(kCudaMemoryFractionEnv));
  try {
    SWT_CUDA_CHECK(cudaSetDevice(device));
    // An sm_90 build on an older GPU would fail at its first kernel with "no kernel image".
    int major = 0, minor = 0;
    SWT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    SWT_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    const int built_for = min_compute_capability();
    SWT_USER_CHECK(major * 10 + minor >= built_for,
                   "train.backend 'cuda': GPU {} has compute capability {}.{}, but this build's "
                   "kernels are for sm_{} and later (rebuild with -DSWITCHT5_CUDA_ARCHS={}{})",
                   device, major, minor, built_for, major, minor);
    int sm_count = 0;
    SWT_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
    cudaStream_t stream = nullptr;
    SWT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    stream_ = stream;
    ctx_.stream = stream_;
    ctx_.workspace = arena_alloc(cuda::kWorkspaceBytes);  // reserves the arena
    ctx_.workspace_bytes = cuda::kWorkspaceBytes;
    ctx_.sm_count = sm_count;
    blas_workspace_ = arena_alloc(kCublasWorkspaceBytes);
    result_device_ = arena_alloc(kResultBytes);
    SWT_CUDA_CHECK(cudaMallocHost(&result_host_, kResultBytes));
    SWT_CUDA_CHECK(cudaMallocHost(&staging_, kStagingSlots * kStagingSlotBytes));
    for (CUevent_st*& e : staging_done_) {
      cudaEvent_t event = nullptr;
      SWT_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
      e = event;
    }
    gemm_ = std::make_unique<cuda::CublasLtGemm>(stream_, blas_workspace_, kCublasWorkspaceBytes);
  } catch (...) {
    release();
    throw;
  }
}

CudaBackend::~CudaBackend() { release(); }

void CudaBackend::release() noexcept {
  // Nothing here throws: errors (e.g. a sticky error from an earlier failed kernel) are ignored,
  // as a destructor must.
  if (recording_) {  // an exception while capturing: end the capture, drop what it made
    cudaGraph_t partial = nullptr;
    cudaStreamEndCapture(stream_, &partial);
    if (partial) cudaGraphDestroy(partial);
    (void)cudaGetLastError();
    recording_ = false;
  }
  // NCCL kernels on the communication stream may still write arena memory.
  if (comm_stream_) {
    cudaStreamSynchronize(comm_stream_);
    cudaStreamDestroy(comm_stream_);
    comm_stream_ = nullptr;
  }
  if (stream_) cudaStreamSynchronize(stream_);
  discard_recording();
  gemm_.reset();
  if (result_host_) cudaFreeHost(result_host_);
  result_host_ = nullptr;
  for (CUevent_st*& e : staging_done_) {
    if (e) cudaEventDestroy(e);
    e = nullptr;
  }
  if (staging_) cudaFreeHost(staging_);
  staging_ = nullptr;
  if (pool_) cudaFree(pool_);
  pool_ = nullptr;
  if (stream_) cudaStreamDestroy(stream_);
  stream_ = nullptr;
}

CUstream_st* CudaBackend::communication_stream() {
  if (!comm_stream_) {
    int least = 0, greatest = 0;  // numerically: greatest priority is the lowest number
    SWT_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    cudaStream_t s = nullptr;
    SWT_CUDA_CHECK(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, greatest));
    comm_stream_ = s;
  }
  return comm_stream_;
}

// ---- memory -------------------------------------------------------------------------------------

void CudaBackend::reserve_arena() {
  size_t free_bytes = 0, total_bytes = 0;
  SWT_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  const size_t bytes = cuda::arena_bytes(free_bytes, memory_fraction_);  // cuda_memory.h
  SWT_CHECK(bytes > 0,
            "CUDA device {}: {} x {} bytes free is less than the arena's granule of {} bytes; "
            "raise {}",
            device_, memory_fraction_, free_bytes, kArenaGranule, kCudaMemoryFractionEnv);
  void* pool = nullptr;
  const cudaError_t err = cudaMalloc(&pool, bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the backend reports it here, once
    throw Error(fmt::format(
        "CUDA device {}: reserving the memory arena, {} bytes ({}={} of the {} bytes free), "
        "failed: {}; lower {}",
        device_, bytes, kCudaMemoryFractionEnv, memory_fraction_, free_bytes,
        cudaGetErrorString(err), kCudaMemoryFractionEnv));
  }
  pool_ = pool;
  arena_.reset(pool_, bytes);
  cudaDeviceProp prop{};
  SWT_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
  spdlog::info("CUDA backend: device {} ({}, {} SMs), memory arena {:.1f} GiB = {} of {:.1f} GiB "
               "free ({} GiB total)",
               device_, prop.name, prop.multiProcessorCount, gib(bytes), memory_fraction_,
               gib(free_bytes), std::lround(gib(total_bytes)));
}

void* CudaBackend::arena_alloc(size_t bytes, bool transient) {
  if (!pool_) reserve_arena();
  void* p = arena_.allocate(bytes);
  if (!p)
    throw Error(fmt::format(
        "CUDA device {}: out of arena memory: requested {} bytes with {} of {} bytes in use "
        "(largest free block {} bytes, peak {}); the arena is {}={} of the memory free at "
        "startup: raise it (at most 1) or reduce the batch or model size",
        device_, bytes, arena_.bytes_in_use(), arena_.capacity(), arena_.largest_free_block(),
        arena_.peak_bytes(), kCudaMemoryFractionEnv, memory_fraction_));
  if (recording_) graph_blocks_.insert(p);
  if (transient) {
    transient_in_use_ += DeviceArena::rounded(bytes);
    transient_peak_ = std::max(transient_peak_, transient_in_use_);
  } else {
    held_peak_ = std::max(held_peak_, arena_.bytes_in_use() - transient_in_use_);
  }
  return p;
}

double CudaBackend::peak_flops(DType dtype) const {
  int major = 0, sms = 0, khz = 0;
  SWT_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_));
  SWT_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_));
  SWT_CUDA_CHECK(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device_));
  // Hopper (sm_90) only, dense, per SM per clock: bf16 tensor cores 4096 FLOP (H100 SXM: 132
  // SMs x 1.83 GHz x 4096 = 989 TFLOP/s); fp32 GEMMs run CUBLAS_COMPUTE_32F on the CUDA cores,
  // 128 FMA = 256 FLOP (67 TFLOP/s). Other architectures: unknown (no MFU shown).
  if (major != 9) return 0.0;
  const double per_sm_clock = dtype == DType::kBF16 ? 4096.0 : 256.0;
  return per_sm_clock * double(sms) * double(khz) * 1e3;
}

int64_t CudaBackend::memory_capacity() const {
  if (pool_) return int64_t(arena_.capacity());
  size_t free_bytes = 0, total_bytes = 0;
  SWT_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return int64_t(cuda::arena_bytes(free_bytes, memory_fraction_));  // what reserve_arena takes
}

Backend::MemoryCounts CudaBackend::memory_counts() const {
  return {.counted = true, .block_bytes = int64_t(DeviceArena::kAlignment),
          .in_use = int64_t(arena_.bytes_in_use()), .live_blocks = int64_t(arena_.live_blocks()),
          .peak = int64_t(arena_.peak_bytes()), .held_peak = int64_t(held_peak_),
          .transient_peak = int64_t(transient_peak_)};
}

CudaBackend::DeviceMemory CudaBackend::device_memory() const {
  DeviceMemory m;
  SWT_CUDA_CHECK(cudaSetDevice(device_));
  SWT_CUDA_CHECK(cudaMemGetInfo(&m.free, &m.total));
  return m;
}

void* CudaBackend::alloc_bytes(size_t bytes) {
  void* p = arena_alloc(bytes);
  SWT_CUDA_CHECK(cudaMemsetAsync(p, 0, DeviceArena::rounded(bytes), stream_));
  return p;
}

void CudaBackend::free_bytes(void* ptr) {
  if (!ptr) return;
  SWT_CHECK(arena_.owns(ptr), "CudaBackend::free_bytes({}): not a live block of this backend's "
            "arena (freed twice, or memory of another backend)", ptr);
  if (recording_ || graph_blocks_.count(ptr)) {
    // The graph may use the block on every replay: it stays reserved while the graph lives.
    kept_for_graph_.push_back(ptr);
    return;
  }
  arena_.free(ptr);
}

// ---- recorded work ------------------------------------------------------------------------------

void CudaBackend::check_not_recording(const char* what) const {
  SWT_CHECK(!recording_, "CudaBackend::{} while recording a CUDA graph: a recorded step must "
            "take its inputs from device memory and hand nothing to the host", what);
}

void CudaBackend::discard_recording() noexcept {
  if (graph_) cudaGraphExecDestroy(graph_);
  graph_ = nullptr;
  for (void* p : kept_for_graph_) arena_.free(p);
  kept_for_graph_.clear();
  graph_blocks_.clear();
}

void CudaBackend::begin_recording() {
  check_not_recording("begin_recording");
  if (graph_) {
    SWT_CUDA_CHECK(cudaStreamSynchronize(stream_));  // a replay may still be running
    discard_recording();
  }
  SWT_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  recording_ = true;
}

void CudaBackend::end_recording() {
  SWT_CHECK(recording_, "CudaBackend::end_recording without begin_recording");
  recording_ = false;
  cudaGraph_t graph = nullptr;
  SWT_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  SWT_CUDA_CHECK(err);
  graph_ = exec;
}

void CudaBackend::replay() {
  check_not_recording("replay");
  SWT_CHECK(graph_, "CudaBackend::replay: nothing recorded");
  SWT_CUDA_CHECK(cudaGraphLaunch(graph_, stream_));
}

void CudaBackend::copy_to_host(void* dst, const void* src, size_t bytes) {
  check_not_recording("copy_to_host");
  count_host_sync();
  if (bytes == 0) return;
  SWT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  SWT_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// Through the pinned staging ring, slot by slot: wait for the slot's previous copy (its event;
// an event never recorded has passed), memcpy the chunk into it, enqueue the copy and record the
// event. `src` may be reused when this returns, and the stream is never drained (a batch upload
// no longer stalls the GPU five times per micro-batch).
void CudaBackend::copy_to_device(void* dst, const void* src, size_t bytes) {
  check_not_recording("copy_to_device");
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  for (size_t done = 0; done < bytes;) {
    const size_t n = std::min(bytes - done, kStagingSlotBytes);
    const int slot = staging_next_;
    staging_next_ = (staging_next_ + 1) % kStagingSlots;
    char* pinned = static_cast<char*>(staging_) + size_t(slot) * kStagingSlotBytes;
    SWT_CUDA_CHECK(cudaEventSynchronize(staging_done_[slot]));
    std::memcpy(pinned, s + done, n);
    SWT_CUDA_CHECK(cudaMemcpyAsync(d + done, pinned, n, cudaMemcpyHostToDevice, stream_));
    SWT_CUDA_CHECK(cudaEventRecord(staging_done_[slot], stream_));
    done += n;
  }
}

void CudaBackend::copy(void* dst, const void* src, size_t bytes) {
  if (bytes == 0 || dst == src) return;
  const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (d < s + bytes && s < d + bytes) {  // overlap (memmove semantics): through scratch
    Scratch tmp(*this, bytes);
    SWT_CUDA_CHECK(cudaMemcpyAsync(tmp.as<void>(), src, bytes, cudaMemcpyDeviceToDevice, stream_));
    SWT_CUDA_CHECK(cudaMemcpyAsync(dst, tmp.as<void>(), bytes, cudaMemcpyDeviceToDevice, stream_));
    return;
  }
  SWT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
}

void CudaBackend::fill(float* x, float value, int64_t n) { cuda::fill(ctx_, x, value, n); }

void CudaBackend::zero_bytes(void* x, size_t bytes) {
  if (bytes > 0) SWT_CUDA_CHECK(cudaMemsetAsync(x, 0, bytes, stream_));
}

void CudaBackend::synchronize() {
  check_not_recording("synchronize");
  SWT_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

template <class T>
T CudaBackend::fetch_result() {
  check_not_recording("a call returning a value to the host (sum, count_nonfinite)");
  count_host_sync();
  SWT_CUDA_CHECK(
      cudaMemcpyAsync(result_host_, result_device_, sizeof(T), cudaMemcpyDeviceToHost, stream_));
  SWT_CUDA_CHECK(cudaStreamSynchronize(stream_));
  T value;
  std::memcpy(&value, result_host_, sizeof value);
  return value;
}

// ---- GEMM ---------------------------------------------------------------------------------------

void CudaBackend::gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                       const float* A, int lda, int64_t stride_a, const float* B, int ldb,
                       int64_t stride_b, float beta, float* C, int ldc, int64_t stride_c,
                       int batch) {
  gemm_ex(trans_a, trans_b, M, N, K, alpha, A, DType::kF32, lda, stride_a, B, DType::kF32, ldb,
          stride_b, beta, C, DType::kF32, ldc, stride_c, batch);
}

void CudaBackend::cast_blocks(void* out, DType out_type, int64_t out_ld, int64_t out_stride,
                              const void* in, DType in_type, int64_t in_ld, int64_t in_stride,
                              int rows, int cols, int batch) {
  const int64_t block = int64_t(rows) * cols;
  const size_t out_size = dtype_size(out_type), in_size = dtype_size(in_type);
  auto out_at = [&](int b, int r) {
    return static_cast<char*>(out) + (b * out_stride + r * out_ld) * int64_t(out_size);
  };
  auto in_at = [&](int b, int r) {
    return static_cast<const char*>(in) + (b * in_stride + r * in_ld) * int64_t(in_size);
  };
  const bool rows_contiguous = out_ld == cols && in_ld == cols;
  if (rows_contiguous && (batch == 1 || (out_stride == block && in_stride == block))) {
    cast(out, out_type, in, in_type, block * batch);
  } else if (rows_contiguous) {
    for (int b = 0; b < batch; ++b) cast(out_at(b, 0), out_type, in_at(b, 0), in_type, block);
  } else {
    for (int b = 0; b < batch; ++b)
      for (int r = 0; r < rows; ++r) cast(out_at(b, r), out_type, in_at(b, r), in_type, cols);
  }
}

void CudaBackend::scale_blocks(void* C, DType c_type, float beta, int M, int N, int ldc,
                               int64_t stride_c, int batch) {
  const size_t esize = dtype_size(c_type);
  const int64_t block = int64_t(M) * N;
  if (beta == 0.0f) {  // all bits 0 is 0.0 in fp32 and bf16; C's old contents are ignored
    for (int b = 0; b < batch; ++b)
      SWT_CUDA_CHECK(cudaMemset2DAsync(static_cast<char*>(C) + b * stride_c * int64_t(esize),
                                       size_t(ldc) * esize, 0, size_t(N) * esize, size_t(M),
                                       stream_));
    return;
  }
  if (c_type == DType::kF32) {
    float* c = static_cast<float*>(C);
    if (ldc == N && (batch == 1 || stride_c == block)) {
      scale(c, beta, block * batch);
    } else {
      for (int b = 0; b < batch; ++b)
        for (int r = 0; r < M; ++r) scale(c + b * stride_c + int64_t(r) * ldc, beta, N);
    }
    return;
  }
  // bf16: widen the blocks, scale in fp32, round once (what the CPU backend computes).
  Scratch wide(*this, sizeof(float) * size_t(block) * size_t(batch));
  cast_blocks(wide.as<void>(), DType::kF32, N, block, C, c_type, ldc, stride_c, M, N, batch);
  scale(wide.as<float>(), beta, block * batch);
  cast_blocks(C, c_type, ldc, stride_c, wide.as<void>(), DType::kF32, N, block, M, N, batch);
}

void CudaBackend::gemm_ex(bool trans_a, bool trans_b, int M, int N, int K, float alpha,
                          const void* A, DType a_type, int lda, int64_t stride_a, const void* B,
                          DType b_type, int ldb, int64_t stride_b, float beta, void* C,
                          DType c_type, int ldc, int64_t stride_c, int batch) {
  check_gemm_ex_types(a_type, b_type, c_type);
  SWT_CHECK(M >= 0 && N >= 0 && K >= 0 && batch >= 0,
            "gemm: negative size M={} N={} K={} batch={}", M, N, K, batch);
  if (M == 0 || N == 0 || batch == 0) return;
  if (K == 0) {
    scale_blocks(C, c_type, beta, M, N, ldc, stride_c, batch);
    return;
  }
  cuda::GemmProblem p;
  p.trans_a = trans_a;
  p.trans_b = trans_b;
  p.M = M;
  p.N = N;
  p.K = K;
  p.lda = lda;
  p.ldb = ldb;
  p.ldc = ldc;
  p.stride_a = stride_a;
  p.stride_b = stride_b;
  p.stride_c = stride_c;
  p.batch = batch;

  // bf16 x bf16: cuBLASLt's bf16 kernels (C fp32 or bf16), unless it has none for this layout
  // and alignment; then both are widened below, which gives the same exact products.
  if (a_type == DType::kBF16 && b_type == DType::kBF16) {
    p.a_type = p.b_type = CUDA_R_16BF;
    p.c_type = cuda_type(c_type);
    if (gemm_->run(p, alpha, A, B, beta, C)) return;
  }
  // bf16 operands (next to an fp32 one, or in the fallback above) are widened exactly over the
  // elements their batch spans, keeping their layout, and the product runs in fp32: the fp32
  // operand is never rounded.
  std::unique_ptr<Scratch> wide_a, wide_b;
  auto widen = [&](std::unique_ptr<Scratch>& wide, const void*& ptr, DType& type, int rows,
                   int64_t ld, int cols, int64_t stride) {
    if (type != DType::kBF16) return;
    const int64_t n = gemm_extent(batch, stride, rows, ld, cols);
    wide = std::make_unique<Scratch>(*this, sizeof(float) * size_t(n));
    cast(wide->as<void>(), DType::kF32, ptr, DType::kBF16, n);
    ptr = wide->as<void>();
    type = DType::kF32;
  };
  widen(wide_a, A, a_type, trans_a ? K : M, lda, trans_a ? M : K, stride_a);
  widen(wide_b, B, b_type, trans_b ? N : K, ldb, trans_b ? K : N, stride_b);
  p.a_type = p.b_type = CUDA_R_32F;
  auto run_fp32 = [&](void* c) {
    SWT_CHECK(gemm_->run(p, alpha, A, B, beta, c), "cuBLASLt has no fp32 algorithm for {}",
              cuda::CublasLtGemm::describe(p));
  };
  if (c_type == DType::kF32) {
    p.c_type = CUDA_R_32F;
    run_fp32(C);
    return;
  }
  // fp32 operands, bf16 C: cuBLASLt's fp32 compute writes fp32 only, so the product goes to a
  // contiguous fp32 copy of C's blocks (C widened into it first when beta != 0) and is rounded
  // into C once; C's entries outside the blocks are not touched.
  const int64_t block = int64_t(M) * N;
  Scratch wide_c(*this, sizeof(float) * size_t(block) * size_t(batch));
  if (beta != 0.0f)
    cast_blocks(wide_c.as<void>(), DType::kF32, N, block, C, c_type, ldc, stride_c, M, N, batch);
  p.c_type = CUDA_R_32F;
  p.ldc = N;
  p.stride_c = block;
  run_fp32(wide_c.as<void>());
  cast_blocks(C, c_type, ldc, stride_c, wide_c.as<void>(), DType::kF32, N, block, M, N, batch);
}

void CudaBackend::cast(void* out, DType out_type, const void* in, DType in_type, int64_t n) {
  check_float_type(out_type, "cast output");
  check_float_type(in_type, "cast input");
  if (n <= 0) return;
  if (out_type == in_type) {
    copy(out, in, dtype_size(in_type) * size_t(n));
    return;
  }
  cuda::cast(ctx_, out, out_type, in, in_type, n);
}

void CudaBackend::round_to_bf16(float* x, int64_t n) { cuda::round_to_bf16(ctx_, x, n); }

// ---- elementwise and reductions -----------------------------------------------------------------

void CudaBackend::add(float* out, const float* a, const float* b, int64_t n) {
  cuda::add(ctx_, out, a, b, n);
}

void CudaBackend::axpy(float* y, float alpha, const float* x, int64_t n) {
  cuda::axpy(ctx_, y, alpha, x, n);
}

void CudaBackend::scale(float* x, float alpha, int64_t n) { cuda::scale(ctx_, x, alpha, n); }

// n == 0: the launchers enqueue nothing (kernels.h), so the result is 0 without asking them.
double CudaBackend::sum(const float* x, int64_t n) {
  if (n <= 0) {
    count_host_sync();
    return 0.0;
  }
  cuda::sum(ctx_, static_cast<double*>(result_device_), x, n);
  return fetch_result<double>();
}

double CudaBackend::sum_squares(const float* x, int64_t n) {
  if (n <= 0) {
    count_host_sync();
    return 0.0;
  }
  cuda::sum_squares(ctx_, static_cast<double*>(result_device_), x, n);
  return fetch_result<double>();
}

void CudaBackend::sum_over_batch(float* out, const float* in, int batch, int64_t n) {
  cuda::sum_over_batch(ctx_, out, in, batch, n);
}

int64_t CudaBackend::count_nonfinite(const float* x, int64_t n) {
  if (n <= 0) {
    count_host_sync();
    return 0;
  }
  cuda::count_nonfinite(ctx_, static_cast<int64_t*>(result_device_), x, n);
  return fetch_result<int64_t>();
}

void CudaBackend::accumulate_sum_squares(double* acc, const float* x, int64_t n) {
  cuda::accumulate_sum_squares(ctx_, acc, x, n);
}

void CudaBackend::accumulate_loss_statistics(double* acc, const float* loss, const float* lse,
                                             const int32_t* labels, int64_t N) {
  cuda::accumulate_loss_statistics(ctx_, acc, loss, lse, labels, N);
}

void CudaBackend::accumulate_router_statistics(double* acc, const float* lb, const float* lse,
                                               const float* counts, int G, int S, int E, int C) {
  cuda::accumulate_router_statistics(ctx_, acc, lb, lse, counts, G, S, E, C);
}

void CudaBackend::accumulate_router_confidence(double* acc, const float* probs,
                                               const float* logits, const float* lse, int64_t T,
                                               int E) {
  cuda::accumulate_router_confidence(ctx_, acc, probs, logits, lse, T, E);
}

// ---- layout, embedding, norm, attention, activations --------------------------------------------

void CudaBackend::permute_0213(float* out, const float* in, int A, int B, int C, int D) {
  cuda::permute_0213(ctx_, out, in, A, B, C, D);
}

void CudaBackend::embedding_forward(float* out, const int32_t* ids, const float* table, int64_t n,
                                    int D) {
  cuda::embedding_forward(ctx_, out, ids, table, n, D);
}

void CudaBackend::embedding_backward(float* dtable, const int32_t* ids, const float* dout,
                                     int64_t n, int D, int V) {
  cuda::embedding_backward(ctx_, dtable, ids, dout, n, D, V);
}

void CudaBackend::rmsnorm_forward(float* out, float* rstd, const float* x, const float* w,
                                  int64_t N, int D, float eps) {
  cuda::rmsnorm_forward(ctx_, out, rstd, x, w, N, D, eps);
}

void CudaBackend::rmsnorm_backward(float* dx, float* dw, const float* dout, const float* x,
                                   const float* w, const float* rstd, int64_t N, int D) {
  cuda::rmsnorm_backward(ctx_, dx, dw, dout, x, w, rstd, N, D);
}

void CudaBackend::attention_softmax_forward(float* probs, const float* scores, const float* bias,
                                            const float* key_mask, int B, int H, int Tq, int Tk,
                                            bool causal) {
  cuda::attention_softmax_forward(ctx_, probs, scores, bias, key_mask, B, H, Tq, Tk, causal);
}

void CudaBackend::softmax_backward(float* dscores, const float* dprobs, const float* probs,
                                   int64_t rows, int Tk) {
  cuda::softmax_backward(ctx_, dscores, dprobs, probs, rows, Tk);
}

void CudaBackend::attention_softmax_dropout_forward(void* probs, DType probs_type, float* dropped,
                                                    const float* scores, const float* bias,
                                                    const float* key_mask, int B, int H, int Tq,
                                                    int Tk, bool causal, float p, RandomKey key) {
  check_float_type(probs_type, "attention_softmax_dropout_forward probs");
  SWT_CHECK(p >= 0.0f && p < 1.0f, "attention_softmax_dropout_forward: p={} outside [0, 1)", p);
  SWT_CHECK(dropped || p == 0.0f, "attention_softmax_dropout_forward: p={} needs `dropped`", p);
  // The mask threshold and the kept values' scale, as dropout() computes them (p == 0: 0 and 1).
  cuda::attention_softmax_dropout_forward(ctx_, probs, probs_type == DType::kBF16, dropped,
                                          scores, bias, key_mask, B, H, Tq, Tk, causal,
                                          dropout_threshold(p), 1.0f - p, key.seed, key.step);
}

void CudaBackend::attention_softmax_dropout_backward(float* dscores, float* dbias,
                                                     const float* dprobs, const float* probs,
                                                     int B, int H, int Tq, int Tk, float p,
                                                     RandomKey key, bool round_bf16) {
  SWT_CHECK(p >= 0.0f && p < 1.0f, "attention_softmax_dropout_backward: p={} outside [0, 1)", p);
  cuda::attention_softmax_dropout_backward(ctx_, dscores, dbias, dprobs, probs, B, H, Tq, Tk,
                                           round_bf16, dropout_threshold(p), 1.0f - p, key.seed,
                                           key.step);
}

void CudaBackend::relpos_bias_forward(float* bias, const float* table, const int32_t* buckets,
                                      int H, int Tq, int Tk) {
  cuda::relpos_bias_forward(ctx_, bias, table, buckets, H, Tq, Tk);
}

void CudaBackend::relpos_bias_backward(float* dtable, const float* dbias, const int32_t* buckets,
                                       int H, int Tq, int Tk, int num_buckets) {
  cuda::relpos_bias_backward(ctx_, dtable, dbias, buckets, H, Tq, Tk, num_buckets);
}

void CudaBackend::relu_forward(float* out, const float* x, int64_t n) {
  cuda::relu_forward(ctx_, out, x, n);
}

void CudaBackend::relu_backward(float* dx, const float* dout, const float* x, int64_t n) {
  cuda::relu_backward(ctx_, dx, dout, x, n);
}

void CudaBackend::gated_gelu_forward(float* out, const float* a, const float* b, int64_t n) {
  cuda::gated_gelu_forward(ctx_, out, a, b, n);
}

void CudaBackend::gated_gelu_backward(float* da, float* db, const float* dout, const float* a,
                                      const float* b, int64_t n) {
  cuda::gated_gelu_backward(ctx_, da, db, dout, a, b, n);
}

// ---- randomness ---------------------------------------------------------------------------------

void CudaBackend::dropout(float* out, const float* x, int64_t n, float p, RandomKey key) {
  SWT_CHECK(p >= 0.0f && p < 1.0f, "dropout: p={} outside [0, 1)", p);
  if (p == 0.0f) {
    if (out != x) copy(out, x, sizeof(float) * size_t(n));
    return;
  }
  // The mask threshold and the kept values' scale, as the CPU backend computes them.
  cuda::dropout(ctx_, out, x, n, dropout_threshold(p), 1.0f - p, key.seed, key.step);
}

void CudaBackend::uniform_jitter(float* out, const float* x, int64_t n, float eps, RandomKey key,
                                 uint64_t offset) {
  cuda::uniform_jitter(ctx_, out, x, n, eps, key.seed, key.step, offset);
}

// ---- loss, router, dispatch ---------------------------------------------------------------------

void CudaBackend::cross_entropy_forward(float* loss, float* lse, const float* logits,
                                        const int32_t* labels, int64_t N, int V) {
  cuda::cross_entropy_forward(ctx_, loss, lse, logits, labels, N, V);
}

void CudaBackend::cross_entropy_backward(float* dlogits, const float* logits, const float* lse,
                                         const int32_t* labels, int64_t N, int V, float scale,
                                         const float* scale_by, float z_coef) {
  cuda::cross_entropy_backward(ctx_, dlogits, logits, lse, labels, N, V, scale, scale_by, z_coef);
}

void CudaBackend::router_forward(float* probs, float* lse, int32_t* expert, int32_t* slot,
                                 int32_t* rows, float* gate, float* counts, const float* logits,
                                 int G, int S, int E, int C) {
  cuda::router_forward(ctx_, probs, lse, expert, slot, rows, gate, counts, logits, G, S, E, C);
}

void CudaBackend::router_balance_loss(float* lb, const float* probs, const float* counts, int G,
                                      int S, int E) {
  cuda::router_balance_loss(ctx_, lb, probs, counts, G, S, E);
}

void CudaBackend::router_backward(float* dlogits, const float* probs, const float* lse,
                                  const int32_t* expert, const float* dgate, const float* counts,
                                  int G, int S, int E, float lb_scale, float z_scale) {
  cuda::router_backward(ctx_, dlogits, probs, lse, expert, dgate, counts, G, S, E, lb_scale,
                        z_scale);
}

void CudaBackend::moe_dispatch(float* buf, const float* x, const int32_t* expert,
                               const int32_t* slot, int64_t T, int D, int E, int GC) {
  cuda::moe_dispatch(ctx_, buf, x, expert, slot, T, D, E, GC);
}

void CudaBackend::moe_dispatch_backward(float* dx, const float* dbuf, const int32_t* expert,
                                        const int32_t* slot, int64_t T, int D, int GC) {
  cuda::moe_dispatch_backward(ctx_, dx, dbuf, expert, slot, T, D, GC);
}

void CudaBackend::moe_combine(float* out, const float* buf, const float* gate,
                              const int32_t* expert, const int32_t* slot, int64_t T, int D,
                              int GC) {
  cuda::moe_combine(ctx_, out, buf, gate, expert, slot, T, D, GC);
}

void CudaBackend::moe_combine_backward(float* dbuf, float* dgate, const float* dout,
                                       const float* buf, const float* gate, const int32_t* expert,
                                       const int32_t* slot, int64_t T, int D, int E, int GC) {
  cuda::moe_combine_backward(ctx_, dbuf, dgate, dout, buf, gate, expert, slot, T, D, E, GC);
}

// ---- optimizers ---------------------------------------------------------------------------------

void CudaBackend::adamw_update(float* p, uint16_t* p_bf16, const float* g, float* m, float* v,
                               int64_t n, float lr, float beta1, float beta2, float eps,
                               float weight_decay, float bc1, float bc2) {
  cuda::adamw_update(ctx_, p, p_bf16, g, m, v, n, lr, beta1, beta2, eps, weight_decay, bc1, bc2);
}

void CudaBackend::adafactor_update(float* p, uint16_t* p_bf16, const float* g, float* vr,
                                   float* vc, float* v, bool factored, int count, int R, int C,
                                   float lr, float beta2t, float eps1, float clip,
                                   float weight_decay, float eps2) {
  cuda::adafactor_update(ctx_, p, p_bf16, g, vr, vc, v, factored, count, R, C, lr, beta2t, eps1,
                         clip, weight_decay, eps2);
}

// ---- make_backend("cuda") -----------------------------------------------------------------------

std::unique_ptr<Backend> make_cuda_backend(const BackendOptions& options) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count <= 0) {
    (void)cudaGetLastError();
    const char* visible = std::getenv("CUDA_VISIBLE_DEVICES");
    const std::string why = err != cudaSuccess
                                ? fmt::format("{}: {}", cudaGetErrorName(err), cudaGetErrorString(err))
                                : std::string("cudaGetDeviceCount found 0 devices");
    throw UserError(fmt::format("train.backend 'cuda': no CUDA GPU is visible ({}; "
                                "CUDA_VISIBLE_DEVICES={})",
                                why, visible ? visible : "unset"));
  }
  SWT_CHECK(options.local_rank >= 0, "negative node-local rank {}", options.local_rank);
  return std::make_unique<CudaBackend>(options.local_rank % count);
}

}  // namespace switcht5
