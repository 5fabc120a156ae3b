// The two communication planes of a training run.
//
//   control plane  Communicator (comm/communicator.h) over host memory: scalars, flags, strings,
//                  statistics; everything the trainer decides on (skip a step, stop on a signal,
//                  which checkpoint to resume). Always MPI (or one process), never on a device.
//   data plane     DataPlane (this header) over backend memory: gradients, parameters,
//                  activations. parallel.data_plane picks the implementation: `mpi`
//                  (MpiDataPlane: host memory directly, device memory staged through the host;
//                  any backend) or `nccl` (NcclDataPlane, comm/nccl/nccl_data_plane.h: CUDA
//                  device memory, on a communication stream ordered with the backend's).
//
// Determinism contract, both planes: a sum is reduced in an order fixed by the layout (the
// group's size and the counts), never by timing, so a fixed layout gives bitwise the same
// results run to run. Another layout reduces in another order: training results then agree to
// 1e-5 relative, not bitwise (tests/mpi/test_parallel_equivalence.cpp). The MPI data plane
// gives more: element i is always ((x_0[i] + x_1[i]) + x_2[i]) + ... + x_{size-1}[i] (as
// Communicator::all_reduce_sum), whatever the buckets, chunks or which collective carries it,
// so bucketed and ZeRO-1 reductions are bitwise the plain all-reduce. The NCCL plane keeps the
// weaker contract only: NCCL picks a fixed algorithm and protocol per (topology, collective,
// byte count, NCCL_* environment), so a fixed layout, bucket size, machine, NCCL version and
// environment reduce in a fixed order, bitwise run to run; which order is NCCL's, not rank
// order (nccl_data_plane.h says why NCCL_ALGO / NCCL_PROTO are left to the user). Collectives
// that only copy (all_gather, all_to_all, broadcast) are exact on every plane.
//
// Ordering: the calls of one DataPlane run in issue order, as if on one stream. A call may
// return before it completes (NCCL: enqueued on the communication stream after the work the
// backend has issued so far); its buffers belong to the plane until synchronize() returns: the
// caller neither reads, writes nor frees them before (backend work on other memory may run
// meanwhile: that is the overlap). synchronize() orders every call so far before the backend
// work issued after it (NCCL: the compute stream waits for the communication stream, the host
// does not), so the backend, and the host through the backend's own waits (copy_to_host),
// then see the results. MpiDataPlane completes every call before returning, so there
// synchronize() only marks the point where an asynchronous plane would wait.
//
// Preconditions, as for Communicator: every rank of the group makes the same calls in the same
// order with the same counts and root; `out` and `in` never overlap.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace switcht5 {

class Backend;
class Communicator;

// The data plane's collectives, and what a plane has been asked to move: per kind, the calls
// and the payload in floats, the buffer one rank hands the call: n for all_reduce_sum and
// broadcast, the sum of the counts for reduce_scatter_sum and all_gather, size * n for
// all_to_all. The MPI and NCCL planes count (the local plane of one rank moves nothing and
// counts nothing); `switcht5 plan` predicts these numbers per step (train/memory_plan.h) and
// tests/mpi/test_plan_layouts.cpp holds the prediction to the counts.
enum class Collective { kAllReduce, kReduceScatter, kAllGather, kAllToAll, kBroadcast };
inline constexpr int kCollectiveKinds = 5;
const char* collective_name(Collective c);  // "all_reduce", "reduce_scatter", ...
struct PlaneTraffic {
  int64_t calls[kCollectiveKinds] = {};
  int64_t floats[kCollectiveKinds] = {};
};

class DataPlane {
 public:
  virtual ~DataPlane() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // data: [n] -> the sum over the ranks, on every rank.
  virtual void all_reduce_sum(float* data, int64_t n) = 0;
  // In place over blocks of any sizes: data is [counts[0] + ... + counts[size-1]], block r
  // starting at counts[0] + ... + counts[r-1]. On return block rank() holds the sum over the
  // ranks of that block; the other blocks keep this rank's input. (ZeRO-1: the gradient
  // region of a bucket, block r the part rank r updates; counts may be 0.)
  virtual void reduce_scatter_sum(float* data, std::span<const int64_t> counts) = 0;
  // In place, blocks as above: on return block r holds rank r's block, on every rank.
  virtual void all_gather(float* data, std::span<const int64_t> counts) = 0;
  // in: [size, n], block r goes to rank r; out: [size, n], block r came from rank r.
  virtual void all_to_all(float* out, const float* in, int64_t n) = 0;
  // data: [n]; on return every rank holds root's data.
  virtual void broadcast(float* data, int64_t n, int root) = 0;
  // Every call issued so far is ordered before the backend work issued from now on: the
  // backend (and the host, through the backend) may use its buffers. Not a host wait on NCCL.
  virtual void synchronize() = 0;
  // Abandons the calls in flight, for a watchdog that found one past its deadline (NCCL:
  // ncclCommAbort, which stops NCCL's kernels and host-side waits). May be called from another
  // thread while the issuing thread waits on the backend; afterwards every call throws Error
  // and destruction does not wait. The default does nothing: MpiDataPlane's calls are complete
  // when they return, and a rank stuck inside MPI is ended by abort_all_ranks.
  virtual void abort() {}

  const PlaneTraffic& traffic() const { return traffic_; }

 protected:
  void count(Collective c, int64_t floats) {
    ++traffic_.calls[int(c)];
    traffic_.floats[int(c)] += floats;
  }

 private:
  PlaneTraffic traffic_;
};

// The implementations parallel.data_plane names ("mpi", "nccl").
enum class DataPlaneKind { kMpi, kNccl };
// "mpi" or "nccl" (the config has validated it); Error otherwise.
DataPlaneKind data_plane_kind(const std::string& name);

// A data plane over the ranks of `group` (collective over it) for buffers in `be`'s memory.
// A group of one gives a plane whose collectives are copies (no MPI, no NCCL), whatever `kind`.
// Otherwise, kMpi: `group` must be an MpiCommunicator; the plane talks over its own duplicate
// of it, so that its messages never meet the control plane's even once they run
// asynchronously. kNccl: an NcclDataPlane, its communicator made over `group` (which carries
// the ncclUniqueId); UserError naming parallel.data_plane when this build has no NCCL or `be`
// is not the CUDA backend (checked for a group of one too, so a config fails the same way on
// any number of processes). `group` and `be` must outlive the plane.
std::unique_ptr<DataPlane> make_data_plane(const Communicator& group, Backend& be,
                                           DataPlaneKind kind = DataPlaneKind::kMpi);

// A Communicator whose float collectives take backend buffers and run on `plane`, while the
// host-typed ones (double and int64 sums, strings, barrier) run on `control`, the control
// plane over the same ranks. For code written against Communicator that hands it backend
// memory: the model's expert all-to-all and tensor-parallel sums, Adafactor's gather of
// model-split parameters. Through it they run on a device backend (staged, or later NCCL)
// without changing model code. The out-of-place reduce_scatter_sum and all_gather copy through
// `be` around the in-place plane calls (reduce_scatter_sum into scratch it keeps). split() is
// not supported: make a plane over the split communicator instead. `plane`, `control` and
// `be` must outlive it.
std::unique_ptr<Communicator> make_backend_communicator(DataPlane& plane, Communicator& control,
                                                        Backend& be);

}  // namespace switcht5
