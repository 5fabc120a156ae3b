// Cross-entropy, the Switch router and token dispatch/combine on the GPU (launchers declared in
// kernels.h; the math is backend.h's, the rounding points are the CPU backend's:
// cpu/cpu_backend.cpp).
//
// Legend (as backend.h): G groups of S tokens, T = G*S, token t = g*S + s; E experts; capacity C
// per expert per group; an expert's buffer has GC = G*C rows of D columns: its kept tokens first,
// group by group (pass 3 of router_forward packs them), then empty rows.
//
// Determinism: no atomics; every output element has one writer; every sum runs in a fixed order
// (per-thread partials in increasing index, then an xor butterfly in each warp, then warp
// partials in warp order). Capacity positions come from a scan per (group, expert) over the
// group's tokens in increasing s, so slots are exactly the CPU's. Dispatch and combine-backward
// fill whole expert buffers through a row -> token map built in ctx.workspace.
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_util.cuh"
#include "backend/cuda/kernels.h"

namespace switcht5::cuda {

using detail::blocks_for;
using detail::MaxOp;
using detail::SumOp;
using detail::warp_reduce;

namespace {

constexpr int kBlock = 256;  // threads per block, every kernel here
constexpr int kWarps = kBlock / 32;


void require_workspace(const Ctx& c, const char* file, int line) {
  if (c.workspace == nullptr || c.workspace_bytes < kWorkspaceBytes)
    cuda_fail(file, line, "Ctx::workspace", "CUDA", 0,
              "the launcher needs ctx.workspace of kWorkspaceBytes (internal error)");
}


// Reduces v over the block (all threads must call it); every thread gets the result.
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* smem /* [kWarps] */) {
  v = warp_reduce(v, op);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = smem[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) v = op(v, smem[w]);
  __syncthreads();  // smem may be reused by the next reduction
  return v;
}

// ---- cross-entropy ------------------------------------------------------------------------------
// One block per row of logits [N,V] (grid-stride over rows). Two passes as the CPU:
// mx = max_v logits (fp32); z = sum_v double(expf(logits - mx)); lse = float(double(mx) + log z);
// loss = float(l - double(logits[label])) for label >= 0, else 0.
__global__ void __launch_bounds__(kBlock)
cross_entropy_forward_kernel(float* __restrict__ loss, float* __restrict__ lse,
                             const float* __restrict__ logits, const int32_t* __restrict__ labels,
                             int64_t N, int V) {
  __shared__ float red_max[kWarps];
  __shared__ double red_sum[kWarps];
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const float* row = logits + r * V;
    float mx = -CUDART_INF_F;
    for (int v = threadIdx.x; v < V; v += kBlock) mx = MaxOp{}(mx, row[v]);
    mx = block_reduce(mx, MaxOp{}, red_max);
    double z = 0.0;
    for (int v = threadIdx.x; v < V; v += kBlock) z += double(expf(row[v] - mx));
    z = block_reduce(z, SumOp{}, red_sum);
    if (threadIdx.x == 0) {
      const double l = double(mx) + log(z);
      const int32_t label = labels[r];
      lse[r] = static_cast<float>(l);
      loss[r] = label >= 0 && label < V ? static_cast<float>(l - double(row[label])) : 0.0f;
    }
  }
}

// dlogits[r,v] = factor * expf(logits[r,v] - lse[r]) - [v == label] * scale,
// factor = scale * (1 + 2 z_coef lse[r]), in fp32 with the CPU's roundings (no fused
// multiply-add); 0 on ignored rows. In place: each thread reads, then writes, its own elements.
__global__ void __launch_bounds__(kBlock)
cross_entropy_backward_kernel(float* dlogits, const float* logits, const float* __restrict__ lse,
                              const int32_t* __restrict__ labels, int64_t N, int V, float scale,
                              const float* __restrict__ scale_by, float z_coef) {
  if (scale_by) scale = __fmul_rn(scale, *scale_by);  // read when the kernel runs
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    float* d = dlogits + r * V;
    const float* row = logits + r * V;
    const int32_t label = labels[r];
    if (label < 0) {
      for (int v = threadIdx.x; v < V; v += kBlock) d[v] = 0.0f;
      continue;
    }
    const float l = lse[r];
    const float factor = __fmul_rn(scale, __fadd_rn(1.0f, __fmul_rn(__fmul_rn(2.0f, z_coef), l)));
    for (int v = threadIdx.x; v < V; v += kBlock) {
      const float g = __fmul_rn(factor, expf(row[v] - l));
      d[v] = v == label ? __fsub_rn(g, scale) : g;
    }
  }
}

