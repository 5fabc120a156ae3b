// ScratchArena (model/scratch_arena.h): pieces follow each other in order, are aligned to their
// type, never overlap, and taking more than the buffer holds is an error naming the arena.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/check.h"
#include "model/scratch_arena.h"

namespace switcht5 {
namespace {

TEST(ScratchArena, PiecesAreConsecutiveAlignedAndChecked) {
  std::vector<float> buf(16);
  ScratchArena arena(buf.data(), 16, "test arena");
  float* a = arena.take<float>(3);
  uint16_t* h = arena.take<uint16_t>(3);  // 6 bytes: the next float piece must realign
  float* b = arena.take<float>(2);
  double* d = arena.take<double>(1);
  EXPECT_EQ(a, buf.data());
  EXPECT_EQ(reinterpret_cast<std::byte*>(h), reinterpret_cast<std::byte*>(buf.data() + 3));
  EXPECT_EQ(b, buf.data() + 5);  // 12 + 6 = 18 bytes, aligned up to 20
  EXPECT_EQ(reinterpret_cast<uintptr_t>(d) % alignof(double), 0u);
  EXPECT_GE(reinterpret_cast<std::byte*>(d), reinterpret_cast<std::byte*>(b + 2));
  EXPECT_EQ(arena.remaining_floats(), 16 - int64_t(arena.used_bytes() / sizeof(float)));
  try {
    arena.take<float>(arena.remaining_floats() + 1);
    FAIL() << "an overrun was not caught";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("test arena"), std::string::npos) << e.what();
  }
  ScratchArena empty(nullptr, 0);
  EXPECT_NO_THROW(empty.take<float>(0));
  EXPECT_THROW(empty.take<float>(1), Error);
}

}  // namespace
}  // namespace switcht5
