#include "backend/device_arena.h"

#include <iterator>

#include "core/check.h"

namespace switcht5 {

void DeviceArena::reset(void* base, size_t capacity) {
  SWT_CHECK(used_.empty(), "DeviceArena::reset with {} blocks still allocated", used_.size());
  SWT_CHECK(address(base) % kAlignment == 0, "DeviceArena::reset: base {} is not {}-byte aligned",
            base, kAlignment);
  base_ = address(base);
  capacity_ = capacity / kAlignment * kAlignment;
  in_use_ = peak_ = 0;
  free_by_address_.clear();
  free_by_size_.clear();
  if (capacity_ > 0) insert_free(base_, capacity_);
}

void DeviceArena::insert_free(uintptr_t at, size_t bytes) {
  free_by_address_.emplace(at, bytes);
  free_by_size_.emplace(bytes, at);
}

void DeviceArena::erase_free(std::map<uintptr_t, size_t>::iterator it) {
  free_by_size_.erase({it->second, it->first});
  free_by_address_.erase(it);
}

void* DeviceArena::allocate(size_t bytes) {
  if (bytes > capacity_) return nullptr;  // also keeps rounded() from overflowing
  const size_t want = rounded(bytes);
  auto fit = free_by_size_.lower_bound({want, 0});
  if (fit == free_by_size_.end()) return nullptr;
  const auto [size, at] = *fit;
  erase_free(free_by_address_.find(at));
  if (size > want) insert_free(at + want, size - want);
  used_.emplace(at, want);
  in_use_ += want;
  if (in_use_ > peak_) peak_ = in_use_;
  return reinterpret_cast<void*>(at);
}

void DeviceArena::free(void* ptr) {
  const auto used = used_.find(address(ptr));
  SWT_CHECK(used != used_.end(),
            "free of {}: not a live block of this arena (base {}, {} bytes, {} live blocks)", ptr,
            reinterpret_cast<void*>(base_), capacity_, used_.size());
  uintptr_t at = used->first;
  size_t bytes = used->second;
  used_.erase(used);
  in_use_ -= bytes;
  // Merge with the free block that ends where this one starts, and the one that starts where it
  // ends.
  auto next = free_by_address_.lower_bound(at);
  if (next != free_by_address_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == at) {
      at = prev->first;
      bytes += prev->second;
      erase_free(prev);
    }
  }
  if (next != free_by_address_.end() && next->first == at + bytes) {
    bytes += next->second;
    erase_free(next);
  }
  insert_free(at, bytes);
}

size_t DeviceArena::largest_free_block() const {
  return free_by_size_.empty() ? 0 : free_by_size_.rbegin()->first;
}

}  // namespace switcht5
