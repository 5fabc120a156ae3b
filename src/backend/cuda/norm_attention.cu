// T5 RMSNorm and the attention softmax (alone, and fused with dropout) on the GPU (launchers declared in kernels.h; the math is
// backend.h's, the rounding points are the CPU backend's: cpu/cpu_backend.cpp).
//
// Row kernels. A "row group" of kGroup threads owns one row: kGroup = 32 is a warp (8 rows per
// 256-thread block), kGroup = 256 is the whole block. A row of up to kGroup * kPer elements is
// held in registers (kPer elements per thread, j = lane + k * kGroup); kPer = 0 streams longer
// rows from memory, pass by pass. Group and kPer are chosen from the row length alone.
//
// Determinism: every thread sums its own elements in increasing k, then the group combines the
// per-thread partials in a fixed tree (an xor butterfly in each warp, then warp partials in warp
// order). No atomics; each output element has exactly one writer. The dw column reduction of
// rmsnorm_backward goes through ctx.workspace in two passes (see there).
//
// In place: a thread reads and writes only its own elements of a row (probs or dropped over
// scores, dscores over dprobs), reading each before writing it, so aliasing needs no barrier.
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_util.cuh"
#include "backend/cuda/kernels.h"

namespace switcht5::cuda {

using detail::bf16_bits_to_f32;
using detail::blocks_for;
using detail::f32_to_bf16_bits;
using detail::key_seed;
using detail::MaxOp;
using detail::SumOp;
using detail::warp_reduce;

namespace {

constexpr int kBlock = 256;                       // threads per block, every kernel here
constexpr int kWarps = kBlock / 32;

template <int V>
using IntC = std::integral_constant<int, V>;



// Reduces v over the row group; every thread of the group gets the result. For kGroup == kBlock
// all threads of the block must call it (the loops over rows are block-uniform then); `smem`
// holds kWarps values.
template <int kGroup, class T, class Op>
__device__ __forceinline__ T group_reduce(T v, Op op, T* smem) {
  static_assert(kGroup == 32 || kGroup == kBlock, "a row group is a warp or the block");
  v = warp_reduce(v, op);
  if constexpr (kGroup == kBlock) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = smem[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v = op(v, smem[w]);
    __syncthreads();  // smem may be reused by the next reduction
  }
  return v;
}

// Calls launch(IntC<kGroup>, IntC<kPer>) with the row shape for rows of `len` elements.
template <class Launch>
void with_row_shape(int len, Launch&& launch) {
  if (len <= 32) launch(IntC<32>{}, IntC<1>{});
  else if (len <= 64) launch(IntC<32>{}, IntC<2>{});
  else if (len <= 128) launch(IntC<32>{}, IntC<4>{});
  else if (len <= 256) launch(IntC<32>{}, IntC<8>{});
  else if (len <= 512) launch(IntC<32>{}, IntC<16>{});
  else if (len <= 1024) launch(IntC<32>{}, IntC<32>{});
  else if (len <= 2048) launch(IntC<kBlock>{}, IntC<8>{});
  else if (len <= 4096) launch(IntC<kBlock>{}, IntC<16>{});
  else launch(IntC<kBlock>{}, IntC<0>{});
}

// ---- RMSNorm forward ----------------------------------------------------------------------------
// rstd[r] = 1 / sqrt(mean_j x[r,j]^2 + eps) (sum of squares in double, as the CPU);
// out[r,j] = (x[r,j] * rstd[r]) * w[j] in fp32.     x, out: [N,D]; rstd: [N]; w: [D]
template <int kGroup, int kPer>
__global__ void __launch_bounds__(kBlock)
rmsnorm_forward_kernel(float* __restrict__ out, float* __restrict__ rstd,
                       const float* __restrict__ x, const float* __restrict__ w, int64_t N, int D,
                       float eps) {
  constexpr int kRowsPerBlock = kBlock / kGroup;
  __shared__ double red[kWarps];
  const int lane = threadIdx.x % kGroup;
  for (int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; r < N;
       r += int64_t(gridDim.x) * kRowsPerBlock) {
    const float* xr = x + r * D;
    float* o = out + r * D;
    double ss = 0.0;
    if constexpr (kPer > 0) {
      float xv[kPer];
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int j = lane + k * kGroup;
        xv[k] = j < D ? xr[j] : 0.0f;
        ss += double(xv[k]) * double(xv[k]);
      }
      ss = group_reduce<kGroup>(ss, SumOp{}, red);
      const float rs = static_cast<float>(1.0 / sqrt(ss / D + double(eps)));
      if (lane == 0) rstd[r] = rs;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int j = lane + k * kGroup;
        if (j < D) o[j] = xv[k] * rs * w[j];
      }
    } else {
      for (int j = lane; j < D; j += kGroup) ss += double(xr[j]) * double(xr[j]);
      ss = group_reduce<kGroup>(ss, SumOp{}, red);
      const float rs = static_cast<float>(1.0 / sqrt(ss / D + double(eps)));
      if (lane == 0) rstd[r] = rs;
      for (int j = lane; j < D; j += kGroup) o[j] = xr[j] * rs * w[j];
    }
  }
}

