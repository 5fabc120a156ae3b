// bench_gemm: GFLOP/s of CpuBackend::gemm (oneDNN sgemm) on square and transformer shapes, for
// every transpose combination. Each case: three warmup calls, then the best of 5 timed calls.
// FLOPs per call = 2*M*N*K*batch.
//
// Usage: bench_gemm [--batched]   (--batched adds the attention-shaped batched products)
//        bench_gemm --expert-rows  (the experts' products of bench-small's Switch layers, whole
//                                   capacity buffers against the rows balanced routing fills)
//
// --expert-rows: per expert count E (8, 32, 128 at bench-small's d_model 256 / d_ff 1024) and
// stack (encoder: 8 groups of 512 tokens; decoder: 8 groups of 114; capacity factor 1.25), the
// six products of one relu Switch layer's forward and backward (x wi^T, h wo^T, dy wo, dy^T h,
// dh wi, dh^T x) over E experts, timed (median of 9 after 3 warm-up rounds) over the whole
// capacity buffers (gemm_ex_rows without counts: what every slot costs) and over the rows that
// top-1 routing drawn uniformly at random fills (each group's tokens multinomial over the
// experts, at most C kept per expert and group): the load-balancing loss's goal, and so the
// fill a trained model's buffers approach. bench_step measures a model's own routing instead.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/rng.h"
#include "model/router.h"

namespace {

using switcht5::CpuBackend;
using switcht5::DeviceArray;

struct Shape {
  const char* what;
  int M, N, K, batch;
};

void fill_random(CpuBackend& be, DeviceArray<float>& a, uint64_t seed) {
  std::vector<float> h(a.size());
  switcht5::CounterRng rng(seed);
  for (auto& x : h) x = static_cast<float>(rng.next_double() - 0.5);
  be.copy_to_device(a.data(), h.data(), a.bytes());
}

double run_case(CpuBackend& be, const Shape& s, bool ta, bool tb) {
  const int64_t size_a = int64_t(s.M) * s.K, size_b = int64_t(s.K) * s.N,
                size_c = int64_t(s.M) * s.N;
  DeviceArray<float> A(be, size_a * s.batch), B(be, size_b * s.batch), C(be, size_c * s.batch);
  fill_random(be, A, 1);
  fill_random(be, B, 2);
  const int lda = ta ? s.M : s.K, ldb = tb ? s.K : s.N, ldc = s.N;
  auto call = [&] {
    be.gemm(ta, tb, s.M, s.N, s.K, 1.0f, A.data(), lda, size_a, B.data(), ldb, size_b, 0.0f,
            C.data(), ldc, size_c, s.batch);
  };
  for (int rep = 0; rep < 3; ++rep) call();  // warmup: oneDNN JIT-generates its kernels
  double best = std::numeric_limits<double>::infinity();
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    call();
    auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
  }
  return 2.0 * s.M * s.N * s.K * s.batch / best * 1e-9;
}

// Rows each expert's buffer holds under uniformly random top-1 routing: G groups of S tokens,
// E experts, at most C kept per expert and group (Backend::router_forward's rows).
std::vector<int32_t> balanced_rows(int G, int S, int E, int C, uint64_t seed) {
  switcht5::CounterRng rng(seed);
  std::vector<int32_t> rows(E, 0), counts(E);
  for (int g = 0; g < G; ++g) {
    std::fill(counts.begin(), counts.end(), 0);
    for (int s = 0; s < S; ++s) ++counts[rng.next_below(E)];
    for (int e = 0; e < E; ++e) rows[e] += std::min(counts[e], C);
  }
  return rows;
}

