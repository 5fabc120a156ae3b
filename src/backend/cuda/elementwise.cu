// CUDA kernels for the memory, cast, elementwise, layout, embedding, position-bias, activation
// and randomness ops (kernels.h; the math is backend/backend.h's, the rounding points those of
// backend/cpu/cpu_backend.cpp).
//
// Floating-point: the CPU build (x86-64-v2) never fuses a multiply and an add, and nvcc would
// (--fmad=true by default), so every float expression that the CPU writes as a*b + c is spelled
// here with __fmul_rn / __fadd_rn, which the compiler never contracts: the arithmetic is the
// CPU's, operation by operation. tanhf may differ from glibc's by an ulp.
//
// Determinism: elementwise kernels have one writer per element. The two gradient scatters
// (embedding_backward, relpos_bias_backward) use no atomics: see each.
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_util.cuh"
#include "backend/cuda/kernels.h"
#include "core/rng.h"

namespace switcht5::cuda {

using detail::bf16_bits_to_f32;
using detail::ceil_div;
using detail::f32_to_bf16_bits;
using detail::global_thread_index;
using detail::grid_for;
using detail::grid_stride;
using detail::key_seed;
using detail::kThreads;

namespace {

cudaStream_t stream_of(const Ctx& c) { return reinterpret_cast<cudaStream_t>(c.stream); }

// ---- memory and casts --------------------------------------------------------------------------

__global__ void fill_kernel(float* x, float value, int64_t n) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) x[i] = value;
}

__global__ void cast_f32_to_bf16_kernel(uint16_t* out, const float* in, int64_t n) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride())
    out[i] = f32_to_bf16_bits(in[i]);
}

__global__ void cast_bf16_to_f32_kernel(float* out, const uint16_t* in, int64_t n) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride())
    out[i] = bf16_bits_to_f32(in[i]);
}

__global__ void round_to_bf16_kernel(float* x, int64_t n) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride())
    x[i] = bf16_bits_to_f32(f32_to_bf16_bits(x[i]));
}

// ---- elementwise -------------------------------------------------------------------------------

__global__ void add_kernel(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) out[i] = a[i] + b[i];
}

__global__ void axpy_kernel(float* y, float alpha, const float* x, int64_t n) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride())
    y[i] = __fadd_rn(y[i], __fmul_rn(alpha, x[i]));
}

__global__ void scale_kernel(float* x, float alpha, int64_t n) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) x[i] = __fmul_rn(x[i], alpha);
}

// out[i] += sum_b in[b*n + i], b in order, in double from out[i] (the CPU's order).
__global__ void sum_over_batch_kernel(float* out, const float* in, int batch, int64_t n) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) {
    double acc = out[i];
    for (int b = 0; b < batch; ++b) acc += double(in[int64_t(b) * n + i]);
    out[i] = static_cast<float>(acc);
  }
}

// out[a,c,b,d] = in[a,b,c,d]; one thread per output element (writes coalesced, reads in runs
// of D).
__global__ void permute_0213_kernel(float* out, const float* in, int A, int B, int C, int D,
                                    int64_t total) {
  for (int64_t o = global_thread_index(); o < total; o += grid_stride()) {
    const int64_t row = o / D;  // (a, c, b) of the output
    const int d = static_cast<int>(o - row * D);
    const int b = static_cast<int>(row % B);
    const int64_t ac = row / B;
    const int c = static_cast<int>(ac % C);
    const int64_t a = ac / C;
    out[o] = in[((a * B + b) * C + c) * D + d];
  }
}

// ---- embedding ---------------------------------------------------------------------------------

__global__ void embedding_forward_kernel(float* out, const int32_t* ids, const float* table,
                                         int64_t total, int D) {
  for (int64_t o = global_thread_index(); o < total; o += grid_stride()) {
    const int64_t t = o / D;
    const int j = static_cast<int>(o - t * D);
    out[o] = table[int64_t(ids[t]) * D + j];
  }
}