// ---- RMSNorm backward, dx -----------------------------------------------------------------------
// dot = sum_j double(dout)*w*x (double);  c = float(dot / D) * rs * rs * rs;
// dx[r,j] = rs * w[j] * dout[r,j] - x[r,j] * c   (fp32, no fused multiply-add: the CPU's roundings)
template <int kGroup, int kPer>
__global__ void __launch_bounds__(kBlock)
rmsnorm_backward_dx_kernel(float* __restrict__ dx, const float* __restrict__ dout,
                           const float* __restrict__ x, const float* __restrict__ w,
                           const float* __restrict__ rstd, int64_t N, int D) {
  constexpr int kRowsPerBlock = kBlock / kGroup;
  __shared__ double red[kWarps];
  const int lane = threadIdx.x % kGroup;
  for (int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; r < N;
       r += int64_t(gridDim.x) * kRowsPerBlock) {
    const float* xr = x + r * D;
    const float* gr = dout + r * D;
    float* d = dx + r * D;
    const float rs = rstd[r];
    double dot = 0.0;
    if constexpr (kPer > 0) {
      float xv[kPer], gv[kPer], wv[kPer];
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int j = lane + k * kGroup;
        const bool in = j < D;
        xv[k] = in ? xr[j] : 0.0f;
        gv[k] = in ? gr[j] : 0.0f;
        wv[k] = in ? w[j] : 0.0f;
        dot += double(gv[k]) * double(wv[k]) * double(xv[k]);
      }
      dot = group_reduce<kGroup>(dot, SumOp{}, red);
      const float c = static_cast<float>(dot / D) * rs * rs * rs;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int j = lane + k * kGroup;
        if (j < D) d[j] = __fsub_rn(__fmul_rn(__fmul_rn(rs, wv[k]), gv[k]), __fmul_rn(xv[k], c));
      }
    } else {
      for (int j = lane; j < D; j += kGroup)
        dot += double(gr[j]) * double(w[j]) * double(xr[j]);
      dot = group_reduce<kGroup>(dot, SumOp{}, red);
      const float c = static_cast<float>(dot / D) * rs * rs * rs;
      for (int j = lane; j < D; j += kGroup)
        d[j] = __fsub_rn(__fmul_rn(__fmul_rn(rs, w[j]), gr[j]), __fmul_rn(xr[j], c));
    }
  }
}

// ---- RMSNorm backward, dw: a two-pass column reduction ------------------------------------------
// dw[j] += sum_r double(dout[r,j] * x[r,j] * rstd[r])   (the product in fp32, the sum in double)
// Columns go in tiles of at most kPartialCap; within a tile the rows are cut into `chunks` runs
// of `rows_per_chunk` consecutive rows. Pass 1: one thread per (chunk, column) sums its run in
// increasing r into partial[chunk, column] (double, in the workspace). Pass 2: one thread per
// column adds the chunk partials in chunk order, then dw[j] = float(dw[j] + total) as the CPU.
constexpr int64_t kPartialCap = int64_t(kWorkspaceBytes / sizeof(double));  // doubles
constexpr int64_t kMinRowsPerChunk = 32;
constexpr int64_t kMaxChunks = 4096;  // bounds pass 2's serial sum