// ---- router forward -----------------------------------------------------------------------------
// Pass 1, one thread per token, experts in increasing e exactly as the CPU (in double, so that
// near-ties pick the CPU's expert): probs, lse, expert (argmax of the stored float probs, lowest
// index on ties), gate.
__global__ void __launch_bounds__(kBlock)
router_softmax_kernel(float* __restrict__ probs, float* __restrict__ lse,
                      int32_t* __restrict__ expert, float* __restrict__ gate,
                      const float* __restrict__ logits, int64_t T, int E) {
  for (int64_t t = int64_t(blockIdx.x) * kBlock + threadIdx.x; t < T;
       t += int64_t(gridDim.x) * kBlock) {
    const float* lg = logits + t * E;
    float* p = probs + t * E;
    double mx = -CUDART_INF;
    for (int e = 0; e < E; ++e) {
      const double v = lg[e];
      mx = mx < v ? v : mx;
    }
    double z = 0.0;
    for (int e = 0; e < E; ++e) z += exp(double(lg[e]) - mx);
    int best = 0;
    float best_p = 0.0f;
    for (int e = 0; e < E; ++e) {
      const float pe = static_cast<float>(exp(double(lg[e]) - mx) / z);
      p[e] = pe;
      if (e == 0 || pe > best_p) {
        best = e;
        best_p = pe;
      }
    }
    lse[t] = static_cast<float>(mx + log(z));
    expert[t] = best;
    gate[t] = best_p;
  }
}

// Pass 2, one block per (group g, expert e), grid-stride over the G*E pairs: a scan over the
// group's tokens in tiles of kBlock (increasing s). position = number of earlier tokens of g
// with expert e; slot = position if position < C, else -1 (pass 3 adds the group's offset).
// Only the block of a token's own expert writes its slot; counts[g,e] = the pair's total
// (float, exact below 2^24).
__global__ void __launch_bounds__(kBlock)
router_positions_kernel(int32_t* __restrict__ slot, float* __restrict__ counts,
                        const int32_t* __restrict__ expert, int G, int S, int E, int C) {
  __shared__ int warp_count[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t lanes_below = (1u << lane) - 1u;
  for (int64_t pair = blockIdx.x; pair < int64_t(G) * E; pair += gridDim.x) {
    const int g = static_cast<int>(pair / E), e = static_cast<int>(pair % E);
    const int32_t* ex = expert + int64_t(g) * S;
    int32_t* sl = slot + int64_t(g) * S;
    int base = 0;  // tokens of (g, e) in earlier tiles
    for (int s0 = 0; s0 < S; s0 += kBlock) {
      const int s = s0 + static_cast<int>(threadIdx.x);
      const bool mine = s < S && ex[s] == e;
      const uint32_t ballot = __ballot_sync(0xffffffffu, mine);
      if (lane == 0) warp_count[warp] = __popc(ballot);
      __syncthreads();
      int below = 0, total = 0;  // tokens of (g, e) in earlier warps of this tile; in the tile
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        below += w < warp ? warp_count[w] : 0;
        total += warp_count[w];
      }
      if (mine) {
        const int position = base + below + __popc(ballot & lanes_below);
        sl[s] = position < C ? position : -1;
      }
      base += total;
      __syncthreads();  // warp_count is rewritten by the next tile
    }
    if (threadIdx.x == 0) counts[pair] = static_cast<float>(base);
  }
}

