// Tensor (Megatron-LM) model parallelism: the one place model code communicates over the model
// group (Shoeybi et al. 2019, Sec. 3). Attention heads and d_ff (of dense FFNs and of every
// expert) are split M ways; a column-parallel projection (q/k/v, wi) reads the full input and a
// row-parallel one (o, wo) produces a partial sum of the output. Megatron's two mappings:
//   f  (before a column-parallel layer): identity forward, sum over the group in backward
//   g  (after a row-parallel layer):     sum over the group in forward, identity in backward
// Both sums are all-reduces of an [N, D] activation (or its gradient) at the point where the
// partial sums exist, so the class offers them under the names of the mapping they implement.
// With no group (or a group of one) every call is a no-op and the math is the one-process math.
//
// Every model rank must make the same replicated decisions: the router's top-1 choice is taken
// from model rank 0's logits (broadcast_from_first), so a GEMM rounding difference between ranks
// (other thread count or instruction set) cannot route a near-tied token differently.
#pragma once
#include <cstdint>

namespace switcht5 {

class Communicator;

class TensorParallel {
 public:
  explicit TensorParallel(Communicator* model_group = nullptr) : group_(model_group) {}
  bool active() const;
  int size() const;  // M (1 without a group)
  Communicator* group() const { return group_; }

  // g forward: x [n] holds this rank's partial sum of a row-parallel layer's output; on return
  // every rank holds the sum over the group.
  void g_forward(float* x, int64_t n) const { sum_partials(x, n); }
  // f backward: dx [n] holds this rank's partial input gradient of a column-parallel layer (it
  // saw only its heads / d_ff columns); on return every rank holds the full gradient.
  void f_backward(float* dx, int64_t n) const { sum_partials(dx, n); }
  // Any other quantity that is linear in a row-parallel output (e.g. the Switch gate gradient
  // <dout, y>): x [n] partial -> the sum over the group on every rank.
  void sum_partials(float* x, int64_t n) const;
  // x [n] on every rank becomes model rank 0's x.
  void broadcast_from_first(float* x, int64_t n) const;

 private:
  Communicator* group_;
};

}  // namespace switcht5