__global__ void __launch_bounds__(kBlock)
rmsnorm_dw_partial_kernel(double* __restrict__ partial, const float* __restrict__ dout,
                          const float* __restrict__ x, const float* __restrict__ rstd, int64_t N,
                          int D, int col0, int tile_w, int64_t rows_per_chunk) {
  const int64_t chunk = blockIdx.x;
  const int jj = blockIdx.y * kBlock + threadIdx.x;  // column within the tile
  if (jj >= tile_w) return;
  const int j = col0 + jj;
  const int64_t r0 = chunk * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < N ? r0 + rows_per_chunk : N;
  double acc = 0.0;
  for (int64_t r = r0; r < r1; ++r) acc += double(dout[r * D + j] * x[r * D + j] * rstd[r]);
  partial[chunk * tile_w + jj] = acc;
}

__global__ void __launch_bounds__(kBlock)
rmsnorm_dw_finish_kernel(float* __restrict__ dw, const double* __restrict__ partial, int col0,
                         int tile_w, int64_t chunks) {
  const int jj = blockIdx.x * kBlock + threadIdx.x;
  if (jj >= tile_w) return;
  double total = 0.0;
  for (int64_t k = 0; k < chunks; ++k) total += partial[k * tile_w + jj];
  dw[col0 + jj] = static_cast<float>(double(dw[col0 + jj]) + total);
}


// ---- softmax backward ---------------------------------------------------------------------------
// dot = sum_j double(dp_j) * p_j (double); ds_j = p_j * (dp_j - float(dot)) in fp32.
template <int kGroup, int kPer>
__global__ void __launch_bounds__(kBlock)
softmax_backward_kernel(float* dscores, const float* dprobs, const float* __restrict__ probs,
                        int64_t rows, int Tk) {
  constexpr int kRowsPerBlock = kBlock / kGroup;
  __shared__ double red[kWarps];
  const int lane = threadIdx.x % kGroup;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; row < rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const float* dp = dprobs + row * Tk;
    const float* p = probs + row * Tk;
    float* ds = dscores + row * Tk;  // may alias dp
    double dot = 0.0;
    if constexpr (kPer > 0) {
      float dv[kPer], pv[kPer];
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int j = lane + k * kGroup;
        dv[k] = j < Tk ? dp[j] : 0.0f;
        pv[k] = j < Tk ? p[j] : 0.0f;
        dot += double(dv[k]) * double(pv[k]);
      }
      dot = group_reduce<kGroup>(dot, SumOp{}, red);
      const float dotf = static_cast<float>(dot);
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int j = lane + k * kGroup;
        if (j < Tk) ds[j] = pv[k] * (dv[k] - dotf);
      }
    } else {
      for (int j = lane; j < Tk; j += kGroup) dot += double(dp[j]) * double(p[j]);
      dot = group_reduce<kGroup>(dot, SumOp{}, red);
      const float dotf = static_cast<float>(dot);
      for (int j = lane; j < Tk; j += kGroup) ds[j] = p[j] * (dp[j] - dotf);
    }
  }
}

