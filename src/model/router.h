// The Switch router (Fedus et al. 2021, Sec. 2.1-2.2): which expert each token goes to, where in
// that expert's capacity buffer it lands, its gate value, and the router's auxiliary losses.
// Pure math on backend buffers; the layer around it (SwitchFFN) moves the tokens.
//
// Legend: T tokens = G groups x S tokens per group (token t = g*S + s), D d_model, E experts,
// C capacity (tokens per expert per group).
//   router input   xr = x * U(1 - eps, 1 + eps)     multiplicative jitter, training only; the
//                                                    noise is a counter-based function of the
//                                                    seed and the token's global index
//   logits [T,E]   = xr Wr^T                         float32 (HF router.classifier.weight [E,D])
//   probs  [T,E]   = softmax(logits);  lse[t] = logsumexp(logits[t,:])
//   expert [T]     = argmax_e probs (lowest index on ties);  gate[t] = probs[t, expert[t]]
//   position       = number of earlier tokens of the group with the same expert; the token is
//                    dropped (it skips the expert, slot -1) when position >= C
//   slot   [T]     = its row in the expert's buffer: the expert's kept tokens of earlier groups
//                    + position (kept tokens lead the buffer, group by group)
//   counts [G,E]   = tokens of group g whose top-1 is e, before dropping
//   rows   [E]     = expert e's kept tokens: rows [0, rows[e]) of its buffer hold tokens, the
//                    rest are empty (so its products may skip them)
// Auxiliary losses (flaxformer / HF definitions):
//   load balancing  lb = mean_g  E * sum_e f[g,e] * P[g,e]
//                   f[g,e] = counts[g,e] / S,  P[g,e] = mean over the group's tokens of probs[.,e]
//   router z-loss   z  = mean_t lse[t]^2
// The objective adds router_aux_loss_coef * lb + router_z_loss_coef * z per Switch layer.
//
// Capacity (tokens each expert accepts per routing group):
//   C = expert_capacity                                        if expert_capacity > 0
//   C = max(1, ceil(factor * tokens_per_group / num_experts))  otherwise,
// factor = capacity_factor when training, eval_capacity_factor when evaluating. Capacity is
// static, so every buffer downstream of the router has a static shape.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "config/config.h"
#include "model/activation_buffer.h"
#include "model/params.h"
#include "model/tensor_parallel.h"

namespace switcht5 {

// C for a routing group of `tokens_per_group` tokens (formula above).
int expert_capacity(const ModelConfig& model, int tokens_per_group, bool training);

// The router statistics a forward call adds to a statistics array in backend memory
// (Backend::accumulate_router_statistics): kRouterStatsFixed doubles, then one per expert, then
// (Backend::accumulate_router_confidence, at router_confidence_slot(E)) RouterConfidenceSlot.
// Every router call counts all of its tokens, padding included, as the losses do.
enum RouterStatsSlot : int {
  kRouterBalanceSum = 0,  // sum over calls of the call's load-balancing loss lb
  kRouterZSum = 1,        // sum over calls of the call's router z-loss
  kRouterCalls = 2,
  kRouterTokens = 3,      // routed tokens
  kRouterDropped = 4,     // tokens past capacity
  kRouterStatsFixed = 5,  // then [E]: tokens whose top-1 is each expert
};
enum RouterConfidenceSlot : int {
  kRouterEntropySum = 0,  // sum over calls of the call's mean router entropy (nats)
  kRouterTop1Sum = 1,     // ... of its mean top-1 probability
  kRouterMarginSum = 2,   // ... of its mean top-1 minus top-2 probability
  kRouterConfidenceSlots = 3,
};
inline int64_t router_confidence_slot(int num_experts) { return kRouterStatsFixed + num_experts; }
inline int64_t router_stats_size(int num_experts) {
  return router_confidence_slot(num_experts) + kRouterConfidenceSlots;
}

// Host-side routing statistics (of one forward call, or summed over several: then balance_loss
// and z_loss are sums over the calls).
struct RouterStats {
  double balance_loss = 0.0;     // lb, mean over groups
  double z_loss = 0.0;           // z, mean over tokens
  int64_t tokens = 0;
  int64_t dropped = 0;           // tokens past capacity
  std::vector<double> expert_fraction;  // [E] fraction of tokens whose top-1 is e
  double entropy = 0.0;          // mean router entropy (nats), top-1 probability and top-1 /
  double top1_prob = 0.0;        // top-2 margin over tokens (sums over calls, as the losses)
  double top1_margin = 0.0;
};

// RouterStats from a host copy of an accumulated statistics array (RouterStatsSlot).
RouterStats decode_router_stats(const double* acc, int num_experts);

struct RouterShape {
  int T = 1;               // tokens per forward call
  int S = 1;               // tokens per routing group (T % S == 0)
  int D = 1, E = 1;
  int capacity_train = 1;  // C while training
  int capacity_eval = 1;   // C in evaluation
  // Whether training forwards will jitter (the model: router_jitter_noise > 0): the jittered
  // copy is then allocated at construction, so that constructing a model allocates everything
  // its training steps hold (what `switcht5 plan` counts). Otherwise it is allocated on the
  // first jittered forward.
  bool jitter = false;
  // model.router_force_balance (benchmarks only): logits = uniform noise in [0.5, 1.5), keyed by
  // the seed and the token's global index, so each token's top-1 is uniform at random over the
  // experts; the weights still multiply x (the cost stays), and backward gives them and x no
  // gradient through the router (the logits do not depend on them).
  bool force_balance = false;
};

class Router {
 public:
  // Registers "<prefix>.router.classifier.weight" [E, D] (replicated on every rank).
  static void register_params(ParamStore& ps, const std::string& prefix, int D, int E,
                              double init_scale);