// embedding_backward: dtable[ids[t], :] += dout[t, :], tokens in increasing t per row, with one
// writer per dtable element and no atomics:
//  1. a stable LSD radix sort (4-bit digits, only the bits V-1 needs) of the token positions of
//     a chunk of tokens by id, in the workspace;
//  2. one thread per (run of equal ids, column) that adds its tokens' dout in sorted (= t) order
//     into a float register started from dtable, exactly the CPU's float += sequence.
// Chunks of kSortChunk tokens are processed in t order, so the per-element order stays t order.
// Ids must lie in [0, V) (as on the CPU); an id >= V could break the grouping.
constexpr int kSortThreads = 256;
constexpr int kSortItems = 4;                          // consecutive items per thread
constexpr int kSortTile = kSortThreads * kSortItems;   // 1024 positions per tile
constexpr int kRadixBits = 4;
constexpr int kRadixDigits = 1 << kRadixBits;          // 16
constexpr int64_t kSortChunk = int64_t(1) << 18;       // tokens per chunk (2 x 1 MiB of int32)
constexpr int kEmbedColumns = 128;                     // columns per block of the accumulation

// Per-thread digit counts, 16 digits as four 64-bit words of four 16-bit fields (a tile has at
// most 1024 items, so no field overflows, and sums of packed words are the fieldwise sums).
struct DigitCounts {
  unsigned long long w[4];
};

__device__ __forceinline__ void count_digit(DigitCounts& c, uint32_t digit) {
  const unsigned long long one = 1ull << (16 * (digit & 3u));
#pragma unroll
  for (uint32_t k = 0; k < 4; ++k) c.w[k] += (digit >> 2) == k ? one : 0ull;
}

__device__ __forceinline__ uint32_t digit_field(const DigitCounts& c, uint32_t digit) {
  const unsigned long long word = (digit >> 2) == 0 ? c.w[0]
                                  : (digit >> 2) == 1 ? c.w[1]
                                  : (digit >> 2) == 2 ? c.w[2]
                                                      : c.w[3];
  return static_cast<uint32_t>(word >> (16 * (digit & 3u))) & 0xFFFFu;
}

__device__ __forceinline__ uint32_t radix_digit(const int32_t* ids, int64_t t0, int32_t pos,
                                                int shift) {
  return (static_cast<uint32_t>(ids[t0 + pos]) >> shift) & (kRadixDigits - 1);
}

// The chunk-local token index at sorted position k (src == null: the identity, the first pass).
__device__ __forceinline__ int32_t load_sorted(const int32_t* src, int64_t k) {
  return src ? src[k] : static_cast<int32_t>(k);
}

// Pass step 1: tile_counts[d * num_tiles + tile] = items of the tile with digit d.
__global__ void __launch_bounds__(kSortThreads)
    radix_count_kernel(int* tile_counts, const int32_t* src, const int32_t* ids, int64_t t0,
                       int64_t L, int shift, int num_tiles) {
  const int tile = blockIdx.x;
  DigitCounts c = {{0, 0, 0, 0}};
#pragma unroll
  for (int q = 0; q < kSortItems; ++q) {
    const int64_t k = int64_t(tile) * kSortTile + threadIdx.x * kSortItems + q;
    if (k < L) count_digit(c, radix_digit(ids, t0, load_sorted(src, k), shift));
  }
  DigitCounts total;
#pragma unroll
  for (int w = 0; w < 4; ++w) total.w[w] = detail::block_sum(c.w[w]);
  if (threadIdx.x == 0)  // block_sum's totals are valid in thread 0 only
    for (uint32_t d = 0; d < kRadixDigits; ++d)
      tile_counts[int64_t(d) * num_tiles + tile] = static_cast<int>(digit_field(total, d));
}

// Pass step 2: exclusive scan of tile_counts (digit-major: all tiles of digit 0, then digit 1,
// ...) in place, by one block. Integers: exact.
constexpr int kScanThreads = 1024;
__global__ void __launch_bounds__(kScanThreads) radix_scan_kernel(int* tile_counts, int m) {
  const int per_thread = static_cast<int>((m + kScanThreads - 1) / kScanThreads);
  const int begin = min(m, static_cast<int>(threadIdx.x) * per_thread);
  const int end = min(m, begin + per_thread);
  int local = 0;
  for (int i = begin; i < end; ++i) local += tile_counts[i];
  int running = detail::block_exclusive_scan(local);
  for (int i = begin; i < end; ++i) {
    const int count = tile_counts[i];
    tile_counts[i] = running;
    running += count;
  }
}