// ---- attention softmax + dropout, fused (forward) -----------------------------------------------
// Row (b,h,i) of [B,H,Tq,Tk]: x_j = scores + bias[h,i,j] (fp32), allowed j: j < jmax (causal:
// jmax = min(Tk, i+1)) and key_mask[b,j] != 0. mx = max over allowed x_j (fp32);
// e_j = expf(x_j - mx) for allowed j, else 0; z = sum_j e_j in double; inv_z = float(1/z), 0
// when z == 0 (no allowed key: the row is all zeros). Then, element by element while it is in
// registers:
//   pj = e_j * inv_z, rounded to a bf16 value when probs is bf16 (probs_bf16), stored to probs;
//   dropped_j = pj / keep_scale (a true division) if random16(seed, row*Tk + j) >= threshold,
//   else +0.0f, rounded to a bf16 value when probs is bf16 (Backend::dropout's mask over the
//   whole tensor). threshold 0 and keep_scale 1 (p == 0) copy pj.
// The random bits are one splitmix64 mix per element (a lane's elements are kGroup apart, so the
// four elements a mix serves belong to different lanes): about 20 integer operations, which
// the kernel hides behind its memory traffic.
// Aliasing: an fp32 probs or dropped may be scores; every element is read before it is written,
// by the thread that writes it. Rows longer than the register path (kPer == 0) take a third
// pass that recomputes e_j from scores rather than keeping it anywhere.
__device__ __forceinline__ float bf16_value(float x) {  // round_to_bf16
  return bf16_bits_to_f32(f32_to_bf16_bits(x));
}

// Backend::dropout of element `index` of the [B,H,Tq,Tk] tensor (threshold = dropout_threshold(p),
// keep_scale = 1 - p, both from the host).
__device__ __forceinline__ float dropout_element(float x, uint64_t seed, uint64_t index,
                                                 uint32_t threshold, float keep_scale) {
  if (threshold != 0 && random16(seed, index) < threshold) return 0.0f;
  return __fdiv_rn(x, keep_scale);
}

template <int kGroup, int kPer>
__global__ void __launch_bounds__(kBlock)
attention_softmax_dropout_kernel(void* probs, bool probs_bf16, float* dropped,
                                 const float* scores, const float* __restrict__ bias,
                                 const float* __restrict__ key_mask, int H, int Tq, int Tk,
                                 bool causal, int64_t rows, uint32_t threshold, float keep_scale,
                                 uint64_t key, const uint64_t* step) {
  static_assert(kPer <= 32, "the allowed-mask is one 32-bit word per thread");
  constexpr int kRowsPerBlock = kBlock / kGroup;
  __shared__ float red_max[kWarps];
  __shared__ double red_sum[kWarps];
  const int lane = threadIdx.x % kGroup;
  const uint64_t seed = threshold != 0 ? key_seed(key, step) : 0;
  // pj as stored: rounded (bf16 probs) and written to probs; then dropped_j.
  auto store = [&](int64_t at, float pj) {
    if (probs_bf16) {
      const uint16_t bits = f32_to_bf16_bits(pj);
      static_cast<uint16_t*>(probs)[at] = bits;
      pj = bf16_bits_to_f32(bits);
    } else {
      static_cast<float*>(probs)[at] = pj;
    }
    if (dropped) {
      const float d = dropout_element(pj, seed, uint64_t(at), threshold, keep_scale);
      dropped[at] = probs_bf16 ? bf16_value(d) : d;
    }
  };
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; row < rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const int i = static_cast<int>(row % Tq);
    const int h = static_cast<int>((row / Tq) % H);
    const int64_t b = row / (int64_t(Tq) * H);
    const float* s = scores + row * Tk;
    const float* bi = bias ? bias + (int64_t(h) * Tq + i) * Tk : nullptr;
    const float* km = key_mask ? key_mask + b * Tk : nullptr;
    const int jmax = causal ? min(Tk, i + 1) : Tk;
    float mx = -CUDART_INF_F;
    double z = 0.0;
    if constexpr (kPer > 0) {
      float v[kPer];
      uint32_t allowed = 0;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int j = lane + k * kGroup;
        v[k] = 0.0f;
        if (j < jmax && (!km || km[j] != 0.0f)) {
          allowed |= 1u << k;
          v[k] = s[j] + (bi ? bi[j] : 0.0f);
          mx = MaxOp{}(mx, v[k]);
        }
      }
      mx = group_reduce<kGroup>(mx, MaxOp{}, red_max);
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        v[k] = (allowed >> k) & 1u ? expf(v[k] - mx) : 0.0f;
        z += double(v[k]);
      }
      z = group_reduce<kGroup>(z, SumOp{}, red_sum);
      const float inv_z = z > 0.0 ? static_cast<float>(1.0 / z) : 0.0f;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int j = lane + k * kGroup;
        if (j < Tk) store(row * Tk + j, __fmul_rn(v[k], inv_z));
      }
    } else {
      auto exp_at = [&](int j) {
        const bool ok = j < jmax && (!km || km[j] != 0.0f);
        return ok ? expf(s[j] + (bi ? bi[j] : 0.0f) - mx) : 0.0f;
      };
      for (int j = lane; j < jmax; j += kGroup)
        if (!km || km[j] != 0.0f) mx = MaxOp{}(mx, s[j] + (bi ? bi[j] : 0.0f));
      mx = group_reduce<kGroup>(mx, MaxOp{}, red_max);
      for (int j = lane; j < Tk; j += kGroup) z += double(exp_at(j));
      z = group_reduce<kGroup>(z, SumOp{}, red_sum);
      const float inv_z = z > 0.0 ? static_cast<float>(1.0 / z) : 0.0f;
      for (int j = lane; j < Tk; j += kGroup) store(row * Tk + j, __fmul_rn(exp_at(j), inv_z));
    }
  }
}