// Pass 3a, one thread per expert e, groups [g0, g1): offset[(g - g0)*E + e] = kept tokens of e
// in groups before g (rows[e] carries the running sum from chunk to chunk; g0 == 0 starts it),
// kept = min(counts[g,e], C). Serial over the groups: G*E integer adds, next to nothing.
__global__ void __launch_bounds__(kBlock)
router_offsets_kernel(int32_t* __restrict__ offset, int32_t* __restrict__ rows,
                      const float* __restrict__ counts, int g0, int g1, int E, int C) {
  for (int e = int(blockIdx.x) * kBlock + int(threadIdx.x); e < E; e += int(gridDim.x) * kBlock) {
    int32_t run = g0 == 0 ? 0 : rows[e];
    for (int g = g0; g < g1; ++g) {
      offset[int64_t(g - g0) * E + e] = run;
      run += min(static_cast<int32_t>(counts[int64_t(g) * E + e]), int32_t(C));
    }
    rows[e] = run;
  }
}

// Pass 3b, one thread per token of groups [g0, g1): a kept token's slot += its group's offset.
__global__ void __launch_bounds__(kBlock)
router_pack_kernel(int32_t* __restrict__ slot, const int32_t* __restrict__ offset,
                   const int32_t* __restrict__ expert, int g0, int g1, int S, int E) {
  const int64_t n = int64_t(g1 - g0) * S;
  for (int64_t i = int64_t(blockIdx.x) * kBlock + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kBlock) {
    const int64_t t = int64_t(g0) * S + i;
    if (slot[t] >= 0) slot[t] += offset[(i / S) * E + expert[t]];
  }
}

// ---- router balance loss ------------------------------------------------------------------------
// One block per group: lb[g] = float(E * sum_e double(counts[g,e]) * P_e / (double(S) * S)),
// P_e = sum_s double(probs[g*S+s, e]). The block is 8 rows x 32 columns: column tx takes experts
// e0 + tx, row ty takes tokens s = ty, ty+8, ...; the 8 row partials are added in row order, the
// per-lane totals over e0 by warp 0's butterfly.
__global__ void __launch_bounds__(kBlock)
router_balance_loss_kernel(float* __restrict__ lb, const float* __restrict__ probs,
                           const float* __restrict__ counts, int G, int S, int E) {
  __shared__ double part[kWarps][33];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  for (int g = blockIdx.x; g < G; g += gridDim.x) {
    const float* pg = probs + int64_t(g) * S * E;
    double lane_total = 0.0;  // used by warp 0
    for (int e0 = 0; e0 < E; e0 += 32) {
      const int e = e0 + tx;
      double acc = 0.0;
      if (e < E)
        for (int s = ty; s < S; s += kWarps) acc += double(pg[int64_t(s) * E + e]);
      part[ty][tx] = acc;
      __syncthreads();
      if (ty == 0 && e < E) {
        double prob_sum = 0.0;
#pragma unroll
        for (int k = 0; k < kWarps; ++k) prob_sum += part[k][tx];
        lane_total += double(counts[int64_t(g) * E + e]) * prob_sum;
      }
      __syncthreads();
    }
    if (ty == 0) {
      const double total = warp_reduce(lane_total, SumOp{});
      if (tx == 0) lb[g] = static_cast<float>(E * total / (double(S) * S));
    }
  }
}

// ---- router backward ----------------------------------------------------------------------------
// One thread per token, experts in increasing e as the CPU, in double:
//   dprob_e = lb_coef * counts[g,e] + [e == expert] dgate,   lb_coef = lb_scale * E / S^2
//   dlogits = float(p_e * (dprob_e - sum_e' dprob_e' p_e' + 2 z_scale lse))
__global__ void __launch_bounds__(kBlock)
router_backward_kernel(float* __restrict__ dlogits, const float* __restrict__ probs,
                       const float* __restrict__ lse, const int32_t* __restrict__ expert,
                       const float* __restrict__ dgate, const float* __restrict__ counts,
                       int64_t T, int S, int E, double lb_coef, float z_scale) {
  for (int64_t t = int64_t(blockIdx.x) * kBlock + threadIdx.x; t < T;
       t += int64_t(gridDim.x) * kBlock) {
    const float* p = probs + t * E;
    const float* counts_g = counts + (t / S) * E;
    const int ex = expert[t];
    const double dg = double(dgate[t]);
    // Explicit _rn operations: nvcc would fuse a*b + c into one FMA (one rounding) where the CPU
    // rounds the product and then the sum; spelled out, this is bitwise the CPU's order.
    double dot = 0.0;
    for (int e = 0; e < E; ++e) {
      const double dprob = __dadd_rn(__dmul_rn(lb_coef, double(counts_g[e])), e == ex ? dg : 0.0);
      dot = __dadd_rn(dot, __dmul_rn(dprob, double(p[e])));
    }
    const double z_term = __dmul_rn(__dmul_rn(double(z_scale), 2.0), double(lse[t]));
    float* d = dlogits + t * E;
    for (int e = 0; e < E; ++e) {
      const double dprob = __dadd_rn(__dmul_rn(lb_coef, double(counts_g[e])), e == ex ? dg : 0.0);
      d[e] = static_cast<float>(__dmul_rn(double(p[e]), __dadd_rn(__dsub_rn(dprob, dot), z_term)));
    }
  }
}