// Pass step 3: stable scatter. Item q of thread x in tile T goes to
//   offset[digit][T] + (items of that digit earlier in the tile: earlier threads, then earlier q).
__global__ void __launch_bounds__(kSortThreads)
    radix_scatter_kernel(int32_t* dst, const int32_t* src, const int32_t* ids, int64_t t0,
                         int64_t L, int shift, const int* tile_offsets, int num_tiles) {
  const int tile = blockIdx.x;
  int32_t pos[kSortItems];
  uint32_t digit[kSortItems];
  DigitCounts c = {{0, 0, 0, 0}};
#pragma unroll
  for (int q = 0; q < kSortItems; ++q) {
    const int64_t k = int64_t(tile) * kSortTile + threadIdx.x * kSortItems + q;
    pos[q] = -1;
    digit[q] = 0;
    if (k < L) {
      pos[q] = load_sorted(src, k);
      digit[q] = radix_digit(ids, t0, pos[q], shift);
      count_digit(c, digit[q]);
    }
  }
  DigitCounts before;  // items of each digit in earlier threads of the tile
#pragma unroll
  for (int w = 0; w < 4; ++w) before.w[w] = detail::block_exclusive_scan(c.w[w]);
#pragma unroll
  for (int q = 0; q < kSortItems; ++q) {
    if (pos[q] < 0) continue;
    const uint32_t d = digit[q];
    const int rank = static_cast<int>(digit_field(before, d));
    dst[tile_offsets[int64_t(d) * num_tiles + tile] + rank] = pos[q];
    count_digit(before, d);
  }
}

// Accumulation: block (k, column block); only the block at the first sorted position of a run
// of equal ids works, walking the run in order. Blocks at other positions exit at once.
__global__ void __launch_bounds__(kEmbedColumns)
    embedding_accumulate_kernel(float* dtable, const int32_t* sorted, const int32_t* ids,
                                const float* dout, int64_t t0, int64_t L, int D) {
  const int64_t k = blockIdx.x;
  const int j = blockIdx.y * kEmbedColumns + threadIdx.x;
  const int32_t id = ids[t0 + sorted[k]];
  if (k > 0 && ids[t0 + sorted[k - 1]] == id) return;
  if (j >= D) return;
  float* row = dtable + int64_t(id) * D;
  float acc = row[j];
  for (int64_t r = k; r < L; ++r) {
    const int64_t t = t0 + sorted[r];
    if (ids[t] != id) break;
    acc = __fadd_rn(acc, dout[t * D + j]);
  }
  row[j] = acc;
}

// ---- relative position bias --------------------------------------------------------------------

__global__ void relpos_bias_forward_kernel(float* bias, const float* table,
                                           const int32_t* buckets, int H, int64_t TqTk) {
  const int64_t total = TqTk * H;
  for (int64_t o = global_thread_index(); o < total; o += grid_stride()) {
    const int64_t h = o / TqTk;
    const int64_t ij = o - h * TqTk;
    bias[o] = table[int64_t(buckets[ij]) * H + h];
  }
}

// relpos_bias_backward: dtable[buckets[i,j], h] += dbias[h,i,j] without atomics, in double:
//  1. one warp per (segment of kRelposSegment consecutive (i,j) positions, h) sums each bucket's
//     entries of its segment in (i,j) order into a per-warp shared array (lane b % 32 owns
//     bucket b, so each shared entry has one writer), then writes the per-bucket partials;
//  2. one thread per (bucket, h) adds the segment partials in segment order to double(dtable)
//     (carried in the workspace across chunks of segments) and rounds once to float at the end.
// The order (segments in order, positions in order within a segment) depends on Tq*Tk only;
// it differs from the CPU's single sequential double sum by double rounding, far below float.
constexpr int kRelposSegment = 1024;
constexpr int kRelposWarps = 4;  // warps (segment items) per block of step 1
constexpr int kRelposCombineThreads = 256;

