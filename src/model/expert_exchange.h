// ExpertExchange: moves routed tokens between a process's capacity buffers and the processes
// that own the experts, over an expert-parallel group of P processes (Megatron-Core's
// all-to-all token dispatcher). Not to be confused with Backend::moe_dispatch, which scatters a
// process's tokens into its own [E, GC, D] capacity buffers: the exchange runs after it.
//
// Legend: E experts, P processes, E_loc = E / P local experts (group rank p holds experts
// [p*E_loc, (p+1)*E_loc)), GC rows per expert per process (groups x capacity), D features.
//   to_experts:   buf [E, GC, D] = [P, E_loc, GC, D]  --all_to_all-->  [P(source), E_loc, GC, D]
//             --permute-->  experts' input [E_loc, P*GC, D]
//   from_experts: the exact inverse: experts' output [E_loc, P*GC, D] -> [E, GC, D]
// Both are permutations of rows, so each is the other's transpose: the backward of to_experts
// is from_experts applied to the gradient, and vice versa. Static shapes (the paper's capacity
// buffers), no sums: the layout cannot change the values.
#pragma once
#include <cstdint>

#include "backend/backend.h"

namespace switcht5 {

class Communicator;

class ExpertExchange {
 public:
  // group: null or size 1 for no expert parallelism. max_rows_per_expert: the largest GC of a
  // call without `staging` (0 when every call passes its own).
  ExpertExchange(Backend& be, Communicator* group, int num_experts, int64_t max_rows_per_expert,
                   int D);
  int peers() const { return P_; }
  int local_experts() const { return E_local_; }
  // Bytes this process has sent to other processes so far (all_to_all blocks not addressed to
  // itself), for the communication report.
  int64_t bytes_sent() const { return bytes_sent_; }

  // out [E_loc, P*GC, D] <- buf [E, GC, D]. out must not alias buf. staging: [E, GC, D] floats
  // of workspace for the all_to_all (aliasing neither out nor buf), or null for the exchange's
  // own buffer. Unused when P = 1.
  void to_experts(float* out, const float* buf, int GC, float* staging = nullptr);
  // out [E, GC, D] <- y [E_loc, P*GC, D]. out must not alias y. staging as in to_experts.
  void from_experts(float* out, const float* y, int GC, float* staging = nullptr);

 private:
  float* staging_or_own(float* staging, int GC);

  Backend& be_;
  Communicator* group_;
  int P_, E_local_, D_;
  int64_t max_rows_per_expert_;
  DeviceArray<float> exchange_;  // [E, max GC, D], the staging of calls that pass none
  int64_t bytes_sent_ = 0;
};

}  // namespace switcht5