// ---- dispatch and combine -----------------------------------------------------------------------
// Expert buffers [E, GC, D] are written whole, one writer per element, through a map from buffer
// row to token (int64, -1 for an empty row) in the workspace. Rows go in ranges of at most
// kMapCap rows [row0, row1) of the flat E*GC rows, in increasing order (one range unless
// E*GC > 512Ki): per range, (1) the map is set to -1, (2) each kept token writes its row's entry
// (router_forward gives each (expert, slot) at most one token), (3) one thread per buffer element
// copies (and scales) its token's value or writes 0.
constexpr int64_t kMapCap = int64_t(kWorkspaceBytes / sizeof(int64_t));

__global__ void __launch_bounds__(kBlock)
map_clear_kernel(int64_t* __restrict__ map, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * kBlock + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kBlock)
    map[i] = -1;
}

__global__ void __launch_bounds__(kBlock)
map_scatter_kernel(int64_t* __restrict__ map, const int32_t* __restrict__ expert,
                   const int32_t* __restrict__ slot, int64_t T, int E, int GC, int64_t row0,
                   int64_t row1) {
  for (int64_t t = int64_t(blockIdx.x) * kBlock + threadIdx.x; t < T;
       t += int64_t(gridDim.x) * kBlock) {
    const int32_t e = expert[t], s = slot[t];
    if (s < 0 || s >= GC || e < 0 || e >= E) continue;  // dropped (or invalid: left empty)
    const int64_t row = int64_t(e) * GC + s;
    if (row >= row0 && row < row1) map[row - row0] = t;
  }
}

// buf[row0 + i, d] = (gate ? gate[t] : 1) * src[t, d] for t = map[i] >= 0, else 0.
__global__ void __launch_bounds__(kBlock)
map_fill_kernel(float* __restrict__ buf, const float* __restrict__ src,
                const float* __restrict__ gate, const int64_t* __restrict__ map, int64_t row0,
                int64_t rows, int D) {
  const int64_t n = rows * D;
  float* out = buf + row0 * D;
  for (int64_t i = int64_t(blockIdx.x) * kBlock + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kBlock) {
    const int64_t r = i / D;
    const int64_t t = map[r];
    float v = 0.0f;
    if (t >= 0) {
      v = src[t * D + (i - r * D)];
      if (gate) v = gate[t] * v;
    }
    out[i] = v;
  }
}

void fill_expert_buffer(const Ctx& c, float* buf, const float* src, const float* gate,
                        const int32_t* expert, const int32_t* slot, int64_t T, int D, int E,
                        int GC) {
  const int64_t rows = int64_t(E) * GC;
  if (rows <= 0 || D <= 0) return;
  require_workspace(c, __FILE__, __LINE__);
  int64_t* map = static_cast<int64_t*>(c.workspace);
  for (int64_t row0 = 0; row0 < rows; row0 += kMapCap) {
    const int64_t n = std::min(kMapCap, rows - row0);
    map_clear_kernel<<<unsigned(blocks_for(n, kBlock)), kBlock, 0, c.stream>>>(map, n);
    SWT_CUDA_CHECK_LAUNCH();
    if (T > 0) {
      map_scatter_kernel<<<unsigned(blocks_for(T, kBlock)), kBlock, 0, c.stream>>>(
          map, expert, slot, T, E, GC, row0, row0 + n);
      SWT_CUDA_CHECK_LAUNCH();
    }
    map_fill_kernel<<<unsigned(blocks_for(n * D, kBlock)), kBlock, 0, c.stream>>>(
        buf, src, gate, map, row0, n, D);
    SWT_CUDA_CHECK_LAUNCH();
  }
}