__global__ void relpos_partial_kernel(double* partial, const float* dbias, const int32_t* buckets,
                                      int H, int64_t TqTk, int num_buckets, int64_t seg0,
                                      int64_t num_items) {
  extern __shared__ double relpos_smem[];  // [kRelposWarps][num_buckets]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t item = int64_t(blockIdx.x) * kRelposWarps + warp;  // (segment - seg0) * H + h
  if (item >= num_items) return;  // whole warp: no block-wide barrier below
  const int h = static_cast<int>(item % H);
  const int64_t seg = seg0 + item / H;
  double* acc = relpos_smem + int64_t(warp) * num_buckets;
  for (int b = lane; b < num_buckets; b += 32) acc[b] = 0.0;
  __syncwarp();
  const float* g = dbias + int64_t(h) * TqTk;
  const int64_t p0 = seg * kRelposSegment;
  const int64_t p1 = min(TqTk, p0 + kRelposSegment);
  for (int64_t base = p0; base < p1; base += 32) {
    const int64_t p = base + lane;
    const int32_t my_bucket = p < p1 ? buckets[p] : -1;
    const float my_value = p < p1 ? g[p] : 0.0f;
#pragma unroll 8
    for (int q = 0; q < 32; ++q) {
      const int32_t b = __shfl_sync(0xffffffffu, my_bucket, q);
      const float v = __shfl_sync(0xffffffffu, my_value, q);
      if (b >= 0 && b < num_buckets && (b & 31) == lane) acc[b] += double(v);
    }
  }
  __syncwarp();
  double* out = partial + (item / H) * (int64_t(num_buckets) * H);  // [segment][bucket][h]
  for (int b = lane; b < num_buckets; b += 32) out[int64_t(b) * H + h] = acc[b];
}

__global__ void relpos_combine_kernel(float* dtable, double* carry, const double* partial,
                                      int64_t num_segments, int64_t bh, bool first, bool last) {
  const int64_t e = global_thread_index();  // b * H + h
  if (e >= bh) return;
  double acc = first ? double(dtable[e]) : carry[e];
  for (int64_t s = 0; s < num_segments; ++s) acc += partial[s * bh + e];
  if (last)
    dtable[e] = static_cast<float>(acc);
  else
    carry[e] = acc;
}

// ---- activations -------------------------------------------------------------------------------

constexpr float kSqrt2OverPi = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;

// 0.5 a (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3))), evaluated in the CPU's order.
__device__ __forceinline__ float gelu_tanh(float a) {
  const float a3 = __fmul_rn(__fmul_rn(__fmul_rn(kGeluCubic, a), a), a);
  const float th = tanhf(__fmul_rn(kSqrt2OverPi, __fadd_rn(a, a3)));
  return __fmul_rn(__fmul_rn(0.5f, a), __fadd_rn(1.0f, th));
}

// 0.5 (1 + tanh u) + 0.5 a (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 a^2).
__device__ __forceinline__ float gelu_tanh_grad(float a) {
  const float a3 = __fmul_rn(__fmul_rn(__fmul_rn(kGeluCubic, a), a), a);
  const float th = tanhf(__fmul_rn(kSqrt2OverPi, __fadd_rn(a, a3)));
  const float du =
      __fmul_rn(kSqrt2OverPi, __fadd_rn(1.0f, __fmul_rn(__fmul_rn(3.0f * kGeluCubic, a), a)));
  const float left = __fmul_rn(0.5f, __fadd_rn(1.0f, th));
  const float right =
      __fmul_rn(__fmul_rn(__fmul_rn(0.5f, a), __fsub_rn(1.0f, __fmul_rn(th, th))), du);
  return __fadd_rn(left, right);
}

__global__ void relu_forward_kernel(float* out, const float* x, int64_t n) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) {
    const float v = x[i];
    out[i] = v > 0.0f ? v : 0.0f;
  }
}

__global__ void relu_backward_kernel(float* dx, const float* dout, const float* x, int64_t n) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride())
    dx[i] = x[i] > 0.0f ? dout[i] : 0.0f;
}

__global__ void gated_gelu_forward_kernel(float* out, const float* a, const float* b, int64_t n) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) {
    const float ai = a[i], bi = b[i];  // out may alias a or b
    out[i] = __fmul_rn(gelu_tanh(ai), bi);
  }
}

__global__ void gated_gelu_backward_kernel(float* da, float* db, const float* dout,
                                           const float* a, const float* b, int64_t n) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) {
    const float g = dout[i], ai = a[i], bi = b[i];  // read before writing (da/db may alias dout)
    da[i] = __fmul_rn(__fmul_rn(g, bi), gelu_tanh_grad(ai));
    db[i] = __fmul_rn(g, gelu_tanh(ai));
  }
}

