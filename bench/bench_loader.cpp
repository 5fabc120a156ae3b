// bench_loader: how fast the data loader makes span-corrupted batches, against what the trainer
// consumes. Reads shards made by `switcht5-data tokenize`.
//
// Usage: bench_loader GLOB [--inputs 512] [--targets 114] [--batch 32] [--batches 200]
//                          [--prefetch 0]
// Prints batches/s and sequences/s with the given prefetch (0: every batch made inline, the
// loader's raw speed on one thread).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <fmt/format.h>

#include "core/check.h"
#include "data/loader.h"

int main(int argc, char** argv) {
  using namespace switcht5;
  try {
    SWT_USER_CHECK(argc >= 2, "usage: bench_loader GLOB [--inputs N] [--targets N] [--batch N] "
                              "[--batches N] [--prefetch N]");
    LoaderOptions o;
    o.shards = expand_glob(argv[1], "GLOB");
    o.global_batch = 32;
    o.prefetch = 0;
    int batches = 200;
    for (int i = 2; i + 1 < argc; i += 2) {
      const std::string a = argv[i];
      const int v = std::atoi(argv[i + 1]);
      if (a == "--inputs") o.inputs_length = v;
      else if (a == "--targets") o.targets_length = v;
      else if (a == "--batch") o.global_batch = v;
      else if (a == "--batches") batches = v;
      else if (a == "--prefetch") o.prefetch = v;
      else SWT_USER_CHECK(false, "unknown option {}", a);
    }
    DataLoader loader(o);
    Batch b;
    loader.next(b);  // warm the caches
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < batches; ++i) loader.next(b);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fmt::print("loader: {} shards, {} tokens, {} pieces of {} raw tokens per epoch\n",
               o.shards.size(), loader.total_tokens(), loader.pieces_per_epoch(),
               loader.piece_length());
    fmt::print("{} batches of {} x ({} + {}) in {:.3f} s: {:.1f} batches/s, {:.0f} sequences/s "
               "(prefetch {})\n",
               batches, o.global_batch, o.inputs_length, o.targets_length, s, batches / s,
               batches * double(o.global_batch) / s, o.prefetch);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_loader: error: %s\n", e.what());
    return 2;
  }
}