// out[t, d] = kept ? (gate ? gate[t] : 1) * buf[expert[t], slot[t], d] : 0, one thread per
// element (moe_dispatch_backward without gate, moe_combine with it).
__global__ void __launch_bounds__(kBlock)
gather_rows_kernel(float* __restrict__ out, const float* __restrict__ buf,
                   const float* __restrict__ gate, const int32_t* __restrict__ expert,
                   const int32_t* __restrict__ slot, int64_t T, int D, int GC) {
  const int64_t n = T * D;
  for (int64_t i = int64_t(blockIdx.x) * kBlock + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kBlock) {
    const int64_t t = i / D;
    const int32_t s = slot[t], e = expert[t];
    float v = 0.0f;
    if (s >= 0 && s < GC && e >= 0) {
      v = buf[(int64_t(e) * GC + s) * D + (i - t * D)];
      if (gate) v = gate[t] * v;
    }
    out[i] = v;
  }
}

// dgate[t] = float(sum_d double(dout[t,d]) * buf[e,r,d]) for kept tokens, 0 for dropped ones.
// One warp per token (8 per block); lanes take d = lane, lane+32, ...
__global__ void __launch_bounds__(kBlock)
combine_dgate_kernel(float* __restrict__ dgate, const float* __restrict__ dout,
                     const float* __restrict__ buf, const int32_t* __restrict__ expert,
                     const int32_t* __restrict__ slot, int64_t T, int D, int E, int GC) {
  const int lane = threadIdx.x % 32;
  for (int64_t t = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; t < T;
       t += int64_t(gridDim.x) * kWarps) {
    const int32_t s = slot[t], e = expert[t];
    if (s < 0 || s >= GC || e < 0 || e >= E) {  // warp-uniform: the whole warp has token t
      if (lane == 0) dgate[t] = 0.0f;
      continue;
    }
    const float* g = dout + t * D;
    const float* row = buf + (int64_t(e) * GC + s) * D;
    double dot = 0.0;
    for (int d = lane; d < D; d += 32) dot += double(g[d]) * double(row[d]);
    dot = warp_reduce(dot, SumOp{});
    if (lane == 0) dgate[t] = static_cast<float>(dot);
  }
}

}  // namespace

void cross_entropy_forward(const Ctx& c, float* loss, float* lse, const float* logits,
                           const int32_t* labels, int64_t N, int V) {
  if (N <= 0 || V <= 0) return;
  cross_entropy_forward_kernel<<<unsigned(blocks_for(N, 1)), kBlock, 0, c.stream>>>(
      loss, lse, logits, labels, N, V);
  SWT_CUDA_CHECK_LAUNCH();
}

void cross_entropy_backward(const Ctx& c, float* dlogits, const float* logits, const float* lse,
                            const int32_t* labels, int64_t N, int V, float scale,
                            const float* scale_by, float z_coef) {
  if (N <= 0 || V <= 0) return;
  cross_entropy_backward_kernel<<<unsigned(blocks_for(N, 1)), kBlock, 0, c.stream>>>(
      dlogits, logits, lse, labels, N, V, scale, scale_by, z_coef);
  SWT_CUDA_CHECK_LAUNCH();
}

