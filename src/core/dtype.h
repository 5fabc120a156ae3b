// Element types of backend buffers, and bfloat16 as the CPU emulates it.
//
// bfloat16 (Kalamkar et al. 2019) is the upper half of an IEEE float32: 1 sign, 8 exponent and
// 7 mantissa bits, the float32 range with 2^-8 relative precision. Every bf16 value is exactly a
// float32, so widening is exact and a GEMM of bf16 operands accumulated in float32 (what a GPU's
// tensor cores do) is reproduced on the CPU by widening and calling an fp32 GEMM. Narrowing
// rounds to nearest, ties to even (the rounding of CUDA's __float2bfloat16_rn): the CPU backend
// rounds at exactly the points where a GPU kernel stores a bf16 result, so the bf16 training
// path runs, bit for bit in its rounding, on every machine without hardware bf16.
#pragma once
#include <bit>
#include <cstddef>
#include <cstdint>

namespace switcht5 {

enum class DType : uint8_t {
  kF32,   // float32
  kBF16,  // bfloat16, stored as uint16_t
  kI32,   // int32 (token ids, labels, expert indices, slots)
};

constexpr size_t dtype_size(DType t) { return t == DType::kBF16 ? 2 : 4; }
constexpr const char* dtype_name(DType t) {
  return t == DType::kF32 ? "fp32" : t == DType::kBF16 ? "bf16" : "int32";
}

// float32 -> bfloat16, round to nearest even. A NaN stays a (quiet) NaN; values past the largest
// bf16 round to +-Inf as IEEE rounding does.
constexpr uint16_t float_to_bf16(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu) != 0)
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // NaN: keep the sign, force quiet
  const uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<uint16_t>((bits + 0x7FFFu + lsb) >> 16);
}

constexpr float bf16_to_float(uint16_t h) {
  return std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
}

// The float32 nearest to x that a bf16 can hold (float -> bf16 -> float).
constexpr float round_to_bf16(float x) { return bf16_to_float(float_to_bf16(x)); }

}  // namespace switcht5