// ---- attention softmax + dropout, fused (backward) ----------------------------------------------
// One row group per (h, i), its B rows in order b = 0, 1, ...: for row (b,h,i)
//   g_j  = dropout_element(dprobs_j)   (the forward's mask; threshold 0 copies)
//   dot  = sum_j double(g_j) * p_j;    d_j = p_j * (g_j - float(dot))   (softmax_backward_kernel)
//   dbias[h,i,j] = float(double(dbias[h,i,j]) + d_j(b=0) + d_j(b=1) + ...)   (sum_over_batch)
//   dscores_j = d_j, rounded to a bf16 value when round_bf16 (after the sum takes it).
// The register path keeps the running sums in double registers; the streaming path (kPer == 0)
// writes d, then sums and rounds its own elements over b from memory. A thread touches only its
// own elements, so dscores may alias dprobs.
template <int kGroup, int kPer>
__global__ void __launch_bounds__(kBlock)
attention_softmax_dropout_backward_kernel(float* dscores, float* __restrict__ dbias,
                                          const float* dprobs, const float* __restrict__ probs,
                                          int B, int64_t head_rows, int Tk, bool round_bf16,
                                          uint32_t threshold, float keep_scale, uint64_t key,
                                          const uint64_t* step) {
  constexpr int kRowsPerBlock = kBlock / kGroup;
  __shared__ double red[kWarps];
  const int lane = threadIdx.x % kGroup;
  const uint64_t seed = threshold != 0 ? key_seed(key, step) : 0;
  const int64_t batch_stride = head_rows * Tk;
  for (int64_t hi = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; hi < head_rows;
       hi += int64_t(gridDim.x) * kRowsPerBlock) {
    float* db = dbias ? dbias + hi * Tk : nullptr;
    if constexpr (kPer > 0) {
      double acc[kPer];
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int j = lane + k * kGroup;
        acc[k] = db && j < Tk ? double(db[j]) : 0.0;
      }
      for (int b = 0; b < B; ++b) {
        const int64_t at = b * batch_stride + hi * Tk;  // element (b,h,i,0)
        float gv[kPer], pv[kPer];
        double dot = 0.0;
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
          const int j = lane + k * kGroup;
          const bool in = j < Tk;
          gv[k] = in ? dropout_element(dprobs[at + j], seed, uint64_t(at + j), threshold,
                                       keep_scale)
                     : 0.0f;
          pv[k] = in ? probs[at + j] : 0.0f;
          dot += double(gv[k]) * double(pv[k]);
        }
        dot = group_reduce<kGroup>(dot, SumOp{}, red);
        const float dotf = static_cast<float>(dot);
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
          const int j = lane + k * kGroup;
          if (j >= Tk) continue;
          const float d = __fmul_rn(pv[k], __fsub_rn(gv[k], dotf));
          acc[k] += double(d);
          dscores[at + j] = round_bf16 ? bf16_value(d) : d;
        }
      }
      if (db) {
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
          const int j = lane + k * kGroup;
          if (j < Tk) db[j] = static_cast<float>(acc[k]);
        }
      }
    } else {
      const bool round_now = round_bf16 && !db;  // else after the sum has read d
      for (int b = 0; b < B; ++b) {
        const int64_t at = b * batch_stride + hi * Tk;
        double dot = 0.0;
        for (int j = lane; j < Tk; j += kGroup) {
          const float g =
              dropout_element(dprobs[at + j], seed, uint64_t(at + j), threshold, keep_scale);
          dscores[at + j] = g;
          dot += double(g) * double(probs[at + j]);
        }
        dot = group_reduce<kGroup>(dot, SumOp{}, red);
        const float dotf = static_cast<float>(dot);
        for (int j = lane; j < Tk; j += kGroup) {
          const float d = __fmul_rn(probs[at + j], __fsub_rn(dscores[at + j], dotf));
          dscores[at + j] = round_now ? bf16_value(d) : d;
        }
      }
      if (db) {
        for (int j = lane; j < Tk; j += kGroup) {
          double acc = double(db[j]);
          for (int b = 0; b < B; ++b) {
            float* d = dscores + b * batch_stride + hi * Tk + j;
            acc += double(*d);
            if (round_bf16) *d = bf16_value(*d);
          }
          db[j] = static_cast<float>(acc);
        }
      }
    }
  }
}

