// CUDA kernels for the optimizer updates (kernels.h; formulas in backend/backend.h, rounding
// points those of backend/cpu/optim_cpu.cpp).
//
// Float arithmetic is the CPU's operation by operation: every product and sum is spelled with
// __fmul_rn / __fadd_rn / __fsub_rn / __fdiv_rn / __fsqrt_rn (never contracted into an FMA,
// which the x86-64-v2 CPU build never does either), and the double steps likewise with the
// __d*_rn intrinsics. Values the CPU rounds to float (state, row and column factors, the clip
// factor) are rounded here at the same points. What differs from the CPU is only the order of
// the double sums (fixed trees here, fixed blocks there), so CPU and CUDA agree to double
// rounding of those sums.
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device_util.cuh"
#include "backend/cuda/kernels.h"

namespace switcht5::cuda {

using detail::ceil_div;
using detail::f32_to_bf16_bits;
using detail::global_thread_index;
using detail::grid_for;
using detail::grid_stride;
using detail::kThreads;

namespace {

cudaStream_t stream_of(const Ctx& c) { return reinterpret_cast<cudaStream_t>(c.stream); }

// ---- AdamW -------------------------------------------------------------------------------------

// m = b1 m + (1-b1) g;  v = b2 v + ((1-b2) g) g;
// p = p - lr ((m * (1/bc1)) / (sqrt(v * (1/bc2)) + eps) + wd p)     (p before the step)
__global__ void adamw_kernel(float* p, uint16_t* p_bf16, const float* g, float* m, float* v,
                             int64_t n, float lr, float beta1, float beta2, float eps,
                             float weight_decay, float one_minus_b1, float one_minus_b2,
                             float inv_bc1, float inv_bc2) {
  for (int64_t i = global_thread_index(); i < n; i += grid_stride()) {
    const float gi = g[i];
    const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(one_minus_b1, gi));
    const float vi = __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(one_minus_b2, gi), gi));
    m[i] = mi;
    v[i] = vi;
    const float update = __fdiv_rn(__fmul_rn(mi, inv_bc1),
                                   __fadd_rn(__fsqrt_rn(__fmul_rn(vi, inv_bc2)), eps));
    const float pi = p[i];
    const float pn = __fsub_rn(pi, __fmul_rn(lr, __fadd_rn(update, __fmul_rn(weight_decay, pi))));
    p[i] = pn;
    if (p_bf16) p_bf16[i] = f32_to_bf16_bits(pn);
  }
}

// ---- Adafactor ----------------------------------------------------------------------------------
// Launches work on a group of kg consecutive matrices [k0, k0 + kg) at once (blockIdx.y or
// blockIdx.z, or blockIdx.x for the one-block-per-matrix steps, is the matrix within the
// group); pointers passed in are already offset to matrix k0. Groups are sized so that their
// scratch fits the workspace, and run in order.
//
// Factored, per matrix [R,C] (g2 = g^2 + eps1, in double):
//   1. rows:    one warp per row:  vr[i] = float(b2 vr[i] + (1-b2) (sum_j g2) / C)
//   2. columns: one thread per (column, chunk of rlen rows): partial column sums of g2, rows in
//               order, into the workspace
//   3. factors: one block per matrix: vc[j] = float(b2 vc[j] + (1-b2) (sum_chunks) / R) (chunks
//               in order), colf[j] = float(1 / sqrt(vc[j])); vr_mean by the block tree,
//               rowf[i] = float(1 / sqrt(vr[i] / vr_mean))
//   4. rms:     one warp per row: rowpart[i] = sum_j u^2, u = (g * rowf[i]) * colf[j] in float
//   5. clip:    one block per matrix: inv_denom = float(1 / max(1, sqrt(sum rowpart / RC) / clip))
//   6. update:  p = p - lr (u * inv_denom + wd p);  p_bf16 = bf16(p)
// Unfactored: 1. one block per (matrix, piece of the elements): v = b2 v + (1-b2) g2 and the
// piece's sum of u^2 (u = g / sqrt(v)) in float, as the CPU; 2. clip; 3. update.
// With the parameter scale (eps2 > 0), first, either way: one block per (matrix, piece) sums
// p^2, then one block per matrix forms lr_k = float(lr * max(eps2, sqrt(sum / RC))), which the
// update reads in place of lr.
constexpr int kRowsPerBlock = kThreads / 32;  // one warp per row
constexpr int kColumnChunkRows = 256;         // rows per column-sum chunk, at least
constexpr int64_t kMaxColumnChunks = 64;
constexpr int kFactorThreads = 512;           // one block per matrix
constexpr int64_t kPieceElements = 4096;      // unfactored: elements per pass-1 block, at least
constexpr int64_t kMaxPieces = 65536;

