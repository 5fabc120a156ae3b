// CUDA kernels for the reductions and the statistics accumulated in device memory (kernels.h;
// formulas in backend/backend.h).
//
// Every sum is a two-pass fixed tree in double (int64 for counts):
//   pass 1: B = min(ceil(n / kReduceChunk), kMaxReduceBlocks) blocks of kReduceThreads; thread x
//           of block b adds elements b*T + x, b*T + x + B*T, ... (T = kReduceThreads) in index
//           order, then the block adds its threads in block_sum's tree; partial[k][b] goes to
//           the workspace;
//   pass 2: one block adds the B partials (thread x: partials x, x + T, ...; then the tree) and
//           assigns (sum, sum_squares, count_nonfinite) or adds (accumulate_*) the result.
// B depends on n only, so the result is a function of the input and n, bitwise run to run. The
// order differs from the CPU's (blocks of 16384 in order), so CPU and CUDA agree to double
// rounding, not bitwise.
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_util.cuh"
#include "backend/cuda/kernels.h"

namespace switcht5::cuda {

using detail::ceil_div;

namespace {

cudaStream_t stream_of(const Ctx& c) { return reinterpret_cast<cudaStream_t>(c.stream); }

constexpr int kReduceThreads = 256;
constexpr int64_t kReduceChunk = 4096;      // elements per pass-1 block, at least
constexpr int64_t kMaxReduceBlocks = 1024;  // pass-1 blocks, at most

int reduce_blocks(int64_t n) {
  const int64_t b = ceil_div(n, kReduceChunk);
  return static_cast<int>(b < 1 ? 1 : (b > kMaxReduceBlocks ? kMaxReduceBlocks : b));
}

// What pass 1 sums per element: K components of type T.
struct SumTerm {
  const float* x;
  __device__ void operator()(int64_t i, double* v) const { v[0] = double(x[i]); }
};
struct SquareTerm {
  const float* x;
  __device__ void operator()(int64_t i, double* v) const {
    const double d = x[i];
    v[0] = d * d;  // exact: a float squared fits in a double
  }
};
struct NonfiniteTerm {
  const float* x;
  __device__ void operator()(int64_t i, long long* v) const {
    v[0] = (__float_as_uint(x[i]) & 0x7F800000u) == 0x7F800000u ? 1 : 0;  // Inf or NaN
  }
};
// Cross-entropy statistics: loss, lse^2 of kept rows, kept rows (label >= 0).
struct LossTerm {
  const float* loss;
  const float* lse;
  const int32_t* labels;
  __device__ void operator()(int64_t r, double* v) const {
    const bool kept = labels[r] >= 0;
    const double l = lse[r];
    v[0] = double(loss[r]);
    v[1] = kept ? l * l : 0.0;
    v[2] = kept ? 1.0 : 0.0;
  }
};

// Router confidence of token t, each already divided by T (Backend::accumulate_router_confidence):
// entropy lse - sum_e p_e logit_e, top-1 probability, top-1 minus top-2 probability.
struct ConfidenceTerm {
  const float* probs;
  const float* logits;
  const float* lse;
  int E;
  double inv_T;
  __device__ void operator()(int64_t t, double* v) const {
    const float* p = probs + t * E;
    const float* z = logits + t * E;
    double expected_logit = 0.0, p1 = -1.0, p2 = 0.0;
    for (int e = 0; e < E; ++e) {
      const double pe = p[e];
      expected_logit += pe * double(z[e]);
      if (pe > p1) {
        p2 = p1 > 0.0 ? p1 : 0.0;
        p1 = pe;
      } else if (pe > p2) {
        p2 = pe;
      }
    }
    v[0] = (double(lse[t]) - expected_logit) * inv_T;
    v[1] = p1 * inv_T;
    v[2] = (p1 - p2) * inv_T;
  }
};

template <class T, int K, class Term>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_pass1_kernel(T* partial, Term term, int64_t n) {
  T acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = T(0);
  const int64_t stride = int64_t(gridDim.x) * kReduceThreads;
  for (int64_t i = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x; i < n; i += stride) {
    T v[K];
    term(i, v);
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] += v[k];
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const T total = detail::block_sum(acc[k]);
    if (threadIdx.x == 0) partial[int64_t(k) * gridDim.x + blockIdx.x] = total;
  }
}

// Pass 2 results: totals[k] = sum of partial[k][0 .. blocks).
template <class T, int K>
__device__ void reduce_partials(const T* partial, int blocks, T* totals) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    T acc = T(0);
    for (int b = threadIdx.x; b < blocks; b += kReduceThreads)
      acc += partial[int64_t(k) * blocks + b];
    totals[k] = detail::block_sum(acc);  // valid in thread 0
  }
}

// mode: assign out[k] = total[k], or add out[k] += total[k].
template <class T, int K>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_pass2_kernel(T* out, const T* partial, int blocks, bool accumulate) {
  T totals[K];
  reduce_partials<T, K>(partial, blocks, totals);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) out[k] = accumulate ? out[k] + totals[k] : totals[k];
  }
}