void require_workspace(const Ctx& c, const char* file, int line) {
  if (c.workspace == nullptr || c.workspace_bytes < kWorkspaceBytes)
    cuda_fail(file, line, "Ctx::workspace", "CUDA", 0,
              "the launcher needs ctx.workspace of kWorkspaceBytes (internal error)");
}

}  // namespace

void rmsnorm_forward(const Ctx& c, float* out, float* rstd, const float* x, const float* w,
                     int64_t N, int D, float eps) {
  if (N <= 0 || D <= 0) return;
  with_row_shape(D, [&](auto group, auto per) {
    constexpr int kGroup = decltype(group)::value, kPer = decltype(per)::value;
    const int64_t blocks = blocks_for(N, kBlock / kGroup);
    rmsnorm_forward_kernel<kGroup, kPer>
        <<<unsigned(blocks), kBlock, 0, c.stream>>>(out, rstd, x, w, N, D, eps);
    SWT_CUDA_CHECK_LAUNCH();
  });
}

void rmsnorm_backward(const Ctx& c, float* dx, float* dw, const float* dout, const float* x,
                      const float* w, const float* rstd, int64_t N, int D) {
  if (N <= 0 || D <= 0) return;
  with_row_shape(D, [&](auto group, auto per) {
    constexpr int kGroup = decltype(group)::value, kPer = decltype(per)::value;
    const int64_t blocks = blocks_for(N, kBlock / kGroup);
    rmsnorm_backward_dx_kernel<kGroup, kPer>
        <<<unsigned(blocks), kBlock, 0, c.stream>>>(dx, dout, x, w, rstd, N, D);
    SWT_CUDA_CHECK_LAUNCH();
  });

  require_workspace(c, __FILE__, __LINE__);
  double* partial = static_cast<double*>(c.workspace);
  const int max_tile = static_cast<int>(std::min<int64_t>(D, kPartialCap));
  for (int col0 = 0; col0 < D; col0 += max_tile) {  // one tile unless D > 512Ki
    const int tile_w = std::min(max_tile, D - col0);
    const int64_t max_chunks = std::max<int64_t>(1, std::min(kMaxChunks, kPartialCap / tile_w));
    const int64_t rows_per_chunk =
        std::max(kMinRowsPerChunk, (N + max_chunks - 1) / max_chunks);
    const int64_t chunks = (N + rows_per_chunk - 1) / rows_per_chunk;  // <= max_chunks
    const unsigned col_blocks = unsigned((tile_w + kBlock - 1) / kBlock);
    rmsnorm_dw_partial_kernel<<<dim3(unsigned(chunks), col_blocks), kBlock, 0, c.stream>>>(
        partial, dout, x, rstd, N, D, col0, tile_w, rows_per_chunk);
    SWT_CUDA_CHECK_LAUNCH();
    rmsnorm_dw_finish_kernel<<<col_blocks, kBlock, 0, c.stream>>>(dw, partial, col0, tile_w,
                                                                  chunks);
    SWT_CUDA_CHECK_LAUNCH();
  }
}

