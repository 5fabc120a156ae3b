#include "backend/sizing_backend.h"

#include <algorithm>

#include "core/check.h"

namespace switcht5 {

SizingBackend::SizingBackend(size_t block_bytes) : block_bytes_(block_bytes) {
  SWT_CHECK(block_bytes >= 64 && block_bytes % 64 == 0,
            "SizingBackend: block of {} bytes (a multiple of 64 expected)", block_bytes);
}

size_t SizingBackend::occupied(size_t bytes) const {
  return std::max<size_t>(1, (bytes + block_bytes_ - 1) / block_bytes_) * block_bytes_;
}

void* SizingBackend::alloc_bytes(size_t bytes) {
  const uintptr_t at = next_;
  next_ += occupied(bytes);  // distinct, block-aligned (so 64-byte aligned) addresses
  SWT_CHECK(next_ < (kAddressBit << 1), "SizingBackend: address space exhausted");
  live_.emplace(at, bytes);
  requested_ += bytes;
  occupied_ += occupied(bytes);
  peak_requested_ = std::max(peak_requested_, requested_);
  peak_occupied_ = std::max(peak_occupied_, occupied_);
  return reinterpret_cast<void*>(at);
}

void SizingBackend::free_bytes(void* ptr) {
  if (!ptr) return;
  auto it = live_.find(reinterpret_cast<uintptr_t>(ptr));
  SWT_CHECK(it != live_.end(), "SizingBackend::free_bytes({}): not a live allocation", ptr);
  requested_ -= it->second;
  occupied_ -= occupied(it->second);
  live_.erase(it);
}

void SizingBackend::refuse(const char* op) {
  throw Error(fmt::format("the sizing backend computes nothing: {}", op));
}

}  // namespace switcht5
