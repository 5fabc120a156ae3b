// bench_optimizer: what the optimizer update costs per parameter, against this machine's memory
// bandwidth measured in the same run, for a config's real parameter list (issue 15: the
// optimizer's cost grows with the parameters by nature; it should be memory-bandwidth bound).
//
// Usage: bench_optimizer CONFIG [--steps N] [--set k=v ...]
//
// Timed, each the median of N calls after one warm-up call, over the config's whole ParamStore
// on the CPU backend (one process, OMP_NUM_THREADS threads):
//   grad norm   Backend::sum_squares over every gradient (clip_grad_norm's one pass)
//   optimizer   Optimizer::step (the config's train.optimizer and its options; fp32, no bf16 copy)
//   stream      Backend::axpy(values, 0, grads): reads 2 and writes 1 float per element, the
//               backend's own streaming loop; its GB/s is the bandwidth the others are held to.
// Bytes per parameter, the least each pass must move:
//   grad norm  4 (read g)
//   adafactor 16 (statistics: read g; update: read g, read and write p; the update needs the
//                 clipping factor, an rms over the whole matrix, so g is read twice), 20 with
//                 train.adafactor_scale_parameter (read p for its rms before the update)
//   adamw     28 (read g, m, v, p; write m, v, p)
// Printed: ms, ns per parameter, the bandwidth that time implies for those bytes, and its share of
// the stream bandwidth (100% = memory-bandwidth bound). Parameters and gradients are filled with
// values of the trained model's order of magnitude (no denormals, no zeros).
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "backend/cpu/cpu_backend.h"
#include "config/config.h"
#include "core/check.h"
#include "model/model.h"
#include "model/params.h"
#include "train/optimizer.h"

namespace {

using namespace switcht5;

// Deterministic pseudo-random floats in [-scale, scale) \ (-scale/16, scale/16): no zeros, no
// denormals; a cheap hash so 600M elements fill in about a second.
void fill(float* x, int64_t n, uint64_t seed, float scale) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    uint64_t z = (uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 31)) * 0xBF58476D1CE4E5B9ull;
    const float u = float((z >> 40) & 0xFFFFFF) / float(1 << 24);  // [0, 1)
    const float mag = scale * (0.0625f + 0.9375f * u);
    x[i] = (z >> 39) & 1 ? mag : -mag;
  }
}

template <class F>
double median_ms(int steps, F f) {
  f();  // warm-up: first touch of the optimizer state, page faults
  std::vector<double> ms;
  for (int s = 0; s < steps; ++s) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                     .count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

int run(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help") {
    std::printf("usage: bench_optimizer CONFIG [--steps N] [--set k=v ...]\n");
    return argc < 2 ? 2 : 0;
  }
  const std::string config = argv[1];
  int steps = 5;
  std::vector<std::string> sets;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    SWT_USER_CHECK(i + 1 < argc, "bench_optimizer: {} needs a value", a);
    if (a == "--steps") steps = std::atoi(argv[++i]);
    else if (a == "--set") sets.push_back(argv[++i]);
    else SWT_USER_CHECK(false, "bench_optimizer: unknown flag {}", a);
  }
  SWT_USER_CHECK(steps >= 1, "bench_optimizer: --steps must be >= 1");
  const RunConfig cfg = load_config(config, sets);

  CpuBackend be;
  ParamStore ps;
  register_model_params(ps, cfg.model);
  ps.allocate(be);
  const int64_t n = ps.total_numel();
  fill(ps.values(), n, 1, 0.05f);
  fill(ps.grads(), n, 2, 1e-3f);
  const OptimizerOptions oo = optimizer_options(cfg.train);
  auto opt = make_optimizer(oo, be, ps);

  // The optimizer changes the parameters a little each step; the gradients stay as filled.
  const double norm_ms = median_ms(steps, [&] { (void)be.sum_squares(ps.grads(), n); });
  const double opt_ms = median_ms(steps, [&] { opt->step(be, ps, 1e-3f); });
  const double stream_ms = median_ms(steps, [&] { be.axpy(ps.values(), 0.0f, ps.grads(), n); });

  const double stream_gbs = 12.0 * n / (stream_ms * 1e6);
  const bool scaled = oo.name == "adafactor" && oo.scale_parameter;
  const double opt_bytes = oo.name == "adamw" ? 28.0 : scaled ? 20.0 : 16.0;
  auto line = [&](const char* what, double ms, double bytes) {
    const double gbs = bytes * n / (ms * 1e6);
    std::printf("%-10s %9.1f ms  %6.2f ns/param  %5.1f B/param  %6.1f GB/s  %5.1f%% of stream\n",
                what, ms, ms * 1e6 / n, bytes, gbs, 100.0 * gbs / stream_gbs);
  };
  std::printf("config %s, %s%s, %lld parameters (%.1f MB fp32), %d OpenMP threads, median of %d\n",
              config.c_str(), oo.name.c_str(), scaled ? " with the parameter scale" : "",
              static_cast<long long>(n), 4e-6 * n,
              omp_get_max_threads(), steps);
  line("stream", stream_ms, 12.0);
  line("grad norm", norm_ms, 4.0);
  line("optimizer", opt_ms, opt_bytes);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const switcht5::UserError& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}