  Router(Backend& be, ParamStore& ps, const std::string& prefix, RouterShape shape,
         TensorParallel tp);

  // Routes x [T,D] (kept alive until backward; fp32 or the compute dtype), whose values x_f32
  // holds in fp32 (x itself when x is fp32; only read during the call). The router runs in fp32
  // (Switch's selective precision): x_f32 and the fp32 master weight. Jitter (eps > 0, training
  // only) is keyed by `seed` and indexed from `jitter_offset`, the index of x's first element in
  // the global batch's router input, so a token's noise does not depend on the layout.
  void forward(ActivationView x, const float* x_f32, bool training, float jitter_eps,
               RandomKey seed, uint64_t jitter_offset);
  // Backward of the last forward. dgate [T] = dJ/dgate (0 for dropped tokens); lb_scale /
  // z_scale multiply this call's sum_g lb[g] and sum_t lse[t]^2 in the objective. Accumulates
  // dJ/dWr into the parameter gradients and ADDS dJ/dx through the router to dx [T,D].
  // scratch: scratch_floats() floats.
  void backward(float* dx, const float* dgate, float lb_scale, float z_scale, float* scratch);
  int64_t scratch_floats() const;  // dlogits [T,E] + d(router input) [T,D]

  // Results of the last forward (backend memory).
  int capacity() const { return C_; }
  const int32_t* expert() const { return expert_.data(); }  // [T]
  const int32_t* slot() const { return slot_.data(); }      // [T]
  // [E]: expert e's kept tokens, the rows [0, rows[e]) of its buffer (Backend::router_forward)
  const int32_t* rows() const { return rows_.data(); }
  const float* gate() const { return gate_.data(); }        // [T]
  // Adds the last forward's statistics to acc [router_stats_size(E)] in backend memory
  // (RouterStatsSlot); no host synchronisation.
  void accumulate_statistics(double* acc);
  // lb, z, dropped tokens and expert fractions of the last forward, read back to the host (one
  // synchronisation: for tests and tools; training reads accumulated statistics once a step).
  const RouterStats& statistics();
  // Whether the last forward's logits hold a NaN or Inf.
  bool logits_nonfinite() const;
  size_t activation_bytes() const;

 private:
  Backend& be_;
  ParamStore& ps_;
  RouterShape s_;
  TensorParallel tp_;
  const ParamInfo* weight_;
  // Saved for backward.
  ActivationView xr_;            // router input (x itself, or jittered_)
  float jitter_eps_ = 0.0f;
  uint64_t jitter_offset_ = 0;
  RandomKey jitter_seed_;
  int C_ = 1;
  // All fp32 in every compute dtype: the router, its losses and statistics run in fp32 (Switch's
  // selective precision), and none of these values is a bf16 store.
  DeviceArray<float> jittered_;             // [T,D] (RouterShape::jitter)
  DeviceArray<float> logits_, probs_;       // [T,E]
  DeviceArray<float> lse_, gate_;           // [T]
  DeviceArray<int32_t> expert_, slot_;      // [T]
  DeviceArray<int32_t> rows_;               // [E]
  DeviceArray<float> counts_;               // [G,E]
  DeviceArray<float> balance_;              // [G]
  DeviceArray<double> stats_acc_;           // [router_stats_size(E)] for statistics()
  std::vector<double> host_stats_;
  RouterStats stats_;
};

}  // namespace switcht5