__global__ void __launch_bounds__(kThreads)
    adafactor_rows_kernel(float* vr, const float* g, int R, int C, double b2, double one_minus_b2,
                          double eps1) {
  const int lane = threadIdx.x & 31;
  const int i = blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5);
  if (i >= R) return;  // whole warp; no block barrier below
  const int k = blockIdx.y;
  const int64_t RC = int64_t(R) * C;
  const float* Gi = g + k * RC + int64_t(i) * C;
  double s = 0.0;
  for (int j = lane; j < C; j += 32) {
    const double gj = Gi[j];
    s = __dadd_rn(s, __dadd_rn(__dmul_rn(gj, gj), eps1));
  }
  s = detail::warp_sum(s);
  if (lane == 0) {
    float* VR = vr + int64_t(k) * R;
    VR[i] = static_cast<float>(
        __dadd_rn(__dmul_rn(b2, double(VR[i])), __dmul_rn(one_minus_b2, __ddiv_rn(s, double(C)))));
  }
}

// colpart[k][chunk][j] = sum over rows [chunk*rlen, min(R, (chunk+1)*rlen)) of g2[i,j], in order.
__global__ void __launch_bounds__(kThreads)
    adafactor_column_partial_kernel(double* colpart, const float* g, int R, int C, int rlen,
                                    int num_chunks, double eps1) {
  const int j = blockIdx.x * kThreads + threadIdx.x;
  if (j >= C) return;
  const int chunk = blockIdx.y;
  const int k = blockIdx.z;
  const int64_t RC = int64_t(R) * C;
  const float* G = g + k * RC;
  const int i0 = chunk * rlen;
  const int i1 = min(R, i0 + rlen);
  double s = 0.0;
  for (int i = i0; i < i1; ++i) {
    const double gij = G[int64_t(i) * C + j];
    s = __dadd_rn(s, __dadd_rn(__dmul_rn(gij, gij), eps1));
  }
  colpart[(int64_t(k) * num_chunks + chunk) * C + j] = s;
}

__global__ void __launch_bounds__(kFactorThreads)
    adafactor_factors_kernel(float* vr, float* vc, float* rowf, float* colf,
                             const double* colpart, int R, int C, int num_chunks, double b2,
                             double one_minus_b2) {
  const int k = blockIdx.x;
  float* VR = vr + int64_t(k) * R;
  float* VC = vc + int64_t(k) * C;
  const double* part = colpart + int64_t(k) * num_chunks * C;
  for (int j = threadIdx.x; j < C; j += kFactorThreads) {
    double s = 0.0;
    for (int chunk = 0; chunk < num_chunks; ++chunk) s = __dadd_rn(s, part[int64_t(chunk) * C + j]);
    const float vcj = static_cast<float>(__dadd_rn(
        __dmul_rn(b2, double(VC[j])), __dmul_rn(one_minus_b2, __ddiv_rn(s, double(R)))));
    VC[j] = vcj;
    colf[int64_t(k) * C + j] = static_cast<float>(__ddiv_rn(1.0, __dsqrt_rn(double(vcj))));
  }
  double vr_sum = 0.0;
  for (int i = threadIdx.x; i < R; i += kFactorThreads) vr_sum = __dadd_rn(vr_sum, double(VR[i]));
  vr_sum = detail::block_sum_broadcast(vr_sum);
  const double vr_mean = __ddiv_rn(vr_sum, double(R));
  for (int i = threadIdx.x; i < R; i += kFactorThreads)
    rowf[int64_t(k) * R + i] =
        static_cast<float>(__ddiv_rn(1.0, __dsqrt_rn(__ddiv_rn(double(VR[i]), vr_mean))));
}

__device__ __forceinline__ float factored_u(float g, float rf, float cf) {
  return __fmul_rn(__fmul_rn(g, rf), cf);
}