// Median ms of one relu Switch layer's six expert products over E experts of N rows (rows:
// the counts, or null for whole buffers).
double expert_layer_ms(CpuBackend& be, int E, int N, int D, int F, const int32_t* rows) {
  using switcht5::DType;
  const int64_t w = int64_t(F) * D;
  DeviceArray<float> wi(be, E * w), wo(be, E * w), dwi(be, E * w), dwo(be, E * w);
  DeviceArray<float> x(be, int64_t(E) * N * D), h(be, int64_t(E) * N * F),
      dy(be, int64_t(E) * N * D), dh(be, int64_t(E) * N * F), out(be, int64_t(E) * N * D);
  // Random everywhere, the rows past the counts too: only the timing is read, and the products
  // skip those rows whatever they hold.
  for (auto* a : {&wi, &wo, &x, &h, &dy, &dh}) fill_random(be, *a, a->size());
  const DType f = DType::kF32;
  auto layer = [&] {
    // forward: h = x wi^T [N,F], out = h wo^T [N,D]
    be.gemm_ex_rows(false, true, N, F, D, 1.0f, x.data(), f, D, int64_t(N) * D, wi.data(), f, D,
                    w, 0.0f, h.data(), f, F, int64_t(N) * F, E, rows, nullptr);
    be.gemm_ex_rows(false, true, N, D, F, 1.0f, h.data(), f, F, int64_t(N) * F, wo.data(), f, F,
                    w, 0.0f, out.data(), f, D, int64_t(N) * D, E, rows, nullptr);
    // backward: dWo = dy^T h [D,F], dh = dy wo [N,F], dWi = dh^T x [F,D], dx = dh wi [N,D]
    be.gemm_ex_rows(true, false, D, F, N, 1.0f, dy.data(), f, D, int64_t(N) * D, h.data(), f, F,
                    int64_t(N) * F, 0.0f, dwo.data(), f, F, w, E, rows, nullptr);
    be.gemm_ex_rows(false, false, N, F, D, 1.0f, dy.data(), f, D, int64_t(N) * D, wo.data(), f, F,
                    w, 0.0f, dh.data(), f, F, int64_t(N) * F, E, rows, nullptr);
    be.gemm_ex_rows(true, false, F, D, N, 1.0f, dh.data(), f, F, int64_t(N) * F, x.data(), f, D,
                    int64_t(N) * D, 0.0f, dwi.data(), f, D, w, E, rows, nullptr);
    be.gemm_ex_rows(false, false, N, D, F, 1.0f, dh.data(), f, F, int64_t(N) * F, wi.data(), f, D,
                    w, 0.0f, out.data(), f, D, int64_t(N) * D, E, rows, nullptr);
  };
  for (int rep = 0; rep < 3; ++rep) layer();
  std::vector<double> ms;
  for (int rep = 0; rep < 9; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    layer();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                     .count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

int expert_rows_table() {
  const int D = 256, F = 1024, G = 8;
  CpuBackend be;
  std::printf("bench_gemm --expert-rows: one relu Switch layer's six expert products "
              "(d_model %d, d_ff %d), %d OpenMP threads, median of 9 after 3 warm-up rounds\n",
              D, F, omp_get_max_threads());
  std::printf("%-8s %4s %5s %4s %6s %12s %12s %10s %8s\n", "stack", "E", "S", "C", "rows",
              "whole ms", "balanced ms", "filled", "saved");
  for (int E : {8, 32, 128})
    for (const auto& [stack, S] : {std::pair<const char*, int>{"encoder", 512}, {"decoder", 114}}) {
      switcht5::ModelConfig m;
      m.num_experts = E;
      m.capacity_factor = 1.25;
      const int C = switcht5::expert_capacity(m, S, /*training=*/true), N = G * C;
      const std::vector<int32_t> rows = balanced_rows(G, S, E, C, 1000 + E + S);
      int64_t filled = 0;
      for (int32_t r : rows) filled += r;
      const double whole = expert_layer_ms(be, E, N, D, F, nullptr);
      const double balanced = expert_layer_ms(be, E, N, D, F, rows.data());
      std::printf("%-8s %4d %5d %4d %6d %12.2f %12.2f %9.0f%% %7.0f%%\n", stack, E, S, C, N, whole,
                  balanced, 100.0 * filled / (double(E) * N), 100.0 * (1.0 - balanced / whole));
      std::fflush(stdout);
    }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool batched = argc > 1 && std::strcmp(argv[1], "--batched") == 0;
  if (argc > 1 && std::strcmp(argv[1], "--expert-rows") == 0) return expert_rows_table();
  std::vector<Shape> shapes = {
      {"square", 1024, 1024, 1024, 1},
      {"square", 2048, 2048, 2048, 1},
      {"T x d_model -> d_ff", 4096, 1024, 256, 1},
      {"T x d_ff -> d_model", 4096, 256, 1024, 1},
      // Weight gradients dW += dy^T x run as TN with K = tokens.
      {"dW wi: d_ff x d_model over T", 1024, 256, 4096, 1},
      {"dW wo: d_model x d_ff over T", 256, 1024, 4096, 1},
  };
  if (batched) {
    shapes.push_back({"attn scores (B*H, T, T, d_kv)", 512, 512, 64, 64});
    shapes.push_back({"attn scores (B*H, T, T, d_kv)", 128, 128, 64, 256});
    shapes.push_back({"experts (E, C, d_ff, d_model)", 512, 1024, 256, 16});
  }
  CpuBackend be;
  run_case(be, shapes[1], false, false);  // wake the thread pool and let the clock settle
  std::printf(
      "bench_gemm: CpuBackend::gemm (dnnl_sgemm), %d OpenMP threads, best of 5 after warmup\n",
      omp_get_max_threads());
  std::printf("%-32s %6s %6s %6s %5s  %8s %8s %8s %8s\n", "shape", "M", "N", "K", "batch", "NN",
              "NT", "TN", "TT");
  for (const Shape& s : shapes) {
    std::printf("%-32s %6d %6d %6d %5d ", s.what, s.M, s.N, s.K, s.batch);
    for (int combo = 0; combo < 4; ++combo) {
      std::printf(" %8.1f", run_case(be, s, combo & 2, combo & 1));
      std::fflush(stdout);
    }
    std::printf("   GFLOP/s\n");
  }
  return 0;
}
