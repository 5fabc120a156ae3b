// Building blocks of the CPU backend's hot loops: reductions in double that pipeline and
// vectorize while staying bitwise reproducible, and runtime dispatch to wider vector units.
#pragma once

#include <cstdint>

namespace switcht5::cpu {

// SWT_CPU_CLONES on a function compiles it three times (AVX-512, AVX2, and the build's
// x86-64-v2 baseline) and picks the one the running CPU supports when the program loads (GCC
// target_clones, an ifunc): one binary still runs on every x86-64-v2 machine. The clones compute
// bitwise the same results, because the build compiles with -ffp-contract=off (no fused
// multiply-add where the source has a multiply and an add: AVX-512's target implies FMA) and
// vectorizing our loops never reorders a reduction (lane_sum fixes its order in the source).
// Use it on loops over contiguous memory that the compiler vectorizes; calls into libm (expf,
// tanh) do not get wider from it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define SWT_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SWT_CPU_CLONES
#endif

// Sum of term(i) for i in [0, n), in double, over kSumLanes interleaved lanes: lane l adds the
// terms with i % kSumLanes == l in index order, and the lanes are added in a fixed pairwise tree:
//   ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
// One accumulator would be a chain of dependent adds, each waiting for the last (4 cycles): a
// latency-bound loop at a fraction of the memory bandwidth. Eight independent chains pipeline
// and vectorize; the order depends on n alone (never on threads or the vector width), so every
// thread count and every clone gives bitwise the same sum.
constexpr int kSumLanes = 8;

template <class Term>
inline double lane_sum(int64_t n, Term term) {
  double acc[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) acc[l] += term(i + l);
  for (int l = 0; i < n; ++i, ++l) acc[l] += term(i);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace switcht5::cpu
