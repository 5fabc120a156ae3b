// Switch feed-forward layer (Fedus et al. 2021): route -> dispatch -> experts -> combine.
//
// Legend: T tokens = G groups x S tokens per group, D d_model, E experts, C capacity per expert
// per group, GC = G*C rows per expert buffer.
//   router input   xr = x * U(1-eps, 1+eps)       (training only, for the router alone)
//   logits [T,E]   = xr Wr^T                      (float32, HF router.classifier.weight [E,D])
//   probs, top-1 expert, gate = probs[t, expert], slot (position < C or dropped) per group
//   buf [E,GC,D]   = dispatch(x)                  (kept tokens only, zeros elsewhere)
//   y   [E,GC,D]   = expert_e(buf[e])             (FeedForward with count = E)
//   out [T,D]      = gate[t] * y[expert[t], slot[t]]; dropped tokens output 0 (the residual
//                    connection outside carries them)
// Auxiliary losses (flaxformer / HF definitions):
//   load balancing  lb = mean_g  E * sum_e f[g,e] * P[g,e]
//                   (f: fraction of the group's tokens whose top-1 is e, before dropping;
//                    P: the group's mean router probability for e)
//   router z-loss   z  = mean_t logsumexp(logits[t,:])^2
// The objective adds router_aux_loss_coef * lb + router_z_loss_coef * z for every Switch layer.
//
// Expert parallelism over P processes (the expert group): each holds E / P experts and
// ExpertDispatcher moves every process's routed tokens to the experts' owners and back, so every
// token meets the same expert weights and the same capacity as on one process.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/expert_dispatcher.h"
#include "model/feed_forward.h"
#include "model/params.h"

namespace switcht5 {

class Communicator;

struct SwitchShape {
  int T = 1;               // tokens per forward call
  int S = 1;               // tokens per routing group (T % S == 0)
  int D = 1, F = 1, E = 1;
  int capacity_train = 1;  // C while training
  int capacity_eval = 1;   // C in evaluation
  bool gated = false;
  Communicator* expert_group = nullptr;  // null or size 1: every expert is local
  Communicator* model_group = nullptr;   // null or size 1: each expert's d_ff is whole (F = d_ff)
};

// Host-side routing statistics of one forward call.
struct RouterStats {
  double balance_loss = 0.0;     // lb, mean over groups
  double z_loss = 0.0;           // z, mean over tokens
  int64_t tokens = 0;
  int64_t dropped = 0;           // tokens past capacity
  std::vector<double> expert_fraction;  // [E] fraction of tokens whose top-1 is e
};

class SwitchFFN {
 public:
  // prefix: "...layer.1.mlp"; registers router.classifier.weight [E,D] and experts.* stacked
  // [E/expert_parallel, ...], the block of group rank expert_rank.
  static void register_params(ParamStore& ps, const std::string& prefix, int D, int F, int E,
                              bool gated, double init_scale, const Sharding& sharding = {});

  SwitchFFN(Backend& be, ParamStore& ps, const std::string& prefix, SwitchShape shape);

  // x [T,D] must stay alive until backward; out [T,D]. Router jitter is keyed by `seed` and
  // indexed from `jitter_offset` (the index of x's first element in the global batch's router
  // input, so the noise does not depend on the layout); expert dropout by (seed, dropout_salt).
  // The statistics live in this layer
  // (valid until the next forward), so the steady state allocates nothing.
  const RouterStats& forward(float* out, const float* x, bool training, float jitter_eps,
                      float expert_dropout, uint64_t seed, uint64_t jitter_offset = 0,
                      uint64_t dropout_salt = 0);
  // dx [T,D] assigned. lb_scale / z_scale multiply this call's sum_g lb[g] and sum_t lse[t]^2
  // in the objective (e.g. aux_coef / total groups, z_coef / total tokens).
  void backward(float* dx, const float* dout, float lb_scale, float z_scale, float* scratch);
  int64_t scratch_floats() const;
  int64_t alltoall_bytes_sent() const { return dispatcher_.bytes_sent(); }
  // Whether the last forward's router logits hold a NaN or Inf.
  bool router_logits_nonfinite() const {
    return be_.count_nonfinite(logits_.data(), logits_.size()) > 0;
  }
  int64_t activation_floats() const {
    return jittered_.size() + logits_.size() + probs_.size() + lse_.size() + gate_.size() +
           expert_.size() + slot_.size() + counts_.size() + balance_.size() + buf_.size() +
           y_.size() + experts_.activation_floats();
  }

 private:
  Backend& be_;
  ParamStore& ps_;
  SwitchShape s_;
  const ParamInfo* router_;
  FeedForward experts_;
  // Saved for backward.
  const float* x_ = nullptr;
  const float* xr_ = nullptr;    // router input (x itself, or jittered_)
  float jitter_eps_ = 0.0f;
  uint64_t jitter_offset_ = 0;
  uint64_t seed_ = 0;
  int C_ = 1;
  DeviceArray<float> jittered_;  // [T,D]
  DeviceArray<float> logits_, probs_;       // [T,E]
  DeviceArray<float> lse_, gate_;           // [T]
  DeviceArray<int32_t> expert_, slot_;      // [T]
  DeviceArray<float> counts_;               // [G,E]
  DeviceArray<float> balance_;              // [G]
  DeviceArray<float> buf_, y_;              // [E, G*C_max, D]
  ExpertDispatcher dispatcher_;
  DeviceArray<float> ep_in_, ep_out_;       // [E_loc, P*G*C_max, D] (expert parallel only)
  int P_ = 1, E_local_ = 1;
  std::vector<float> host_counts_;          // [G,E] host copy of counts_ for the statistics
  RouterStats stats_;
};

}  // namespace switcht5
