// Communicator: the control plane (comm/data_plane.h has both planes and their determinism
// contract): collectives over host memory for what the trainer decides on (token counts,
// statistics, the skip and stop flags, strings). Backend buffers (gradients, parameters,
// activations) go through a DataPlane; code written against this interface that hands it
// backend buffers (model code: expert all-to-all, tensor-parallel sums) gets a Communicator
// whose float collectives run on a data plane (make_backend_communicator). Model code includes
// only this header, never <mpi.h> (STYLE habit 3); the communicator is passed in, never read
// from a global (habit 4).
//
// Determinism: sums are reduced in the fixed order below, so a fixed layout gives bitwise the
// same results run to run, whatever the timing or chunking.
//
// Preconditions shared by every collective: all ranks of the communicator call it in the same
// order with the same counts (n) and the same root; `out` and `in` never overlap. A violation is
// reported as an Error where the implementation can see it (e.g. a truncated message) and
// otherwise hangs, as with MPI.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

namespace switcht5 {

class Watchdog;  // comm/watchdog.h

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // Sum over the ranks, in place. Every rank gets bitwise the same result, and the result does
  // not depend on timing, message sizes or chunking: element i is always reduced as
  //   ((x_0[i] + x_1[i]) + x_2[i]) + ... + x_{size-1}[i]     (x_r = rank r's input)
  // by exactly one rank and then copied to the others (a reduce-scatter of fixed blocks
  // followed by an all-gather).
  virtual void all_reduce_sum(float* data, int64_t n) = 0;
  virtual void all_reduce_sum(double* data, int64_t n) = 0;
  virtual void all_reduce_sum(int64_t* data, int64_t n) = 0;
  virtual void all_reduce_max(int64_t* data, int64_t n) = 0;

  // in: [size, n]; out: [n]. Rank r receives the sum over ranks of block r, reduced in rank
  // order as all_reduce_sum is.
  virtual void reduce_scatter_sum(float* out, const float* in, int64_t n) = 0;
  // in: [n]; out: [size, n]. Block r of out is rank r's `in`.
  virtual void all_gather(float* out, const float* in, int64_t n) = 0;
  // in: [size, n], block r goes to rank r; out: [size, n], block r came from rank r.
  virtual void all_to_all(float* out, const float* in, int64_t n) = 0;

  // data: [n]; on return every rank holds root's data.
  virtual void broadcast(float* data, int64_t n, int root) = 0;
  // Every rank gets root's string (any length; e.g. a resolved config or an error message).
  virtual void broadcast(std::string& data, int root) = 0;
  virtual void barrier() = 0;

  // A communicator over the ranks that passed the same color (>= 0), ranked by key, ties broken
  // by rank in this communicator (MPI_Comm_split semantics). Collective over this communicator.
  virtual std::unique_ptr<Communicator> split(int color, int key) const = 0;
  // A communicator over the ranks of this one that share its node (a shared-memory domain:
  // MPI_Comm_split_type with MPI_COMM_TYPE_SHARED), ranked as in this one. Collective. The
  // default, for communicators that are not MPI's, puts every rank on a node of its own.
  virtual std::unique_ptr<Communicator> split_by_node() const { return split(rank(), 0); }

  // From now on every collective of this communicator, and of the communicators split from it
  // (which inherit both), has a deadline and is recorded in the trace of `group` ("data",
  // "expert", ...; comm/watchdog.h); `watchdog` must outlive them. Communicators that cannot
  // wait on another process (one process) ignore it.
  virtual void attach_watchdog(Watchdog& watchdog, const std::string& group) {}
};

// One process: rank 0 of 1; collectives are copies. For single-process runs and tests.
std::unique_ptr<Communicator> make_self_communicator();

}  // namespace switcht5