// ---- randomness ---------------------------------------------------------------------------------

// One splitmix64 draw per group of four elements, as random16 (core/rng.h) defines the bits.
// The seed is key_seed's (device_util.cuh): the step counter read when the kernel runs.
__global__ void dropout_kernel(float* out, const float* x, int64_t n, uint32_t threshold,
                               float keep_scale, uint64_t key, const uint64_t* step) {
  const uint64_t seed = key_seed(key, step);
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = global_thread_index(); g < groups; g += grid_stride()) {
    const uint64_t bits = mix64(seed + static_cast<uint64_t>(g) * kMixGamma);
    const int64_t i0 = 4 * g;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t i = i0 + q;
      if (i >= n) break;
      const uint32_t r = static_cast<uint32_t>(bits >> (16 * q)) & 0xFFFFu;
      const float v = x[i];
      out[i] = r >= threshold ? __fdiv_rn(v, keep_scale) : 0.0f;  // as the CPU: x / (1 - p)
    }
  }
}

__global__ void uniform_jitter_kernel(float* out, const float* x, int64_t n, float one_minus_eps,
                                      float two_eps, uint64_t key, const uint64_t* step,
                                      uint64_t offset) {
  const uint64_t seed = key_seed(key, step);
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) {
    const float u = uniform01(seed, offset + static_cast<uint64_t>(i));
    out[i] = __fmul_rn(x[i], __fadd_rn(one_minus_eps, __fmul_rn(two_eps, u)));
  }
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------

void fill(const Ctx& c, float* x, float value, int64_t n) {
  if (n <= 0) return;
  fill_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(x, value, n);
  SWT_CUDA_CHECK_LAUNCH();
}

void cast(const Ctx& c, void* out, DType out_type, const void* in, DType in_type, int64_t n) {
  const bool float_types = (out_type == DType::kF32 || out_type == DType::kBF16) &&
                           (in_type == DType::kF32 || in_type == DType::kBF16);
  SWT_LAUNCH_REQUIRE(float_types, "cast", "only fp32 and bf16 are supported");
  if (n <= 0) return;
  if (out_type == in_type) {
    SWT_CUDA_CHECK(cudaMemcpyAsync(out, in, dtype_size(in_type) * size_t(n),
                                   cudaMemcpyDeviceToDevice, stream_of(c)));
  } else if (out_type == DType::kBF16) {
    cast_f32_to_bf16_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(
        static_cast<uint16_t*>(out), static_cast<const float*>(in), n);
    SWT_CUDA_CHECK_LAUNCH();
  } else {
    cast_bf16_to_f32_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(
        static_cast<float*>(out), static_cast<const uint16_t*>(in), n);
    SWT_CUDA_CHECK_LAUNCH();
  }
}

void round_to_bf16(const Ctx& c, float* x, int64_t n) {
  if (n <= 0) return;
  round_to_bf16_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(x, n);
  SWT_CUDA_CHECK_LAUNCH();
}

void add(const Ctx& c, float* out, const float* a, const float* b, int64_t n) {
  if (n <= 0) return;
  add_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(out, a, b, n);
  SWT_CUDA_CHECK_LAUNCH();
}

void axpy(const Ctx& c, float* y, float alpha, const float* x, int64_t n) {
  if (n <= 0) return;
  axpy_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(y, alpha, x, n);
  SWT_CUDA_CHECK_LAUNCH();
}

void scale(const Ctx& c, float* x, float alpha, int64_t n) {
  if (n <= 0) return;
  scale_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(x, alpha, n);
  SWT_CUDA_CHECK_LAUNCH();
}

void sum_over_batch(const Ctx& c, float* out, const float* in, int batch, int64_t n) {
  if (n <= 0) return;
  sum_over_batch_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(out, in, batch < 0 ? 0 : batch,
                                                                      n);
  SWT_CUDA_CHECK_LAUNCH();
}