void attention_softmax_forward(const Ctx& c, float* probs, const float* scores, const float* bias,
                               const float* key_mask, int B, int H, int Tq, int Tk, bool causal) {
  const int64_t rows = int64_t(B) * H * Tq;
  if (rows <= 0 || Tk <= 0) return;
  // The fused kernel without dropout, fp32 probs: one kernel for both ops.
  attention_softmax_dropout_forward(c, probs, /*probs_bf16=*/false, /*dropped=*/nullptr, scores,
                                    bias, key_mask, B, H, Tq, Tk, causal, /*threshold=*/0,
                                    /*keep_scale=*/1.0f, /*seed=*/0, /*step=*/nullptr);
}

void softmax_backward(const Ctx& c, float* dscores, const float* dprobs, const float* probs,
                      int64_t rows, int Tk) {
  if (rows <= 0 || Tk <= 0) return;
  with_row_shape(Tk, [&](auto group, auto per) {
    constexpr int kGroup = decltype(group)::value, kPer = decltype(per)::value;
    const int64_t blocks = blocks_for(rows, kBlock / kGroup);
    softmax_backward_kernel<kGroup, kPer>
        <<<unsigned(blocks), kBlock, 0, c.stream>>>(dscores, dprobs, probs, rows, Tk);
    SWT_CUDA_CHECK_LAUNCH();
  });
}

void attention_softmax_dropout_forward(const Ctx& c, void* probs, bool probs_bf16, float* dropped,
                                       const float* scores, const float* bias,
                                       const float* key_mask, int B, int H, int Tq, int Tk,
                                       bool causal, uint32_t threshold, float keep_scale,
                                       uint64_t seed, const uint64_t* step) {
  const int64_t rows = int64_t(B) * H * Tq;
  if (rows <= 0 || Tk <= 0) return;
  with_row_shape(Tk, [&](auto group, auto per) {
    constexpr int kGroup = decltype(group)::value, kPer = decltype(per)::value;
    const int64_t blocks = blocks_for(rows, kBlock / kGroup);
    attention_softmax_dropout_kernel<kGroup, kPer><<<unsigned(blocks), kBlock, 0, c.stream>>>(
        probs, probs_bf16, dropped, scores, bias, key_mask, H, Tq, Tk, causal, rows, threshold,
        keep_scale, seed, step);
    SWT_CUDA_CHECK_LAUNCH();
  });
}

void attention_softmax_dropout_backward(const Ctx& c, float* dscores, float* dbias,
                                        const float* dprobs, const float* probs, int B, int H,
                                        int Tq, int Tk, bool round_bf16, uint32_t threshold,
                                        float keep_scale, uint64_t seed, const uint64_t* step) {
  const int64_t head_rows = int64_t(H) * Tq;
  if (B <= 0 || head_rows <= 0 || Tk <= 0) return;
  with_row_shape(Tk, [&](auto group, auto per) {
    constexpr int kGroup = decltype(group)::value, kPer = decltype(per)::value;
    const int64_t blocks = blocks_for(head_rows, kBlock / kGroup);
    attention_softmax_dropout_backward_kernel<kGroup, kPer>
        <<<unsigned(blocks), kBlock, 0, c.stream>>>(dscores, dbias, dprobs, probs, B, head_rows,
                                                    Tk, round_bf16, threshold, keep_scale, seed,
                                                    step);
    SWT_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace switcht5::cuda
