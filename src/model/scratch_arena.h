// ScratchArena: typed, bounds-checked pieces of one backend scratch buffer, taken in order.
//
// Layers get their workspace as a raw backend buffer of a size they declared (scratch_floats()
// and the like). Instead of carving it with pointer arithmetic on floats, a layer wraps it in an
// arena and takes each piece with its element type and count:
//   ScratchArena arena(scratch, scratch_floats());
//   float* dprobs = arena.take<float>(probs_.size());      // [B,H,Tq,Tk]
//   uint16_t* xb = arena.take<uint16_t>(n);                 // a bf16 piece
// Pieces are aligned to their type, follow each other, and never overlap; taking more than the
// declared size is an internal error naming the arena and the sizes, so a scratch_floats() that
// undercounts fails at once instead of corrupting a neighbour. The arena only computes addresses
// (it never dereferences them), so it works on device memory too.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/check.h"

namespace switcht5 {

class ScratchArena {
 public:
  // The buffer [base, base + floats) in units of floats (how the model sizes its scratch).
  ScratchArena(float* base, int64_t floats, const char* name = "scratch")
      : base_(reinterpret_cast<std::byte*>(base)), bytes_(size_t(floats) * sizeof(float)),
        name_(name) {
    SWT_CHECK(base != nullptr || floats == 0, "{}: no buffer", name);
  }

  // The next n elements of type T.
  template <class T>
  T* take(int64_t n) {
    SWT_CHECK(n >= 0, "{}: negative piece ({} elements)", name_, n);
    const size_t at = (used_ + alignof(T) - 1) / alignof(T) * alignof(T);
    const size_t end = at + size_t(n) * sizeof(T);
    SWT_CHECK(end <= bytes_, "{}: a piece of {} bytes at offset {} overruns its {} bytes", name_,
              size_t(n) * sizeof(T), at, bytes_);
    used_ = end;
    return reinterpret_cast<T*>(base_ + at);
  }

  // What is left, as a nested arena of whole floats (for a sub-layer's own scratch).
  int64_t remaining_floats() const { return int64_t((bytes_ - used_) / sizeof(float)); }
  size_t used_bytes() const { return used_; }

 private:
  std::byte* base_;
  size_t bytes_;
  size_t used_ = 0;
  const char* name_;
};

}  // namespace switcht5