// rowpart[k][i] = sum_j u[i,j]^2 in double.
__global__ void __launch_bounds__(kThreads)
    adafactor_rms_rows_kernel(double* rowpart, const float* g, const float* rowf,
                              const float* colf, int R, int C) {
  const int lane = threadIdx.x & 31;
  const int i = blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5);
  if (i >= R) return;  // whole warp
  const int k = blockIdx.y;
  const int64_t RC = int64_t(R) * C;
  const float* Gi = g + k * RC + int64_t(i) * C;
  const float rf = rowf[int64_t(k) * R + i];
  const float* CF = colf + int64_t(k) * C;
  double s = 0.0;
  for (int j = lane; j < C; j += 32) {
    const double u = factored_u(Gi[j], rf, CF[j]);
    s = __dadd_rn(s, __dmul_rn(u, u));
  }
  s = detail::warp_sum(s);
  if (lane == 0) rowpart[int64_t(k) * R + i] = s;
}

// sqrt(sum of matrix blockIdx.x's parts / n), the block's tree order; valid in thread 0.
__device__ double parts_rms(const double* parts, int num_parts, int64_t n) {
  const double* P = parts + int64_t(blockIdx.x) * num_parts;
  double s = 0.0;
  for (int i = threadIdx.x; i < num_parts; i += kThreads) s = __dadd_rn(s, P[i]);
  s = detail::block_sum(s);
  return __dsqrt_rn(__ddiv_rn(s, double(n)));
}

// One piece of matrix blockIdx.y: elements [e0, e1) of RC, piece blockIdx.x of piece_len.
struct Piece {
  int64_t e0, e1;
};
__device__ __forceinline__ Piece piece_of(int64_t RC, int64_t piece_len) {
  const int64_t e0 = blockIdx.x * piece_len;
  return {e0, e0 + piece_len < RC ? e0 + piece_len : RC};
}

// inv_denom[k] = float(1 / max(1, sqrt(sum parts / n) / clip)) (std::max(1.0, x): 1 for a NaN x).
__global__ void __launch_bounds__(kThreads)
    adafactor_clip_kernel(float* inv_denom, const double* parts, int num_parts, int64_t n,
                          double clip) {
  const int k = blockIdx.x;
  const double rms = parts_rms(parts, num_parts, n);
  if (threadIdx.x == 0) {
    const double q = __ddiv_rn(rms, clip);
    const double denom = 1.0 < q ? q : 1.0;
    inv_denom[k] = static_cast<float>(__ddiv_rn(1.0, denom));
  }
}

// part[k][piece] = sum over the piece of p^2 (the parameter scale), in double.
__global__ void __launch_bounds__(kThreads)
    adafactor_param_squares_kernel(double* part, const float* p, int64_t RC, int64_t piece_len,
                                   int num_pieces) {
  const int k = blockIdx.y;
  const float* P = p + k * RC;
  const Piece pc = piece_of(RC, piece_len);
  double s = 0.0;
  for (int64_t e = pc.e0 + threadIdx.x; e < pc.e1; e += kThreads) {
    const double pe = P[e];
    s = __dadd_rn(s, __dmul_rn(pe, pe));
  }
  s = detail::block_sum(s);
  if (threadIdx.x == 0) part[int64_t(k) * num_pieces + blockIdx.x] = s;
}

// lr_k[k] = float(lr * max(eps2, sqrt(sum parts / n))), as the CPU forms it.
__global__ void __launch_bounds__(kThreads)
    adafactor_param_lr_kernel(float* lr_k, const double* parts, int num_parts, int64_t n,
                              double lr, double eps2) {
  const double rms = parts_rms(parts, num_parts, n);
  if (threadIdx.x == 0)
    lr_k[blockIdx.x] = static_cast<float>(__dmul_rn(lr, eps2 < rms ? rms : eps2));
}

// p = p - lr (u * inv_denom + wd p), with the pre-update p.
__device__ __forceinline__ float adafactor_step(float p, float u, float inv_denom, float lr,
                                                float weight_decay) {
  const float step = __fadd_rn(__fmul_rn(u, inv_denom), __fmul_rn(weight_decay, p));
  return __fsub_rn(p, __fmul_rn(lr, step));
}

