// NcclDataPlane (nccl_data_plane.h): communicator set-up over the control plane, the event
// ordering with the backend's compute stream, and each collective as NCCL calls. Compiled by
// the C++ compiler (no device code).
#include "comm/nccl/nccl_data_plane.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <numeric>
#include <string>

#include "backend/cuda/cuda_check.h"
#include "core/check.h"

namespace switcht5 {
namespace {

[[noreturn]] void nccl_fail(const char* file, int line, const char* call, ncclResult_t r,
                            ncclComm_t comm) {
  const char* detail = ncclGetLastError(comm);
  throw Error(fmt::format("{}:{}: NCCL call {} failed: {} (code {}){}{}", file, line, call,
                          ncclGetErrorString(r), int(r), detail && *detail ? ": " : "",
                          detail ? detail : ""));
}

// `comm` (may be null) names the communicator whose last error adds detail.
#define SWT_NCCL_CHECK(call, comm)                                               \
  do {                                                                           \
    const ncclResult_t swt_r_ = (call);                                          \
    if (swt_r_ != ncclSuccess) nccl_fail(__FILE__, __LINE__, #call, swt_r_, comm); \
  } while (0)

size_t floats(int64_t n) { return static_cast<size_t>(n); }

void check_counts(std::span<const int64_t> counts, int size) {
  SWT_CHECK(static_cast<int>(counts.size()) == size, "{} block counts for a data plane of {}",
            counts.size(), size);
  for (int64_t c : counts) SWT_CHECK(c >= 0, "negative block count {}", c);
}

bool all_equal(std::span<const int64_t> counts) {
  return std::adjacent_find(counts.begin(), counts.end(), std::not_equal_to<>()) == counts.end();
}

// Once per process: which NCCL runs, and the choices that fix its reduction order.
void log_nccl_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    int version = 0;
    ncclGetVersion(&version);
    const char* algo = std::getenv("NCCL_ALGO");
    const char* proto = std::getenv("NCCL_PROTO");
    spdlog::info("NCCL data plane: NCCL {} (built against {}.{}.{}), NCCL_ALGO={}, NCCL_PROTO={}",
                 version, NCCL_MAJOR, NCCL_MINOR, NCCL_PATCH, algo ? algo : "(NCCL's choice)",
                 proto ? proto : "(NCCL's choice)");
  });
}

// One NCCL call per non-empty block of `data`, in one group: issue(block, count, r) for block r
// (counts as in DataPlane, block r owned by rank r). The unequal blocks of ZeRO-1 (mostly 0)
// take this path in reduce_scatter_sum (ncclReduce to the owner) and all_gather
// (ncclBroadcast from it).
template <class Issue>
void per_block_group(float* data, std::span<const int64_t> counts, ncclComm_t comm,
                     const char* what, Issue issue) {
  SWT_NCCL_CHECK(ncclGroupStart(), comm);
  int64_t start = 0;
  for (size_t r = 0; r < counts.size(); ++r) {
    if (counts[r] > 0) {
      const ncclResult_t res = issue(data + start, counts[r], int(r));
      if (res != ncclSuccess) {
        ncclGroupEnd();
        nccl_fail(__FILE__, __LINE__, what, res, comm);
      }
    }
    start += counts[r];
  }
  SWT_NCCL_CHECK(ncclGroupEnd(), comm);
}

}  // namespace

NcclDataPlane::NcclDataPlane(const Communicator& group, CudaBackend& be)
    : be_(be), rank_(group.rank()), size_(group.size()) {
  log_nccl_once();
  SWT_CUDA_CHECK(cudaSetDevice(be.device()));
  compute_ = be.stream();
  comm_stream_ = be.communication_stream();
  try {
    cudaEvent_t e = nullptr;
    SWT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    ready_ = e;
    SWT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    done_ = e;
    // The id travels on a duplicate of the group (control plane), as bytes in a string.
    std::unique_ptr<Communicator> control = group.split(0, group.rank());
    ncclUniqueId id;
    std::string bytes;
    if (rank_ == 0) {
      SWT_NCCL_CHECK(ncclGetUniqueId(&id), nullptr);
      bytes.assign(reinterpret_cast<const char*>(&id), sizeof(id));
    }
    control->broadcast(bytes, 0);
    SWT_CHECK(bytes.size() == sizeof(id), "ncclUniqueId of {} bytes received, expected {}",
              bytes.size(), sizeof(id));
    std::memcpy(&id, bytes.data(), sizeof(id));
    ncclComm_t comm = nullptr;
    SWT_NCCL_CHECK(ncclCommInitRank(&comm, size_, id, rank_), nullptr);
    comm_ = comm;
  } catch (...) {
    if (ready_) cudaEventDestroy(ready_);
    if (done_) cudaEventDestroy(done_);
    throw;
  }
}