void router_forward(const Ctx& c, float* probs, float* lse, int32_t* expert, int32_t* slot,
                    int32_t* rows, float* gate, float* counts, const float* logits, int G, int S,
                    int E, int C) {
  if (E <= 0) return;
  if (G <= 0) {  // no tokens: every expert's buffer is empty
    SWT_CUDA_CHECK(cudaMemsetAsync(rows, 0, size_t(E) * sizeof(int32_t), c.stream));
    return;
  }
  const int64_t T = int64_t(G) * S;
  if (T > 0) {
    router_softmax_kernel<<<unsigned(blocks_for(T, kBlock)), kBlock, 0, c.stream>>>(
        probs, lse, expert, gate, logits, T, E);
    SWT_CUDA_CHECK_LAUNCH();
  }
  // Also for S == 0: counts are then all 0.
  router_positions_kernel<<<unsigned(blocks_for(int64_t(G) * E, 1)), kBlock, 0, c.stream>>>(
      slot, counts, expert, G, S, E, C);
  SWT_CUDA_CHECK_LAUNCH();
  // Pass 3: each expert's kept tokens packed group after group, the offsets in the workspace
  // for as many groups as it holds at a time.
  require_workspace(c, __FILE__, __LINE__);
  int32_t* offset = static_cast<int32_t*>(c.workspace);
  const int64_t capacity = int64_t(kWorkspaceBytes / sizeof(int32_t));
  if (E > capacity)
    cuda_fail(__FILE__, __LINE__, "router_forward", "CUDA", 0,
              "more experts than the workspace holds offsets for (internal error)");
  const int64_t per_chunk = capacity / E;  // groups per pass
  for (int64_t first = 0; first < G; first += per_chunk) {
    const int g0 = int(first), g1 = int(std::min<int64_t>(G, first + per_chunk));
    router_offsets_kernel<<<unsigned(blocks_for(E, kBlock)), kBlock, 0, c.stream>>>(
        offset, rows, counts, g0, g1, E, C);
    SWT_CUDA_CHECK_LAUNCH();
    if (S > 0) {
      router_pack_kernel<<<unsigned(blocks_for(int64_t(g1 - g0) * S, kBlock)), kBlock, 0,
                           c.stream>>>(slot, offset, expert, g0, g1, S, E);
      SWT_CUDA_CHECK_LAUNCH();
    }
  }
}

void router_balance_loss(const Ctx& c, float* lb, const float* probs, const float* counts, int G,
                         int S, int E) {
  if (G <= 0) return;
  router_balance_loss_kernel<<<unsigned(blocks_for(G, 1)), kBlock, 0, c.stream>>>(lb, probs,
                                                                                  counts, G, S, E);
  SWT_CUDA_CHECK_LAUNCH();
}

void router_backward(const Ctx& c, float* dlogits, const float* probs, const float* lse,
                     const int32_t* expert, const float* dgate, const float* counts, int G, int S,
                     int E, float lb_scale, float z_scale) {
  const int64_t T = int64_t(G) * S;
  if (T <= 0 || E <= 0) return;
  const double lb_coef = double(lb_scale) * E / (double(S) * S);
  router_backward_kernel<<<unsigned(blocks_for(T, kBlock)), kBlock, 0, c.stream>>>(
      dlogits, probs, lse, expert, dgate, counts, T, S, E, lb_coef, z_scale);
  SWT_CUDA_CHECK_LAUNCH();
}

void moe_dispatch(const Ctx& c, float* buf, const float* x, const int32_t* expert,
                  const int32_t* slot, int64_t T, int D, int E, int GC) {
  fill_expert_buffer(c, buf, x, nullptr, expert, slot, T, D, E, GC);
}

void moe_dispatch_backward(const Ctx& c, float* dx, const float* dbuf, const int32_t* expert,
                           const int32_t* slot, int64_t T, int D, int GC) {
  if (T <= 0 || D <= 0) return;
  gather_rows_kernel<<<unsigned(blocks_for(T * D, kBlock)), kBlock, 0, c.stream>>>(
      dx, dbuf, nullptr, expert, slot, T, D, GC);
  SWT_CUDA_CHECK_LAUNCH();
}

void moe_combine(const Ctx& c, float* out, const float* buf, const float* gate,
                 const int32_t* expert, const int32_t* slot, int64_t T, int D, int GC) {
  if (T <= 0 || D <= 0) return;
  gather_rows_kernel<<<unsigned(blocks_for(T * D, kBlock)), kBlock, 0, c.stream>>>(
      out, buf, gate, expert, slot, T, D, GC);
  SWT_CUDA_CHECK_LAUNCH();
}

void moe_combine_backward(const Ctx& c, float* dbuf, float* dgate, const float* dout,
                          const float* buf, const float* gate, const int32_t* expert,
                          const int32_t* slot, int64_t T, int D, int E, int GC) {
  fill_expert_buffer(c, dbuf, dout, gate, expert, slot, T, D, E, GC);
  if (T <= 0) return;
  combine_dgate_kernel<<<unsigned(blocks_for(T, kWarps)), kBlock, 0, c.stream>>>(
      dgate, dout, buf, expert, slot, T, D, E, GC);
  SWT_CUDA_CHECK_LAUNCH();
}

}  // namespace switcht5::cuda