__global__ void __launch_bounds__(kThreads)
    adafactor_factored_update_kernel(float* p, uint16_t* p_bf16, const float* g, const float* rowf,
                                     const float* colf, const float* inv_denom,
                                     const float* lr_k, int R, int C, float lr,
                                     float weight_decay) {
  const int k = blockIdx.y;
  const int64_t RC = int64_t(R) * C;
  float* P = p + k * RC;
  const float* G = g + k * RC;
  const float* RF = rowf + int64_t(k) * R;
  const float* CF = colf + int64_t(k) * C;
  const float id = inv_denom[k];
  const float lr_e = lr_k ? lr_k[k] : lr;
  for (int64_t e = global_thread_index(); e < RC; e += grid_stride()) {
    const int64_t i = e / C;
    const int64_t j = e - i * C;
    const float pn = adafactor_step(P[e], factored_u(G[e], RF[i], CF[j]), id, lr_e, weight_decay);
    P[e] = pn;
    if (p_bf16) p_bf16[k * RC + e] = f32_to_bf16_bits(pn);
  }
}

// v = b2 v + (1-b2) (g g + eps1) in float; part[k][piece] = sum over the piece of u^2,
// u = g / sqrt(v).
__global__ void __launch_bounds__(kThreads)
    adafactor_unfactored_partial_kernel(double* part, float* v, const float* g, int64_t RC,
                                        int64_t piece_len, int num_pieces, float beta2t,
                                        float one_minus_beta2t, float eps1) {
  const int k = blockIdx.y;
  float* V = v + k * RC;
  const float* G = g + k * RC;
  const Piece pc = piece_of(RC, piece_len);
  double s = 0.0;
  for (int64_t e = pc.e0 + threadIdx.x; e < pc.e1; e += kThreads) {
    const float ge = G[e];
    const float ve = __fadd_rn(__fmul_rn(beta2t, V[e]),
                               __fmul_rn(one_minus_beta2t, __fadd_rn(__fmul_rn(ge, ge), eps1)));
    V[e] = ve;
    const double u = __fdiv_rn(ge, __fsqrt_rn(ve));
    s = __dadd_rn(s, __dmul_rn(u, u));
  }
  s = detail::block_sum(s);
  if (threadIdx.x == 0) part[int64_t(k) * num_pieces + blockIdx.x] = s;
}

