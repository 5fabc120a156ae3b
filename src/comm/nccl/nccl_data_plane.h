// NcclDataPlane: the data plane (comm/data_plane.h) over NCCL, for CudaBackend memory
// (parallel.data_plane: nccl). Built only where NCCL is (SWITCHT5_HAVE_NCCL); this header
// keeps nccl.h and cuda_runtime.h out of its includers.
//
// Communicators: one per plane, so one per process group (the Trainer makes a plane for each of
// the data, expert, expert-replica and model groups; a group of one gets make_data_plane's
// local plane and no communicator). The constructor is collective over the group: the group's
// rank 0 makes an ncclUniqueId, the control plane (a duplicate of the group) broadcasts it,
// and every rank joins with ncclCommInitRank on the backend's device. ncclCommSplit would need
// a world NCCL communicator that nothing else uses, built where make_data_plane (which sees one
// explicit group at a time) cannot reach it; what it would buy, shared channel buffers between
// the four communicators, is device memory, not correctness. NCCL allocates its buffers outside
// the backend's arena: where it runs out of device memory, lower SWITCHT5_CUDA_MEMORY_FRACTION.
//
// Ordering. The backend issues compute to its compute stream; every NCCL call of every plane
// on that backend goes to the backend's ONE communication stream
// (CudaBackend::communication_stream):
//   a call          records `ready_` on the compute stream and makes the communication stream
//                   wait for it, then enqueues the NCCL work there: the collective reads its
//                   buffers after everything the backend issued before the call. The host does
//                   not wait, and the compute stream runs on meanwhile (the overlap; the
//                   call's buffers belong to the plane until synchronize, data_plane.h).
//   synchronize()   records `done_` on the communication stream and makes the compute stream
//                   wait for it: backend work issued afterwards runs after every NCCL call so
//                   far; again no host wait. The host sees results through the backend's own
//                   waits (copy_to_host, sum, ...), which now include the collectives. An arena
//                   block handed to a call may be freed once synchronize() has returned: later
//                   work that reuses it is on the compute stream, after the collective.
// One communication stream for all planes, not one per communicator: NCCL kernels block until
// their peers' arrive, and kernels of different communicators running concurrently on separate
// streams can deadlock (NCCL's "using multiple communicators concurrently"). On one stream they
// run in issue order. Every rank issues the same calls in the same order (the data-plane
// precondition, which holds by construction: every rank runs the same model code over the same
// layout, so the expert exchanges come in layer order, the gradient buckets in the reducer's
// fixed order, the ZeRO-1 gather after the optimizer), so the order is one global sequence and
// no rank waits on a collective that another rank has queued behind one it waits for.
//
// Collectives (n and counts are the same on every rank, data_plane.h):
//   all_reduce_sum       ncclAllReduce in place.
//   broadcast            ncclBroadcast in place.
//   all_to_all           one group of ncclSend + ncclRecv of n floats with every rank (itself
//                        included). The static capacity buffers give every rank the same counts
//                        every step: no count exchange, and a rank with no tokens for an expert
//                        still sends its (padded) block, so nothing differs between ranks to
//                        deadlock on.
//   reduce_scatter_sum   equal blocks: ncclReduceScatter in place (recvbuff = block rank());
//   all_gather           ncclAllGather in place likewise. Unequal blocks (ZeRO-1: a bucket cut by
//                        the shards, most blocks often 0): one ncclReduce, resp. ncclBroadcast,
//                        per non-empty block, rooted at the block's rank, in one group (one
//                        launch). Each block's bytes travel once, as in the collective; padding
//                        every block to the largest would move up to `size` times the bucket;
//                        grouped send/recv cannot reduce. ncclReduce leaves the non-root ranks'
//                        buffers as they were, which is the contract's "other blocks keep this
//                        rank's input".
//
// Determinism (the weaker NCCL contract of data_plane.h): NCCL chooses the algorithm (ring,
// tree, NVLS, ...) and protocol (LL, LL128, Simple) of a call from its cost model over the
// topology, the collective, the byte count and the NCCL_* environment (and a tuner plugin, if
// one is loaded), never from timing, and reduces without atomics. A fixed layout and bucket
// size on a fixed machine, NCCL version and environment therefore reduce in a fixed order:
// bitwise run to run. We do not set NCCL_ALGO / NCCL_PROTO: pinning them (Ring + Simple, the
// usual choice) would give up LL's latency on small buckets and tree / NVLS bandwidth at scale
// for nothing the fixed choice does not already give; a user who needs the same bits on another
// machine or NCCL version can pin them in the environment. The first plane logs NCCL's version
// and any NCCL_ALGO / NCCL_PROTO set.
//
// Errors: a failing NCCL or CUDA call throws Error with file:line, the call, NCCL's message and
// ncclGetLastError's detail. A peer that dies or never arrives leaves the NCCL kernels waiting;
// abort() (a watchdog's) ends them.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <span>

#include "backend/cuda/cuda_backend.h"
#include "comm/communicator.h"
#include "comm/data_plane.h"

struct ncclComm;     // nccl.h: typedef struct ncclComm* ncclComm_t
struct CUevent_st;   // cuda_runtime.h: cudaEvent_t

namespace switcht5 {

class NcclDataPlane final : public DataPlane {
 public:
  // Collective over `group` (through a duplicate of it, which carries the ncclUniqueId and is
  // then dropped). `be` must outlive the plane; its device is made current here.
  NcclDataPlane(const Communicator& group, CudaBackend& be);
  // Waits for this plane's calls (unless aborted), then ncclCommDestroy. Where a peer may never
  // arrive, abort() first: waiting would not end.
  ~NcclDataPlane() override;
  NcclDataPlane(const NcclDataPlane&) = delete;
  NcclDataPlane& operator=(const NcclDataPlane&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_reduce_sum(float* data, int64_t n) override;
  void reduce_scatter_sum(float* data, std::span<const int64_t> counts) override;
  void all_gather(float* data, std::span<const int64_t> counts) override;
  void all_to_all(float* out, const float* in, int64_t n) override;
  void broadcast(float* data, int64_t n, int root) override;
  void synchronize() override;
  // ncclCommAbort, once; safe from another thread while the issuing thread waits on the
  // backend (not while it is inside another call of this plane).
  void abort() override;

  // Tests: unequal-block reduce_scatter_sum / all_gather (one ncclReduce / ncclBroadcast per
  // block) for every call, so a group of one, whose blocks are always equal, runs them too.
  // Results do not depend on it. Every rank must use the same value.
  void set_blockwise_always(bool on) { blockwise_always_ = on; }

 private:
  // The communication stream waits for the compute stream's work so far; returns the
  // communicator (Error after abort()).
  ncclComm* begin_call(const char* what);
  // Records done_ after the call's work, so the destructor can wait for it.
  void end_call();

  CudaBackend& be_;
  int rank_ = 0, size_ = 1;
  ncclComm* comm_ = nullptr;
  std::atomic<bool> aborted_{false};
  CUstream_st* compute_ = nullptr;  // the backend's streams (not owned)
  CUstream_st* comm_stream_ = nullptr;
  CUevent_st* ready_ = nullptr;  // compute stream -> communication stream, per call
  CUevent_st* done_ = nullptr;   // communication stream -> compute stream / destructor
  bool blockwise_always_ = false;
};

}  // namespace switcht5
