// The CUDA backend's memory constants, in a plain C++ header with no CUDA dependency, so that
// `switcht5 plan` (built with or without the CUDA backend) sizes a CUDA run from the same numbers
// the backend uses (cuda_backend.h describes the arena).
#pragma once
#include <algorithm>
#include <cstddef>

namespace switcht5 {

// The environment variable that sizes the arena (a fraction of the free memory).
inline constexpr const char* kCudaMemoryFractionEnv = "SWITCHT5_CUDA_MEMORY_FRACTION";

namespace cuda {

// Device scratch for multi-pass reductions (kernels.h, Ctx::workspace).
inline constexpr size_t kWorkspaceBytes = size_t(4) << 20;
// cuBLASLt's workspace: 32 MiB, NVIDIA's recommendation for Hopper.
inline constexpr size_t kCublasWorkspaceBytes = size_t(32) << 20;
// One double or int64 result read back to the host, with room to spare.
inline constexpr size_t kResultBytes = 64;
// The arena: SWITCHT5_CUDA_MEMORY_FRACTION (default below) of the device's free memory at the
// first allocation, but leaving at least kArenaHeadroomBytes free (the CUDA context's lazily
// loaded kernel modules, local memory and later NCCL's buffers live outside it), rounded down to
// whole kArenaGranule (the driver's large-page size).
inline constexpr double kDefaultMemoryFraction = 0.9;
inline constexpr size_t kArenaHeadroomBytes = size_t(1) << 30;
inline constexpr size_t kArenaGranule = size_t(2) << 20;

// The arena's size on a device with `free_bytes` free (the rule above): what CudaBackend reserves
// and what `plan` checks a run against.
inline size_t arena_bytes(size_t free_bytes, double fraction) {
  const size_t wanted = static_cast<size_t>(double(free_bytes) * fraction);
  const size_t capped = free_bytes > kArenaHeadroomBytes
                            ? std::min(wanted, free_bytes - kArenaHeadroomBytes)
                            : wanted;
  return capped / kArenaGranule * kArenaGranule;
}

}  // namespace cuda
}  // namespace switcht5
