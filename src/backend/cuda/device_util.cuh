// Device helpers shared by the CUDA kernels: launch shapes, fixed-tree warp/block reductions and
// scans, workspace carving, the launcher error path for bad arguments, bf16 bits and the seed of
// a RandomKey. Self-contained (CUDA runtime, cuda_check.h and core/rng.h only); every helper is
// header-inline.
//
// Determinism: every reduction here is a fixed tree over the thread layout (shfl_down by 16, 8,
// 4, 2, 1 within a warp, then warp 0 over the warp totals in warp order), so a result depends
// only on the values and the block size, which launchers choose from the shapes alone.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "core/rng.h"

namespace switcht5::cuda::detail {

// ---- launch shapes -----------------------------------------------------------------------------

inline constexpr int kWarp = 32;
inline constexpr int kThreads = 256;  // default block size of the elementwise kernels
// Elementwise kernels loop grid-stride over int64 indices; the grid is ceil(n / threads) capped
// here (the result never depends on the grid for elementwise work).
inline constexpr int64_t kMaxGrid = int64_t(1) << 16;
inline constexpr int64_t kMaxGridYZ = 65535;  // gridDim.y / gridDim.z limit

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline unsigned grid_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = ceil_div(n, threads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxGrid ? kMaxGrid : blocks));
}

// A launcher's argument or shape error (never a CUDA failure): reported through the one error
// path with the launcher's name.
[[noreturn]] inline void launcher_fail(const char* file, int line, const char* launcher,
                                       const char* message) {
  cuda_fail(file, line, launcher, "CUDA launcher", -1, message);
}
#define SWT_LAUNCH_REQUIRE(cond, launcher, message)                                    \
  do {                                                                                 \
    if (!(cond))                                                                       \
      ::switcht5::cuda::detail::launcher_fail(__FILE__, __LINE__, launcher, message);  \
  } while (0)

// After each kernel launch.
#define SWT_CUDA_CHECK_LAUNCH() SWT_CUDA_CHECK(cudaGetLastError())

// Carves 256-byte aligned sub-buffers out of Ctx::workspace in a fixed order.
class WorkspaceCarver {
 public:
  WorkspaceCarver(void* base, size_t bytes) : base_(static_cast<char*>(base)), bytes_(bytes) {}
  template <class T>
  T* take(size_t count) {
    const size_t start = used_;
    used_ = align(start + count * sizeof(T));
    return reinterpret_cast<T*>(base_ + start);
  }
  size_t used() const { return used_; }
  bool fits() const { return used_ <= bytes_; }
  static size_t align(size_t b) { return (b + 255) / 256 * 256; }

 private:
  char* base_;
  size_t bytes_;
  size_t used_ = 0;
};

// Row- and block-parallel kernels (norm_attention.cu, loss_router.cu) launch ceil(items /
// per_block) blocks up to kMaxBlocks and grid-stride beyond (their results never depend on the
// grid either: each row or item is one block's or thread's whole work).
inline constexpr int64_t kMaxBlocks = int64_t(1) << 20;
inline int64_t blocks_for(int64_t items, int64_t per_block) {
  const int64_t blocks = ceil_div(items, per_block);
  return blocks < kMaxBlocks ? blocks : kMaxBlocks;
}

// ---- grid-stride index --------------------------------------------------------------------------

__device__ __forceinline__ int64_t global_thread_index() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

// ---- warp and block reductions (fixed trees) ----------------------------------------------------

// Reductions with an operator, as an xor butterfly: every lane ends with the same value.
struct SumOp {
  template <class T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
// std::max's rule (the CPU's): keep a unless a < b. A NaN candidate never replaces the maximum.
struct MaxOp {
  __device__ float operator()(float a, float b) const { return a < b ? b : a; }
};
template <class T, class Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// T: float, double, int, long long, unsigned long long (types __shfl_*_sync takes).

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // the warp's total in lane 0
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the total is valid in thread 0
// only. Every thread of the block must call it (it contains __syncthreads) and may call it again
// right after.
template <class T>
__device__ T block_sum(T v) {
  __shared__ T warp_totals[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  T total = T(0);
  if (warp == 0) {
    total = lane < num_warps ? warp_totals[lane] : T(0);
    total = warp_sum(total);
  }
  __syncthreads();  // warp_totals may be reused by the next call
  return total;
}

// block_sum with the total returned to every thread.
template <class T>
__device__ T block_sum_broadcast(T v) {
  __shared__ T result;
  const T total = block_sum(v);
  if (threadIdx.x == 0) result = total;
  __syncthreads();
  const T out = result;
  __syncthreads();
  return out;
}

// Inclusive scan within a warp (Hillis-Steele with shfl_up).
template <class T>
__device__ __forceinline__ T warp_inclusive_scan(T v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const T up = __shfl_up_sync(0xffffffffu, v, offset);
    if (lane >= offset) v += up;
  }
  return v;
}

// Exclusive scan over the block in thread order (blockDim.x a multiple of 32, at most 1024); the
// block total goes to *total in every thread when total is not null. Every thread must call it.
// Meant for integers (exact, so the tree does not matter); with floats it is still a fixed tree.
template <class T>
__device__ T block_exclusive_scan(T v, T* total = nullptr) {
  __shared__ T warp_prefix[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  const T inclusive = warp_inclusive_scan(v);
  if (lane == 31) warp_prefix[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const T w = lane < num_warps ? warp_prefix[lane] : T(0);
    const T w_inclusive = warp_inclusive_scan(w);
    if (lane < num_warps) warp_prefix[lane] = w_inclusive;
  }
  __syncthreads();
  const T before_warp = warp > 0 ? warp_prefix[warp - 1] : T(0);
  if (total) *total = warp_prefix[num_warps - 1];
  __syncthreads();
  return before_warp + inclusive - v;
}

// ---- bf16 (core/dtype.h semantics, device side) -------------------------------------------------
// Round to nearest even; a NaN stays a quiet NaN with its sign (switcht5::float_to_bf16).
__device__ __forceinline__ uint16_t f32_to_bf16_bits(float x) {
  const uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0)
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  const uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7FFFu + lsb) >> 16);
}
__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) {
  return __uint_as_float(static_cast<uint32_t>(h) << 16);
}

// ---- randomness ---------------------------------------------------------------------------------
// The seed of a RandomKey (core/rng.h): the step counter is read when the kernel runs, so a
// recorded launch (CUDA graph) draws the current step's stream.
__device__ __forceinline__ uint64_t key_seed(uint64_t seed, const uint64_t* step) {
  return step ? derive_seed(seed, *step) : seed;
}

}  // namespace switcht5::cuda::detail