// out[0..K) = (or +=) the sum over i < n of term(i); n may be 0 (the totals are then 0).
template <class T, int K, class Term>
void reduce_two_pass(const Ctx& c, const char* name, T* out, Term term, int64_t n,
                     bool accumulate) {
  const int blocks = reduce_blocks(n);
  detail::WorkspaceCarver ws(c.workspace, c.workspace_bytes);
  T* partial = ws.take<T>(size_t(K) * blocks);
  SWT_LAUNCH_REQUIRE(c.workspace != nullptr && ws.fits(), name, "workspace too small");
  cudaStream_t s = stream_of(c);
  reduce_pass1_kernel<T, K, Term><<<blocks, kReduceThreads, 0, s>>>(partial, term, n);
  SWT_CUDA_CHECK_LAUNCH();
  reduce_pass2_kernel<T, K><<<1, kReduceThreads, 0, s>>>(out, partial, blocks, accumulate);
  SWT_CUDA_CHECK_LAUNCH();
}

// The router statistics' last step, one block: the lse^2 partials (pass 1 over T tokens), the
// balance losses lb[G], the dropped tokens over counts[G,E], and per expert the routed tokens
// (groups in order, one thread per expert).
__global__ void __launch_bounds__(kReduceThreads)
    router_statistics_kernel(double* acc, const double* z_partial, int z_blocks, const float* lb,
                             const float* counts, int G, int E, int C, int64_t T) {
  double z_total[1];
  reduce_partials<double, 1>(z_partial, z_blocks, z_total);
  double lb_sum = 0.0;
  for (int g = threadIdx.x; g < G; g += kReduceThreads) lb_sum += double(lb[g]);
  lb_sum = detail::block_sum(lb_sum);
  const int64_t GE = int64_t(G) * E;
  double dropped = 0.0;
  for (int64_t i = threadIdx.x; i < GE; i += kReduceThreads) {
    const double over = double(counts[i]) - double(C);
    dropped += over > 0.0 ? over : 0.0;
  }
  dropped = detail::block_sum(dropped);
  for (int e = threadIdx.x; e < E; e += kReduceThreads) {
    double routed = 0.0;
    for (int g = 0; g < G; ++g) routed += double(counts[int64_t(g) * E + e]);
    acc[5 + e] += routed;
  }
  if (threadIdx.x == 0) {
    acc[0] += lb_sum / G;
    acc[1] += z_total[0] / double(T);
    acc[2] += 1.0;
    acc[3] += double(T);
    acc[4] += dropped;
  }
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------

void sum(const Ctx& c, double* out, const float* x, int64_t n) {
  reduce_two_pass<double, 1>(c, "sum", out, SumTerm{x}, n < 0 ? 0 : n, false);
}

void sum_squares(const Ctx& c, double* out, const float* x, int64_t n) {
  reduce_two_pass<double, 1>(c, "sum_squares", out, SquareTerm{x}, n < 0 ? 0 : n, false);
}

void count_nonfinite(const Ctx& c, int64_t* out, const float* x, int64_t n) {
  static_assert(sizeof(long long) == sizeof(int64_t));
  reduce_two_pass<long long, 1>(c, "count_nonfinite", reinterpret_cast<long long*>(out),
                                NonfiniteTerm{x}, n < 0 ? 0 : n, false);
}

void accumulate_sum_squares(const Ctx& c, double* acc, const float* x, int64_t n) {
  if (n <= 0) return;
  reduce_two_pass<double, 1>(c, "accumulate_sum_squares", acc, SquareTerm{x}, n, true);
}

void accumulate_loss_statistics(const Ctx& c, double* acc, const float* loss, const float* lse,
                                const int32_t* labels, int64_t N) {
  if (N <= 0) return;
  reduce_two_pass<double, 3>(c, "accumulate_loss_statistics", acc, LossTerm{loss, lse, labels}, N,
                             true);
}

void accumulate_router_statistics(const Ctx& c, double* acc, const float* lb, const float* lse,
                                  const float* counts, int G, int S, int E, int C) {
  if (G <= 0 || S <= 0 || E <= 0) return;
  const int64_t T = int64_t(G) * S;
  const int blocks = reduce_blocks(T);
  detail::WorkspaceCarver ws(c.workspace, c.workspace_bytes);
  double* z_partial = ws.take<double>(size_t(blocks));
  SWT_LAUNCH_REQUIRE(c.workspace != nullptr && ws.fits(), "accumulate_router_statistics",
                     "workspace too small");
  cudaStream_t s = stream_of(c);
  reduce_pass1_kernel<double, 1, SquareTerm><<<blocks, kReduceThreads, 0, s>>>(z_partial,
                                                                              SquareTerm{lse}, T);
  SWT_CUDA_CHECK_LAUNCH();
  router_statistics_kernel<<<1, kReduceThreads, 0, s>>>(acc, z_partial, blocks, lb, counts, G, E,
                                                        C, T);
  SWT_CUDA_CHECK_LAUNCH();
}

void accumulate_router_confidence(const Ctx& c, double* acc, const float* probs,
                                  const float* logits, const float* lse, int64_t T, int E) {
  if (T <= 0 || E <= 0) return;
  reduce_two_pass<double, 3>(c, "accumulate_router_confidence", acc,
                             ConfidenceTerm{probs, logits, lse, E, 1.0 / double(T)}, T, true);
}

}  // namespace switcht5::cuda