NcclDataPlane::~NcclDataPlane() {
  // Nothing here throws. After abort() the communicator is gone and nothing is waited for.
  if (!aborted_.load()) {
    cudaEventSynchronize(done_);  // this plane's last call (an event never recorded has passed)
    ncclCommDestroy(comm_);
  }
  cudaEventDestroy(ready_);
  cudaEventDestroy(done_);
}

void NcclDataPlane::abort() {
  if (aborted_.exchange(true)) return;
  ncclCommAbort(comm_);  // its result is of no use: the communicator is gone either way
}

ncclComm* NcclDataPlane::begin_call(const char* what) {
  SWT_CHECK(!aborted_.load(), "NcclDataPlane::{} after abort(): the communicator is gone",
            what);
  SWT_CUDA_CHECK(cudaEventRecord(ready_, compute_));
  SWT_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, ready_, 0));
  return comm_;
}

void NcclDataPlane::end_call() { SWT_CUDA_CHECK(cudaEventRecord(done_, comm_stream_)); }

void NcclDataPlane::all_reduce_sum(float* data, int64_t n) {
  SWT_CHECK(n >= 0, "negative count {}", n);
  count(Collective::kAllReduce, n);
  if (n == 0) return;
  ncclComm_t comm = begin_call("all_reduce_sum");
  SWT_NCCL_CHECK(ncclAllReduce(data, data, floats(n), ncclFloat32, ncclSum, comm, comm_stream_),
                 comm);
  end_call();
}

void NcclDataPlane::reduce_scatter_sum(float* data, std::span<const int64_t> counts) {
  check_counts(counts, size_);
  const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  count(Collective::kReduceScatter, total);
  if (total == 0) return;
  ncclComm_t comm = begin_call("reduce_scatter_sum");
  if (all_equal(counts) && !blockwise_always_) {
    const int64_t c = counts[0];  // in place: recvbuff is this rank's block of sendbuff
    SWT_NCCL_CHECK(ncclReduceScatter(data, data + c * rank_, floats(c), ncclFloat32, ncclSum,
                                     comm, comm_stream_),
                   comm);
  } else {
    per_block_group(data, counts, comm, "ncclReduce(block, ...)",
                    [&](float* block, int64_t c, int owner) {
                      return ncclReduce(block, block, floats(c), ncclFloat32, ncclSum, owner, comm,
                                        comm_stream_);
                    });
  }
  end_call();
}

void NcclDataPlane::all_gather(float* data, std::span<const int64_t> counts) {
  check_counts(counts, size_);
  const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  count(Collective::kAllGather, total);
  if (total == 0) return;
  ncclComm_t comm = begin_call("all_gather");
  if (all_equal(counts) && !blockwise_always_) {
    const int64_t c = counts[0];  // in place: sendbuff is this rank's block of recvbuff
    SWT_NCCL_CHECK(ncclAllGather(data + c * rank_, data, floats(c), ncclFloat32, comm,
                                 comm_stream_),
                   comm);
  } else {
    per_block_group(data, counts, comm, "ncclBroadcast(block, ...)",
                    [&](float* block, int64_t c, int owner) {
                      return ncclBroadcast(block, block, floats(c), ncclFloat32, owner, comm,
                                           comm_stream_);
                    });
  }
  end_call();
}

void NcclDataPlane::all_to_all(float* out, const float* in, int64_t n) {
  SWT_CHECK(n >= 0, "negative count {}", n);
  count(Collective::kAllToAll, n * size_);
  if (n == 0) return;
  ncclComm_t comm = begin_call("all_to_all");
  SWT_NCCL_CHECK(ncclGroupStart(), comm);
  for (int r = 0; r < size_; ++r) {
    ncclResult_t res = ncclSend(in + n * r, floats(n), ncclFloat32, r, comm, comm_stream_);
    if (res == ncclSuccess)
      res = ncclRecv(out + n * r, floats(n), ncclFloat32, r, comm, comm_stream_);
    if (res != ncclSuccess) {
      ncclGroupEnd();
      nccl_fail(__FILE__, __LINE__, "ncclSend / ncclRecv(block, ...)", res, comm);
    }
  }
  SWT_NCCL_CHECK(ncclGroupEnd(), comm);
  end_call();
}

void NcclDataPlane::broadcast(float* data, int64_t n, int root) {
  SWT_CHECK(n >= 0, "negative count {}", n);
  SWT_CHECK(root >= 0 && root < size_, "broadcast root {} is not a rank of a data plane of {}",
            root, size_);
  count(Collective::kBroadcast, n);
  if (n == 0) return;
  ncclComm_t comm = begin_call("broadcast");
  SWT_NCCL_CHECK(ncclBroadcast(data, data, floats(n), ncclFloat32, root, comm, comm_stream_),
                 comm);
  end_call();
}

void NcclDataPlane::synchronize() {
  SWT_CHECK(!aborted_.load(), "NcclDataPlane::synchronize after abort(): the communicator is "
            "gone");
  SWT_CUDA_CHECK(cudaEventRecord(done_, comm_stream_));
  SWT_CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0));
}

}  // namespace switcht5
