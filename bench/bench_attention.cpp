// bench_attention: the attention core (Backend::attention_core_forward + _backward) on the CPU
// backend, problem by problem (CpuBackend's override) against the composition it replaces
// (Backend's: batched GEMMs and whole-tensor softmax/dropout passes), alternating the two in one
// process so that a drifting machine moves both alike.
//
// Usage: bench_attention [--B 8] [--H 4] [--Tq 512] [--Tk 512] [--K 64] [--dropout 0.1]
//                        [--rounds 15] [--causal]
// Defaults: bench-small's encoder self-attention (batch 8, 4 heads of 64, 512 tokens), with a
// position bias and a key mask. Printed per schedule: the median forward and backward ms over the
// rounds, and the [B,H,Tq,Tk] tensor's size (the composition streams it through memory about
// five times forward and eight times backward; problem by problem, once each way plus the
// bias-gradient pass).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "core/check.h"
#include "core/rng.h"

namespace {

using switcht5::CpuBackend;
using switcht5::DeviceArray;

DeviceArray<float> random_array(CpuBackend& be, int64_t n, uint64_t seed, double scale) {
  DeviceArray<float> a(be, n);
  std::vector<float> h(static_cast<size_t>(n));
  switcht5::CounterRng rng(seed);
  for (auto& x : h) x = static_cast<float>((rng.next_double() - 0.5) * 2.0 * scale);
  be.copy_to_device(a.data(), h.data(), a.bytes());
  return a;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int B = 8, H = 4, Tq = 512, Tk = 512, K = 64, rounds = 15;
  float p = 0.1f;
  bool causal = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_attention: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--B") B = std::atoi(value());
    else if (a == "--H") H = std::atoi(value());
    else if (a == "--Tq") Tq = std::atoi(value());
    else if (a == "--Tk") Tk = std::atoi(value());
    else if (a == "--K") K = std::atoi(value());
    else if (a == "--dropout") p = std::strtof(value(), nullptr);
    else if (a == "--rounds") rounds = std::atoi(value());
    else if (a == "--causal") causal = true;
    else {
      std::fprintf(stderr,
                   "bench_attention: unknown argument '%s' (expected --B, --H, --Tq, --Tk, --K, "
                   "--dropout, --rounds, --causal)\n", a.c_str());
      return 2;
    }
  }
  if (B < 1 || H < 1 || Tq < 1 || Tk < 1 || K < 1 || rounds < 1 || !(p >= 0.0f && p < 1.0f)) {
    std::fprintf(stderr, "bench_attention: sizes and --rounds must be >= 1, --dropout in [0, 1)\n");
    return 2;
  }
  CpuBackend be;
  const int64_t BH = int64_t(B) * H, n = BH * Tq * Tk;
  const int64_t nq = BH * Tq * K, nk = BH * Tk * K, nb = int64_t(H) * Tq * Tk;
  auto q = random_array(be, nq, 1, 0.3), k = random_array(be, nk, 2, 0.3),
       v = random_array(be, nk, 3, 1.0), bias = random_array(be, nb, 4, 1.0),
       dctx = random_array(be, nq, 5, 1.0);
  DeviceArray<float> mask(be, int64_t(B) * Tk), probs(be, n), work(be, n), ctx(be, nq),
      dq(be, nq), dk(be, nk), dv(be, nk), dbias(be, nb);
  be.fill(mask.data(), 1.0f, int64_t(B) * Tk);
  using clock = std::chrono::steady_clock;
  auto seconds = [](clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  };
  std::vector<double> fwd[2], bwd[2];
  for (int r = 0; r < rounds + 1; ++r) {
    for (int by_problem = 0; by_problem < 2; ++by_problem) {
      const auto t0 = clock::now();
      if (by_problem)
        be.attention_core_forward(probs.data(), ctx.data(), q.data(), k.data(), v.data(),
                                  bias.data(), mask.data(), B, H, Tq, Tk, K, causal, p, 7,
                                  work.data());
      else
        be.Backend::attention_core_forward(probs.data(), ctx.data(), q.data(), k.data(),
                                           v.data(), bias.data(), mask.data(), B, H, Tq, Tk, K,
                                           causal, p, 7, work.data());
      const auto t1 = clock::now();
      if (by_problem)
        be.attention_core_backward(dq.data(), dk.data(), dv.data(), dbias.data(), dctx.data(),
                                   probs.data(), q.data(), k.data(), v.data(), B, H, Tq, Tk, K, p,
                                   7, work.data());
      else
        be.Backend::attention_core_backward(dq.data(), dk.data(), dv.data(), dbias.data(),
                                            dctx.data(), probs.data(), q.data(), k.data(),
                                            v.data(), B, H, Tq, Tk, K, p, 7, work.data());
      const auto t2 = clock::now();
      if (r == 0) continue;  // warm-up: oneDNN generates its kernels, pages are touched
      fwd[by_problem].push_back(seconds(t0, t1));
      bwd[by_problem].push_back(seconds(t1, t2));
    }
  }
  std::printf("attention core B=%d H=%d Tq=%d Tk=%d K=%d dropout=%g causal=%d, %d threads, "
              "%d rounds alternating; [B,H,Tq,Tk] = %.1f MB\n",
              B, H, Tq, Tk, K, p, causal ? 1 : 0, omp_get_max_threads(), rounds,
              double(n) * 4 / 1e6);
  const char* names[2] = {"composition", "by problem"};
  for (int s = 0; s < 2; ++s)
    std::printf("  %-12s forward %8.2f ms  backward %8.2f ms  total %8.2f ms\n", names[s],
                median(fwd[s]) * 1e3, median(bwd[s]) * 1e3,
                (median(fwd[s]) + median(bwd[s])) * 1e3);
  std::printf("  by problem / composition: forward %.2fx  backward %.2fx%s\n",
              median(fwd[1]) / median(fwd[0]), median(bwd[1]) / median(bwd[0]),
              BH < omp_get_max_threads()
                  ? " (fewer problems than threads: both ran the composition)"
                  : "");
  return 0;
}
