// DeviceArena: sub-allocation of one block of backend memory reserved at startup, so that a
// training step's allocations make no driver calls (cudaMalloc / cudaFree synchronise the device
// and cost milliseconds). Pure host bookkeeping over addresses: it never dereferences the block,
// so it is tested on the CPU (tests/test_device_arena.cpp) and used by the CUDA backend.
//
// Policy: best fit (the smallest free block that holds the request; the lowest address among
// equals), every block a multiple of kAlignment bytes starting at a kAlignment boundary of the
// reserved block; a freed block merges with free neighbours at once, so the free list never
// holds two adjacent blocks. The same sequence of requests gives the same addresses.
// Costs: O(log blocks) per allocate and free.
//
// Ordering: the arena reuses a freed block at once. A backend whose work runs asynchronously on
// ONE in-order stream may free a block that queued work still reads: work queued later, and so
// any later user of the block, runs after it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <unordered_map>
#include <utility>

namespace switcht5 {

class DeviceArena {
 public:
  static constexpr size_t kAlignment = 256;

  DeviceArena() = default;
  // Manages [base, base + capacity); base must be kAlignment-aligned. capacity is rounded down to
  // a multiple of kAlignment. Only on an arena that is empty (never reset, or everything freed).
  void reset(void* base, size_t capacity);

  // A block of at least `bytes` (0 counts as 1) bytes, kAlignment-aligned, or nullptr when no
  // free block is large enough (the caller reports it with the numbers below).
  void* allocate(size_t bytes);
  // Frees a block returned by allocate. Throws Error for a pointer that is not one (never
  // allocated, already freed, or inside a block).
  void free(void* ptr);
  bool owns(const void* ptr) const { return used_.count(address(ptr)) != 0; }

  static size_t rounded(size_t bytes) {
    return ((bytes == 0 ? 1 : bytes) + kAlignment - 1) / kAlignment * kAlignment;
  }
  void* base() const { return reinterpret_cast<void*>(base_); }
  size_t capacity() const { return capacity_; }
  size_t bytes_in_use() const { return in_use_; }       // rounded sizes of live blocks
  size_t peak_bytes() const { return peak_; }           // max of bytes_in_use() so far
  size_t largest_free_block() const;
  size_t live_blocks() const { return used_.size(); }
  size_t free_blocks() const { return free_by_address_.size(); }

 private:
  static uintptr_t address(const void* p) { return reinterpret_cast<uintptr_t>(p); }
  void insert_free(uintptr_t at, size_t bytes);
  void erase_free(std::map<uintptr_t, size_t>::iterator it);

  uintptr_t base_ = 0;
  size_t capacity_ = 0, in_use_ = 0, peak_ = 0;
  std::map<uintptr_t, size_t> free_by_address_;           // start -> bytes (for merging)
  std::set<std::pair<size_t, uintptr_t>> free_by_size_;   // (bytes, start) (for best fit)
  std::unordered_map<uintptr_t, size_t> used_;            // start -> bytes
};

}  // namespace switcht5