void permute_0213(const Ctx& c, float* out, const float* in, int A, int B, int C, int D) {
  if (A <= 0 || B <= 0 || C <= 0 || D <= 0) return;
  const int64_t total = int64_t(A) * B * C * D;
  permute_0213_kernel<<<grid_for(total), kThreads, 0, stream_of(c)>>>(out, in, A, B, C, D, total);
  SWT_CUDA_CHECK_LAUNCH();
}

void embedding_forward(const Ctx& c, float* out, const int32_t* ids, const float* table, int64_t n,
                       int D) {
  if (n <= 0 || D <= 0) return;
  const int64_t total = n * D;
  embedding_forward_kernel<<<grid_for(total), kThreads, 0, stream_of(c)>>>(out, ids, table, total,
                                                                            D);
  SWT_CUDA_CHECK_LAUNCH();
}

void embedding_backward(const Ctx& c, float* dtable, const int32_t* ids, const float* dout,
                        int64_t n, int D, int V) {
  if (n <= 0 || D <= 0) return;
  SWT_LAUNCH_REQUIRE(V >= 1, "embedding_backward", "V must be at least 1");
  const int64_t column_blocks = ceil_div(D, kEmbedColumns);
  SWT_LAUNCH_REQUIRE(column_blocks <= detail::kMaxGridYZ, "embedding_backward", "D too large");
  // Digits of the largest id V-1 (at least one pass: a pass over a zero digit is the identity).
  int bits = 0;
  while (bits < 32 && (static_cast<uint32_t>(V - 1) >> bits) != 0) ++bits;
  const int passes = bits == 0 ? 1 : (bits + kRadixBits - 1) / kRadixBits;

  const int64_t max_tiles = ceil_div(kSortChunk, kSortTile);
  detail::WorkspaceCarver ws(c.workspace, c.workspace_bytes);
  int32_t* buf[2] = {ws.take<int32_t>(size_t(kSortChunk)), ws.take<int32_t>(size_t(kSortChunk))};
  int* tile_counts = ws.take<int>(size_t(kRadixDigits * max_tiles));
  SWT_LAUNCH_REQUIRE(c.workspace != nullptr && ws.fits(), "embedding_backward",
                     "workspace too small for the id sort");

  cudaStream_t s = stream_of(c);
  for (int64_t t0 = 0; t0 < n; t0 += kSortChunk) {
    const int64_t L = n - t0 < kSortChunk ? n - t0 : kSortChunk;
    const int num_tiles = static_cast<int>(ceil_div(L, kSortTile));
    const int32_t* src = nullptr;  // first pass: the identity order
    int32_t* dst = buf[0];
    for (int pass = 0; pass < passes; ++pass) {
      const int shift = pass * kRadixBits;
      radix_count_kernel<<<num_tiles, kSortThreads, 0, s>>>(tile_counts, src, ids, t0, L, shift,
                                                            num_tiles);
      SWT_CUDA_CHECK_LAUNCH();
      radix_scan_kernel<<<1, kScanThreads, 0, s>>>(tile_counts, kRadixDigits * num_tiles);
      SWT_CUDA_CHECK_LAUNCH();
      radix_scatter_kernel<<<num_tiles, kSortThreads, 0, s>>>(dst, src, ids, t0, L, shift,
                                                              tile_counts, num_tiles);
      SWT_CUDA_CHECK_LAUNCH();
      src = dst;
      dst = dst == buf[0] ? buf[1] : buf[0];
    }
    const dim3 grid(static_cast<unsigned>(L), static_cast<unsigned>(column_blocks));
    embedding_accumulate_kernel<<<grid, kEmbedColumns, 0, s>>>(dtable, src, ids, dout, t0, L, D);
    SWT_CUDA_CHECK_LAUNCH();
  }
}

void relpos_bias_forward(const Ctx& c, float* bias, const float* table, const int32_t* buckets,
                         int H, int Tq, int Tk) {
  if (H <= 0 || Tq <= 0 || Tk <= 0) return;
  const int64_t TqTk = int64_t(Tq) * Tk;
  relpos_bias_forward_kernel<<<grid_for(TqTk * H), kThreads, 0, stream_of(c)>>>(bias, table,
                                                                                buckets, H, TqTk);
  SWT_CUDA_CHECK_LAUNCH();
}

