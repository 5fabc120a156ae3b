// DeviceArena (backend/device_arena.h), the CUDA backend's allocator, as pure bookkeeping over a
// made-up address range (never dereferenced): alignment, best fit, merging of freed neighbours,
// exhaustion, peak, bad frees, and a long random sequence checked against a model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <vector>

#include "backend/device_arena.h"
#include "core/check.h"
#include "core/rng.h"

namespace switcht5 {
namespace {

constexpr size_t kA = DeviceArena::kAlignment;
void* const kBase = reinterpret_cast<void*>(uintptr_t{1} << 40);

uintptr_t offset(const void* p) {
  return reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(kBase);
}

TEST(DeviceArena, AlignsAndRoundsEveryBlock) {
  DeviceArena a;
  a.reset(kBase, 100 * kA + 17);  // the ragged tail is not used
  EXPECT_EQ(a.capacity(), 100 * kA);
  void* p0 = a.allocate(0);
  void* p1 = a.allocate(1);
  void* p2 = a.allocate(kA + 1);
  void* p3 = a.allocate(kA);
  for (void* p : {p0, p1, p2, p3}) {
    ASSERT_NE(p, nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % kA, 0u);
  }
  EXPECT_EQ(offset(p0), 0u);
  EXPECT_EQ(offset(p1), kA);
  EXPECT_EQ(offset(p2), 2 * kA);
  EXPECT_EQ(offset(p3), 4 * kA);
  EXPECT_EQ(a.bytes_in_use(), 5 * kA);
  EXPECT_TRUE(a.owns(p2));
  EXPECT_FALSE(a.owns(static_cast<char*>(p2) + kA));
}

TEST(DeviceArena, BestFitPicksTheSmallestHoleThenTheLowestAddress) {
  DeviceArena a;
  a.reset(kBase, 64 * kA);
  std::vector<void*> p;
  for (size_t n : {4, 1, 2, 1, 2, 1}) p.push_back(a.allocate(n * kA));
  // Holes of 4, 2 and 2 blocks (each between live blocks), then the 51-block tail.
  a.free(p[0]);
  a.free(p[2]);
  a.free(p[4]);
  EXPECT_EQ(a.free_blocks(), 4u);
  void* q = a.allocate(2 * kA);
  EXPECT_EQ(q, p[2]) << "the first of the two 2-block holes";
  void* r = a.allocate(2 * kA - 5);
  EXPECT_EQ(r, p[4]);
  void* s = a.allocate(3 * kA);
  EXPECT_EQ(s, p[0]) << "the 4-block hole, not the tail";
}

TEST(DeviceArena, FreedNeighboursMergeIntoOneBlock) {
  DeviceArena a;
  a.reset(kBase, 10 * kA);
  void* x = a.allocate(3 * kA);
  void* y = a.allocate(3 * kA);
  void* z = a.allocate(4 * kA);
  EXPECT_EQ(a.allocate(1), nullptr) << "full";
  EXPECT_EQ(a.largest_free_block(), 0u);
  a.free(x);
  a.free(z);
  EXPECT_EQ(a.free_blocks(), 2u);
  EXPECT_EQ(a.allocate(5 * kA), nullptr) << "no single hole of 5 blocks yet";
  a.free(y);  // merges with both neighbours
  EXPECT_EQ(a.free_blocks(), 1u);
  EXPECT_EQ(a.largest_free_block(), 10 * kA);
  EXPECT_EQ(a.bytes_in_use(), 0u);
  EXPECT_EQ(a.peak_bytes(), 10 * kA);
  EXPECT_EQ(a.allocate(10 * kA), kBase);
}

TEST(DeviceArena, ExhaustionReturnsNullAndBadFreesThrow) {
  DeviceArena a;
  a.reset(kBase, 4 * kA);
  EXPECT_EQ(a.allocate(4 * kA + 1), nullptr);
  EXPECT_EQ(a.allocate(SIZE_MAX), nullptr);  // no overflow in the rounding
  void* p = a.allocate(kA);
  EXPECT_THROW(a.free(static_cast<char*>(p) + kA), Error) << "never allocated";
  EXPECT_THROW(a.free(nullptr), Error);
  a.free(p);
  EXPECT_THROW(a.free(p), Error) << "double free";
  EXPECT_EQ(a.bytes_in_use(), 0u);
}

// Random allocations and frees against a model of live blocks: blocks never overlap and stay
// inside the range, the byte counts add up, no two free blocks are adjacent (merging happened),
// and freeing everything leaves one block.
TEST(DeviceArena, RandomSequenceKeepsItsInvariants) {
  const size_t capacity = 4096 * kA;
  DeviceArena a;
  a.reset(kBase, capacity);
  CounterRng rng(7);
  std::map<uintptr_t, size_t> live;  // offset -> rounded bytes
  size_t in_use = 0, peak = 0;
  for (int it = 0; it < 20000; ++it) {
    const bool alloc = live.empty() || rng.next_below(100) < 55;
    if (alloc) {
      const size_t bytes = rng.next_below(uint64_t(40 * kA));
      void* p = a.allocate(bytes);
      if (!p) {
        ASSERT_LT(a.largest_free_block(), DeviceArena::rounded(bytes));
        continue;
      }
      const uintptr_t o = offset(p);
      const size_t r = DeviceArena::rounded(bytes);
      ASSERT_LE(o + r, capacity);
      auto next = live.lower_bound(o);
      if (next != live.end()) {
        ASSERT_LE(o + r, next->first) << "overlaps the next block";
      }
      if (next != live.begin()) {
        auto prev = std::prev(next);
        ASSERT_LE(prev->first + prev->second, o) << "overlaps the previous block";
      }
      live.emplace(o, r);
      in_use += r;
      peak = std::max(peak, in_use);
    } else {
      auto victim = live.begin();
      std::advance(victim, rng.next_below(live.size()));
      a.free(static_cast<char*>(kBase) + victim->first);
      in_use -= victim->second;
      live.erase(victim);
    }
    ASSERT_EQ(a.bytes_in_use(), in_use);
    ASSERT_EQ(a.peak_bytes(), peak);
    ASSERT_EQ(a.live_blocks(), live.size());
    // Free blocks are the gaps between live blocks, each merged into one: their number is the
    // number of non-empty gaps.
    size_t gaps = 0, end = 0;
    for (const auto& [o, r] : live) {
      gaps += o > end;
      end = o + r;
    }
    gaps += capacity > end;
    ASSERT_EQ(a.free_blocks(), gaps);
  }
  for (const auto& [o, r] : live) a.free(static_cast<char*>(kBase) + o);
  EXPECT_EQ(a.free_blocks(), 1u);
  EXPECT_EQ(a.largest_free_block(), capacity);
}

}  // namespace
}  // namespace switcht5
