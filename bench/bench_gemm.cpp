// bench_gemm: GFLOP/s of CpuBackend::gemm (oneDNN sgemm) on square and transformer shapes, for
// every transpose combination. Each case: three warmup calls, then the best of 5 timed calls.
// FLOPs per call = 2*M*N*K*batch.
//
// Usage: bench_gemm [--batched]   (--batched adds the attention-shaped batched products)
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/rng.h"

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

}  // namespace

int main(int argc, char** argv) {
  bool batched = argc > 1 && std::strcmp(argv[1], "--batched") == 0;
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
