// Switch feed-forward layer (Fedus et al. 2021): route -> dispatch -> experts -> combine.
//
// Legend: T tokens = G groups x S tokens per group, D d_model, E experts, C capacity per expert
// per group, GC = G*C rows per expert buffer. The routing math (jitter, logits, top-1, capacity,
// aux and z losses) is in model/router.h.
//   buf [E,GC,D]   = dispatch(x)                  (kept tokens only, zeros elsewhere)
//   y   [E,GC,D]   = expert_e(buf[e])             (FeedForward with count = E)
//   out [T,D]      = gate[t] * y[expert[t], slot[t]]; dropped tokens output 0 (the residual
//                    connection outside carries them)
//
// Memory: the buffers kept for backward (the experts' input and output, the experts' hidden
// activations) are sized for the training capacity. Evaluation uses eval_capacity_factor,
// usually larger (2.0 vs 1.25), but keeps nothing for backward, so it runs entirely in the
// caller's forward scratch (the model's shared scratch arena) and backward must follow a
// training forward. The kept buffers are in the compute dtype (model/activation_buffer.h); the
// router, dispatch and combine run in fp32 on fp32 copies in scratch.
//
// Expert parallelism over P processes (the expert group): each holds E / P experts and
// ExpertExchange moves every process's capacity buffers to the experts' owners and back, so
// every token meets the same expert weights and the same capacity as on one process.
// Tensor parallelism over M processes: each holds 1/M of every expert's d_ff, so y is a partial
// sum; the combine is linear in y, so the layer combines its partial y and sums the [T,D] output
// over the model group (Megatron's g), which is capacity_factor times less data than the padded
// [E,GC,D] buffer. In backward the gate gradient <dout, y> is likewise a partial sum ([T]
// floats), and the input gradient of the column-parallel wi is summed as [T,D] (f's backward).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/expert_exchange.h"
#include "model/feed_forward.h"
#include "model/params.h"
#include "model/router.h"
#include "model/tensor_parallel.h"

namespace switcht5 {

class Communicator;

struct SwitchShape {
  int T = 1;               // tokens per forward call
  int S = 1;               // tokens per routing group (T % S == 0)
  int D = 1, F = 1, E = 1;
  int capacity_train = 1;  // C while training
  int capacity_eval = 1;   // C in evaluation
  bool gated = false;
  bool jitter = false;                   // RouterShape::jitter
  bool force_balance = false;            // RouterShape::force_balance
  Communicator* expert_group = nullptr;  // null or size 1: every expert is local
  TensorParallel tp{};                   // no group: each expert's d_ff is whole (F = d_ff)
};

class SwitchFFN {
 public:
  // prefix: "...layer.1.mlp"; registers router.classifier.weight [E,D] and experts.* stacked
  // [E/expert_parallel, ...], the block of group rank expert_rank.
  static void register_params(ParamStore& ps, const std::string& prefix, int D, int F, int E,
                              bool gated, double init_scale, const Sharding& sharding = {});

  // Kept activations are held in ps.compute_dtype() as it is now.
  SwitchFFN(Backend& be, ParamStore& ps, const std::string& prefix, SwitchShape shape);

  // x [T,D] (fp32 or the compute dtype) must stay alive until backward; out [T,D]. Router jitter is keyed by `seed` and
  // indexed from `jitter_offset` (see Router::forward); expert dropout by (seed, dropout_salt).
  // The statistics live in the router (valid until the next forward), so the steady state
  // allocates nothing. scratch: forward_scratch_floats() floats of workspace, dead once forward
  // returns (the caller may reuse it); null: a buffer of the layer's own, allocated on first
  // use (standalone layers, tests). An evaluation forward (training = false) keeps nothing for
  // backward. Adds the router statistics to `stats` [router_stats_size(E)] in backend memory
  // (none when null): no host synchronisation.
  void forward_accumulate(float* out, ActivationView x, bool training, float jitter_eps,
                          float expert_dropout, RandomKey seed, uint64_t jitter_offset,
                          uint64_t dropout_salt, double* stats, float* scratch = nullptr);
  // forward_accumulate, then this call's statistics read back to the host (tests and tools).
  const RouterStats& forward(float* out, ActivationView x, bool training, float jitter_eps,
                      float expert_dropout, RandomKey seed, uint64_t jitter_offset = 0,
                      uint64_t dropout_salt = 0, float* scratch = nullptr);
  // dx [T,D] assigned. lb_scale / z_scale multiply this call's sum_g lb[g] and sum_t lse[t]^2
  // in the objective (e.g. aux_coef / total groups, z_coef / total tokens). The last forward
  // must have been a training one.
  void backward(float* dx, const float* dout, float lb_scale, float z_scale, float* scratch);
  int64_t scratch_floats() const;
  int64_t forward_scratch_floats() const;
  int64_t alltoall_bytes_sent() const { return exchange_.bytes_sent(); }
  // Whether the last forward's router logits hold a NaN or Inf.
  bool router_logits_nonfinite() const { return router_.logits_nonfinite(); }
  size_t activation_bytes() const {
    return router_.activation_bytes() + buf_.bytes() + y_.bytes() + experts_.activation_bytes() +
           own_scratch_.bytes();
  }

 private:
  Backend& be_;
  ParamStore& ps_;
  SwitchShape s_;
  Router router_;
  FeedForward experts_;
  ExpertExchange exchange_;
  int P_ = 1, E_local_ = 1;
  // Kept for backward, sized for the training capacity C_train:
  ActivationBuffer buf_;  // [E_loc, P*G*C_train, D] the experts' input: the dispatch buffer
                          // itself when P = 1, its exchange to the experts' owners when P > 1
  ActivationBuffer y_;    // [E, G*C_train, D] the experts' output, back at the tokens' slots
  DeviceArray<float> own_scratch_;  // forward workspace when the caller passes none
  bool kept_ = false;               // whether the last forward kept what backward needs
};

}  // namespace switcht5
