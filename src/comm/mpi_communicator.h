// MpiCommunicator: the Communicator over an MPI communicator, for host memory (the CPU backend).
// This header does not include <mpi.h>: only mpi_communicator.cpp (and main-level code) does.
//
// Every collective is built from point-to-point messages (MPI_Isend/MPI_Irecv, then one
// MPI_Waitall per round), which fixes the reduction order (see Communicator::all_reduce_sum)
// independently of the MPI library's choice of algorithm, and lets every message be a plain
// pointer + count. A collective moves at most max_chunk_bytes() per round, so each MPI count
// fits an int whatever n is, and the reduce-scatter receive buffer stays bounded:
//   all_reduce:     a round reduces L = max_chunk_bytes / sizeof(T) elements, cut into `size`
//                   blocks [L*q/size, L*(q+1)/size) of which rank q sums block q; scratch: L +
//                   size.
//   reduce_scatter: a round moves a piece of max(1, L / size) elements of every block;
//                   scratch: size * piece.
//   all_gather, all_to_all, broadcast: pieces of L elements; no scratch.
//
// With a watchdog attached (attach_watchdog), every public collective is one Watch, and a
// wait polls (MPI_Testall; MPI_Ibcast and MPI_Ibarrier for the blocking collectives) and calls
// Watchdog::poll between tests, so an expired deadline is acted on by this, the main, thread.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "comm/communicator.h"
#include "comm/watchdog.h"

namespace switcht5 {

namespace detail {
struct MpiState;  // the MPI_Comm and the reusable request/scratch buffers (mpi_communicator.cpp)
}

class MpiCommunicator final : public Communicator {
 public:
  static constexpr int64_t kDefaultMaxChunkBytes = int64_t{64} << 20;

  explicit MpiCommunicator(std::unique_ptr<detail::MpiState> state);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_reduce_sum(float* data, int64_t n) override;
  void all_reduce_sum(double* data, int64_t n) override;
  void all_reduce_sum(int64_t* data, int64_t n) override;
  void all_reduce_max(int64_t* data, int64_t n) override;
  void reduce_scatter_sum(float* out, const float* in, int64_t n) override;
  void all_gather(float* out, const float* in, int64_t n) override;
  void all_to_all(float* out, const float* in, int64_t n) override;
  void broadcast(float* data, int64_t n, int root) override;
  void broadcast(std::string& data, int root) override;
  void barrier() override;
  // The new communicator inherits max_chunk_bytes().
  std::unique_ptr<Communicator> split(int color, int key) const override;
  std::unique_ptr<Communicator> split_by_node() const override;  // inherits max_chunk_bytes()
  // The node communicator is labelled "node" (it is not one of the grid's groups).
  void attach_watchdog(Watchdog& watchdog, const std::string& group) override;

  // In place over blocks of any sizes, for the data plane (comm/data_plane.h): data is
  // [counts[0] + ... + counts[size-1]], block r starting after blocks 0..r-1.
  // reduce_scatter_sum_v: block rank() becomes the sum over ranks of that block, reduced in rank
  // order as all_reduce_sum; the other blocks are left as they were. A round moves a piece of
  // max(1, L / size) elements of every block; scratch: size * piece.
  // all_gather_v: block r becomes rank r's block on every rank; pieces of L elements.
  void reduce_scatter_sum_v(float* data, std::span<const int64_t> counts);
  void all_gather_v(float* data, std::span<const int64_t> counts);

  // Bytes one collective moves per round (see the file comment); clamped to [1, INT_MAX].
  // Results do not depend on it. Every rank must use the same value. Tests set it small to
  // exercise the chunked paths with small arrays.
  void set_max_chunk_bytes(int64_t bytes);
  int64_t max_chunk_bytes() const { return max_chunk_bytes_; }

  const detail::MpiState& mpi_state() const { return *state_; }  // see comm/mpi_native.h

 private:
  // In flight until destroyed; recorded in the group's trace (a no-op without a watchdog).
  Watchdog::Watch watch(CommCall c, ElementType t, int64_t count) const;
  // A new communicator over `comm` with this one's chunk size, watchdog and `group` label.
  std::unique_ptr<MpiCommunicator> derived(std::unique_ptr<detail::MpiState> st,
                                           const std::string& group) const;

  std::unique_ptr<detail::MpiState> state_;
  int rank_ = 0, size_ = 1;
  int64_t max_chunk_bytes_ = kDefaultMaxChunkBytes;
};

// Initialises MPI on the first call (MPI_Init_thread with MPI_THREAD_FUNNELED: only the main
// thread calls MPI, but for a watchdog's last-resort MPI_Abort, comm/watchdog.h) and registers
// MPI_Finalize to run at exit; returns a communicator over MPI_COMM_WORLD (a duplicate, so its
// messages never mix with other users of the world).
// A program not started by mpirun becomes a 1-rank MPI job (Open MPI singleton init). Only if
// MPI_Init_thread fails does it print a warning and return make_self_communicator().
std::unique_ptr<Communicator> mpi_world();

// Ends every rank of the job now with exit code `code`: MPI_Abort(MPI_COMM_WORLD) when the job
// has more than one rank (ranks blocked in a collective are killed too), a plain exit(code)
// otherwise. Flushes stdout and stderr first, so the caller's error message is not lost.
[[noreturn]] void abort_all_ranks(int code);

}  // namespace switcht5
