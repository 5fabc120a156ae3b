// Counter-based random numbers. Every random draw in training (init, dropout masks, router
// jitter, synthetic data) is a pure function of (seed, stream, index), so it does not depend on
// thread count, backend or process layout, and a CUDA kernel computes the same bits as the CPU.
#pragma once
#include <cmath>
#include <cstdint>

namespace switcht5 {

// splitmix64's constants: the golden-ratio increment (gamma) and the finalizer's multipliers.
// Named because vectorized copies of mix64 (backend/cpu/cpu_kernels.h) must use the same ones.
inline constexpr uint64_t kMixGamma = 0x9E3779B97F4A7C15ull;
inline constexpr uint64_t kMixMul1 = 0xBF58476D1CE4E5B9ull;
inline constexpr uint64_t kMixMul2 = 0x94D049BB133111EBull;

// splitmix64 finalizer: a bijective 64-bit mix with good avalanche (Steele et al. 2014).
inline constexpr uint64_t mix64(uint64_t z) {
  z += kMixGamma;
  z = (z ^ (z >> 30)) * kMixMul1;
  z = (z ^ (z >> 27)) * kMixMul2;
  return z ^ (z >> 31);
}

// Derives a child seed from a parent seed and a tag (e.g. step, layer index, call site).
inline constexpr uint64_t derive_seed(uint64_t seed, uint64_t tag) { return mix64(seed ^ mix64(tag)); }

// Uniform float in [0, 1) from (seed, index): element `index` of the splitmix64 stream started
// at `seed` (state seed + index * golden gamma, one mix per draw), top 24 bits. Streams of
// different seeds are decorrelated because seeds come from derive_seed (fully mixed).
inline constexpr float uniform01(uint64_t seed, uint64_t index) {
  return static_cast<float>(mix64(seed + index * kMixGamma) >> 40) *
         (1.0f / 16777216.0f);
}

// 16 random bits for element `index` of the stream `seed`: one splitmix64 draw serves four
// consecutive elements (bits 0-15 for index % 4 == 0, 16-31 for 1, ...). Dropout uses these so
// that a mask costs a quarter of a 64-bit mix per element; its keep probability is therefore
// quantised to 1/65536 (see dropout_threshold).
inline constexpr uint32_t random16(uint64_t seed, uint64_t index) {
  return uint32_t(mix64(seed + (index >> 2) * kMixGamma) >> (16 * (index & 3))) &
         0xFFFFu;
}

// Dropout keeps element i iff random16(seed, i) >= dropout_threshold(p) = round(p * 65536).
inline uint32_t dropout_threshold(float p) {
  return static_cast<uint32_t>(std::lround(static_cast<double>(p) * 65536.0));
}

// The key of a random stream as a backend op receives it: a seed fixed when the op is issued and,
// optionally, a step counter the op reads from device memory when it runs. The stream's seed is
//   key.step ? derive_seed(key.seed, *key.step) : key.seed.
// Training keys carry the step counter, so that work recorded once (a CUDA graph of the step,
// train.cuda_graphs) draws the current step's masks when replayed: the host never bakes a
// step-dependent seed into the recording. A plain seed converts to a key without a step.
struct RandomKey {
  uint64_t seed = 0;
  const uint64_t* step = nullptr;  // backend (device) memory, or null

  RandomKey(uint64_t s = 0) : seed(s) {}  // NOLINT(google-explicit-constructor): a plain seed
  RandomKey(uint64_t s, const uint64_t* st) : seed(s), step(st) {}
  // A child key: the seed derived with `tag`, the same step counter.
  RandomKey derive(uint64_t tag) const { return {derive_seed(seed, tag), step}; }
  // The stream's seed where the counter is host-readable (host backends).
  uint64_t host_seed() const { return step ? derive_seed(seed, *step) : seed; }
};

// Host-side sequential generator built on the same mixer (for init and synthetic data).
class CounterRng {
 public:
  explicit CounterRng(uint64_t seed) : seed_(seed) {}
  uint64_t next_u64() { return mix64(seed_ + mix64(counter_++)); }
  // Uniform double in [0, 1) with 53 random bits.
  double next_double() { return static_cast<double>(next_u64() >> 11) * (1.0 / 9007199254740992.0); }
  // Uniform integer in [0, n).
  uint64_t next_below(uint64_t n) { return next_u64() % n; }
  // Standard normal (Box-Muller, one draw per call; deterministic given the seed).
  double next_normal() {
    double u1 = next_double(), u2 = next_double();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  // Normal truncated to [-2, 2] standard deviations by rejection (as jax/flax truncated_normal),
  // rescaled so that the result has unit variance (stddev / .87962566103423978).
  double next_truncated_normal() {
    for (;;) {
      double z = next_normal();
      if (z >= -2.0 && z <= 2.0) return z / 0.87962566103423978;
    }
  }

 private:
  uint64_t seed_;
  uint64_t counter_ = 0;
};

}  // namespace switcht5