__global__ void __launch_bounds__(kThreads)
    adafactor_unfactored_update_kernel(float* p, uint16_t* p_bf16, const float* g, const float* v,
                                       const float* inv_denom, const float* lr_k, int64_t RC,
                                       float lr, float weight_decay) {
  const int k = blockIdx.y;
  float* P = p + k * RC;
  const float* G = g + k * RC;
  const float* V = v + k * RC;
  const float id = inv_denom[k];
  const float lr_e = lr_k ? lr_k[k] : lr;
  for (int64_t e = global_thread_index(); e < RC; e += grid_stride()) {
    const float u = __fdiv_rn(G[e], __fsqrt_rn(V[e]));
    const float pn = adafactor_step(P[e], u, id, lr_e, weight_decay);
    P[e] = pn;
    if (p_bf16) p_bf16[k * RC + e] = f32_to_bf16_bits(pn);
  }
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------------

void adamw_update(const Ctx& c, float* p, uint16_t* p_bf16, const float* g, float* m, float* v,
                  int64_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                  float bc1, float bc2) {
  if (n <= 0) return;
  // Formed in float on the host, as CpuBackend::adamw_update does.
  const float one_minus_b1 = 1.0f - beta1, one_minus_b2 = 1.0f - beta2;
  const float inv_bc1 = 1.0f / bc1, inv_bc2 = 1.0f / bc2;
  adamw_kernel<<<grid_for(n), kThreads, 0, stream_of(c)>>>(p, p_bf16, g, m, v, n, lr, beta1, beta2,
                                                           eps, weight_decay, one_minus_b1,
                                                           one_minus_b2, inv_bc1, inv_bc2);
  SWT_CUDA_CHECK_LAUNCH();
}

void adafactor_update(const Ctx& c, float* p, uint16_t* p_bf16, const float* g, float* vr,
                      float* vc, float* v, bool factored, int count, int R, int C, float lr,
                      float beta2t, float eps1, float clip, float weight_decay, float eps2) {
  SWT_LAUNCH_REQUIRE(count >= 0 && R >= 0 && C >= 0, "adafactor_update", "negative shape");
  SWT_LAUNCH_REQUIRE(eps2 >= 0.0f, "adafactor_update", "eps2 < 0");
  if (count == 0 || R == 0 || C == 0) return;
  SWT_LAUNCH_REQUIRE(factored ? (vr != nullptr && vc != nullptr) : (v != nullptr),
                     "adafactor_update", "missing optimizer state");
  SWT_LAUNCH_REQUIRE(c.workspace != nullptr, "adafactor_update", "no workspace");
  const int64_t RC = int64_t(R) * C;
  const double b2 = beta2t;
  const double one_minus_b2 = 1.0 - b2;
  const double e1 = eps1;
  cudaStream_t s = stream_of(c);
  // Room for the sub-buffers' 256-byte alignment.
  const size_t slack = 8 * 256;
  SWT_LAUNCH_REQUIRE(c.workspace_bytes > slack, "adafactor_update", "workspace too small");
  const size_t avail = c.workspace_bytes - slack;

  // Pieces of the elements: the unfactored statistics' and the parameter scale's sums.
  int64_t piece_len = kPieceElements;
  int64_t num_pieces = ceil_div(RC, piece_len);
  if (num_pieces > kMaxPieces) {
    piece_len = ceil_div(RC, kMaxPieces);
    num_pieces = ceil_div(RC, piece_len);
  }
  // Parameter scale scratch per matrix: the pieces' sums of p^2 (double) and lr_k (float).
  const bool scaled = eps2 > 0.0f;
  const size_t scale_bytes = scaled ? 8 * size_t(num_pieces) + 4 : 0;
  // Enqueues lr_k for matrices [0, nk) of P (already offset), or does nothing unscaled.
  auto param_scale = [&](const float* P, int64_t nk, double* sq, float* lr_k) {
    if (!scaled) return;
    const unsigned ky = static_cast<unsigned>(nk);
    adafactor_param_squares_kernel<<<dim3(static_cast<unsigned>(num_pieces), ky), kThreads, 0,
                                     s>>>(sq, P, RC, piece_len, static_cast<int>(num_pieces));
    SWT_CUDA_CHECK_LAUNCH();
    adafactor_param_lr_kernel<<<ky, kThreads, 0, s>>>(lr_k, sq, static_cast<int>(num_pieces), RC,
                                                      double(lr), double(eps2));
    SWT_CUDA_CHECK_LAUNCH();
  };

  if (factored) {
    // Scratch per matrix: colpart [num_chunks][C] double, rowpart [R] double, rowf [R] float,
    // colf [C] float, inv_denom float. The chunk count comes from the shapes (and the fixed
    // workspace size), never from the device.
    const size_t fixed = 12 * size_t(R) + 4 * size_t(C) + 4 + scale_bytes;
    SWT_LAUNCH_REQUIRE(fixed + 8 * size_t(C) <= avail, "adafactor_update",
                       "matrix too large for the workspace (factored)");
    int64_t num_chunks = ceil_div(R, kColumnChunkRows);
    if (num_chunks > kMaxColumnChunks) num_chunks = kMaxColumnChunks;
    const int64_t chunks_fit = static_cast<int64_t>((avail - fixed) / (8 * size_t(C)));
    if (num_chunks > chunks_fit) num_chunks = chunks_fit;
    const int rlen = static_cast<int>(ceil_div(R, num_chunks));
    num_chunks = ceil_div(R, rlen);
    const size_t per_matrix = fixed + 8 * size_t(num_chunks) * size_t(C);
    int64_t kg = static_cast<int64_t>(avail / per_matrix);
    if (kg > count) kg = count;
    if (kg > detail::kMaxGridYZ) kg = detail::kMaxGridYZ;

    detail::WorkspaceCarver ws(c.workspace, c.workspace_bytes);
    double* colpart = ws.take<double>(size_t(kg) * num_chunks * C);
    double* rowpart = ws.take<double>(size_t(kg) * R);
    float* rowf = ws.take<float>(size_t(kg) * R);
    float* colf = ws.take<float>(size_t(kg) * C);
    float* inv_denom = ws.take<float>(size_t(kg));
    double* sq = scaled ? ws.take<double>(size_t(kg) * num_pieces) : nullptr;
    float* lr_k = scaled ? ws.take<float>(size_t(kg)) : nullptr;
    SWT_LAUNCH_REQUIRE(ws.fits(), "adafactor_update", "workspace layout (factored)");

    const unsigned row_blocks = static_cast<unsigned>(ceil_div(R, kRowsPerBlock));
    const unsigned col_blocks = static_cast<unsigned>(ceil_div(C, kThreads));
    for (int64_t k0 = 0; k0 < count; k0 += kg) {
      const int64_t nk = count - k0 < kg ? count - k0 : kg;
      float* P = p + k0 * RC;
      uint16_t* PB = p_bf16 ? p_bf16 + k0 * RC : nullptr;
      const float* G = g + k0 * RC;
      float* VR = vr + k0 * R;
      float* VC = vc + k0 * C;
      const unsigned ky = static_cast<unsigned>(nk);
      param_scale(P, nk, sq, lr_k);
      adafactor_rows_kernel<<<dim3(row_blocks, ky), kThreads, 0, s>>>(VR, G, R, C, b2,
                                                                       one_minus_b2, e1);
      SWT_CUDA_CHECK_LAUNCH();
      adafactor_column_partial_kernel<<<dim3(col_blocks, static_cast<unsigned>(num_chunks), ky),
                                        kThreads, 0, s>>>(colpart, G, R, C, rlen,
                                                          static_cast<int>(num_chunks), e1);
      SWT_CUDA_CHECK_LAUNCH();
      adafactor_factors_kernel<<<ky, kFactorThreads, 0, s>>>(VR, VC, rowf, colf, colpart, R, C,
                                                             static_cast<int>(num_chunks), b2,
                                                             one_minus_b2);
      SWT_CUDA_CHECK_LAUNCH();
      adafactor_rms_rows_kernel<<<dim3(row_blocks, ky), kThreads, 0, s>>>(rowpart, G, rowf, colf,
                                                                           R, C);
      SWT_CUDA_CHECK_LAUNCH();
      adafactor_clip_kernel<<<ky, kThreads, 0, s>>>(inv_denom, rowpart, R, RC, double(clip));
      SWT_CUDA_CHECK_LAUNCH();
      adafactor_factored_update_kernel<<<dim3(grid_for(RC), ky), kThreads, 0, s>>>(
          P, PB, G, rowf, colf, inv_denom, lr_k, R, C, lr, weight_decay);
      SWT_CUDA_CHECK_LAUNCH();
    }
  } else {
    // Scratch per matrix: the pieces' sums of u^2 (double) and inv_denom (float).
    const size_t per_matrix = 8 * size_t(num_pieces) + 4 + scale_bytes;
    SWT_LAUNCH_REQUIRE(per_matrix <= avail, "adafactor_update",
                       "matrix too large for the workspace (unfactored)");
    int64_t kg = static_cast<int64_t>(avail / per_matrix);
    if (kg > count) kg = count;
    if (kg > detail::kMaxGridYZ) kg = detail::kMaxGridYZ;

    detail::WorkspaceCarver ws(c.workspace, c.workspace_bytes);
    double* part = ws.take<double>(size_t(kg) * num_pieces);
    float* inv_denom = ws.take<float>(size_t(kg));
    double* sq = scaled ? ws.take<double>(size_t(kg) * num_pieces) : nullptr;
    float* lr_k = scaled ? ws.take<float>(size_t(kg)) : nullptr;
    SWT_LAUNCH_REQUIRE(ws.fits(), "adafactor_update", "workspace layout (unfactored)");

    // Formed in float, as the CPU's (1.0f - beta2t).
    const float one_minus_beta2t = 1.0f - beta2t;
    for (int64_t k0 = 0; k0 < count; k0 += kg) {
      const int64_t nk = count - k0 < kg ? count - k0 : kg;
      float* P = p + k0 * RC;
      uint16_t* PB = p_bf16 ? p_bf16 + k0 * RC : nullptr;
      const float* G = g + k0 * RC;
      float* V = v + k0 * RC;
      const unsigned ky = static_cast<unsigned>(nk);
      param_scale(P, nk, sq, lr_k);
      adafactor_unfactored_partial_kernel<<<dim3(static_cast<unsigned>(num_pieces), ky), kThreads,
                                            0, s>>>(part, V, G, RC, piece_len,
                                                    static_cast<int>(num_pieces), beta2t,
                                                    one_minus_beta2t, eps1);
      SWT_CUDA_CHECK_LAUNCH();
      adafactor_clip_kernel<<<ky, kThreads, 0, s>>>(inv_denom, part, static_cast<int>(num_pieces),
                                                    RC, double(clip));
      SWT_CUDA_CHECK_LAUNCH();
      adafactor_unfactored_update_kernel<<<dim3(grid_for(RC), ky), kThreads, 0, s>>>(
          P, PB, G, V, inv_denom, lr_k, RC, lr, weight_decay);
      SWT_CUDA_CHECK_LAUNCH();
    }
  }
}

}  // namespace switcht5::cuda