void relpos_bias_backward(const Ctx& c, float* dtable, const float* dbias, const int32_t* buckets,
                          int H, int Tq, int Tk, int num_buckets) {
  if (H <= 0 || Tq <= 0 || Tk <= 0 || num_buckets <= 0) return;
  const int64_t TqTk = int64_t(Tq) * Tk;
  const int64_t bh = int64_t(num_buckets) * H;
  const size_t smem = sizeof(double) * size_t(kRelposWarps) * size_t(num_buckets);
  SWT_LAUNCH_REQUIRE(smem <= 48 * 1024, "relpos_bias_backward", "num_buckets above 1536");
  const int64_t num_segments = ceil_div(TqTk, kRelposSegment);

  detail::WorkspaceCarver ws(c.workspace, c.workspace_bytes);
  double* carry = ws.take<double>(size_t(bh));
  const size_t used = ws.used();
  SWT_LAUNCH_REQUIRE(c.workspace != nullptr && used + sizeof(double) * bh <= c.workspace_bytes,
                     "relpos_bias_backward", "workspace too small for num_buckets * H");
  const int64_t segments_per_chunk =
      static_cast<int64_t>((c.workspace_bytes - used) / (sizeof(double) * size_t(bh)));
  double* partial = ws.take<double>(size_t(segments_per_chunk * bh));

  cudaStream_t s = stream_of(c);
  for (int64_t seg0 = 0; seg0 < num_segments; seg0 += segments_per_chunk) {
    const int64_t nseg =
        num_segments - seg0 < segments_per_chunk ? num_segments - seg0 : segments_per_chunk;
    const int64_t items = nseg * H;
    relpos_partial_kernel<<<static_cast<unsigned>(ceil_div(items, kRelposWarps)),
                            kRelposWarps * 32, smem, s>>>(partial, dbias, buckets, H, TqTk,
                                                          num_buckets, seg0, items);
    SWT_CUDA_CHECK_LAUNCH();
    relpos_combine_kernel<<<static_cast<unsigned>(ceil_div(bh, kRelposCombineThreads)),
                            kRelposCombineThreads, 0, s>>>(dtable, carry, partial, nseg, bh,
                                                           seg0 == 0,
                                                           seg0 + nseg >= num_segments);
    SWT_CUDA_CHECK_LAUNCH();
  }
}

void relu_forward(const Ctx& c, float* out, const float* x, int64_t n) {
  if (n <= 0) return;
  relu_forward_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(out, x, n);
  SWT_CUDA_CHECK_LAUNCH();
}

void relu_backward(const Ctx& c, float* dx, const float* dout, const float* x, int64_t n) {
  if (n <= 0) return;
  relu_backward_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(dx, dout, x, n);
  SWT_CUDA_CHECK_LAUNCH();
}

void gated_gelu_forward(const Ctx& c, float* out, const float* a, const float* b, int64_t n) {
  if (n <= 0) return;
  gated_gelu_forward_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(out, a, b, n);
  SWT_CUDA_CHECK_LAUNCH();
}

void gated_gelu_backward(const Ctx& c, float* da, float* db, const float* dout, const float* a,
                         const float* b, int64_t n) {
  if (n <= 0) return;
  gated_gelu_backward_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(da, db, dout, a, b, n);
  SWT_CUDA_CHECK_LAUNCH();
}

void dropout(const Ctx& c, float* out, const float* x, int64_t n, uint32_t threshold,
             float keep_scale, uint64_t seed, const uint64_t* step) {
  if (n <= 0) return;
  dropout_kernel<<<grid_for((n + 3) / 4), kThreads, 0, stream_of(c)>>>(out, x, n, threshold,
                                                                       keep_scale, seed, step);
  SWT_CUDA_CHECK_LAUNCH();
}

void uniform_jitter(const Ctx& c, float* out, const float* x, int64_t n, float eps, uint64_t seed,
                    const uint64_t* step, uint64_t offset) {
  if (n <= 0) return;
  // The CPU's (1 - eps) + (2 * eps) * u, with the two constants formed in float as it does.
  const float one_minus_eps = 1.0f - eps;
  const float two_eps = 2.0f * eps;
  uniform_jitter_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(out, x, n, one_minus_eps,
                                                                    two_eps, seed, step, offset);
  SWT_CUDA_CHECK_LAUNCH();
}

}  // namespace switcht5::cuda
