#include "model/router.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/check.h"
#include "core/rng.h"
#include "model/linear.h"
#include "model/scratch_arena.h"

namespace switcht5 {

int expert_capacity(const ModelConfig& model, int tokens_per_group, bool training) {
  if (model.expert_capacity > 0) return model.expert_capacity;
  SWT_CHECK(model.num_experts >= 1, "expert_capacity() of a model without experts (num_experts = {})",
            model.num_experts);
  SWT_CHECK(tokens_per_group >= 1, "tokens_per_group = {}", tokens_per_group);
  const double factor = training ? model.capacity_factor : model.eval_capacity_factor;
  const double exact = factor * tokens_per_group / model.num_experts;
  SWT_CHECK(exact < std::numeric_limits<int>::max(), "expert capacity {} overflows int", exact);
  // The 1e-9 keeps floating-point noise (1.1 * 100 / 10 = 11.000000000000002) from rounding an
  // exact capacity up by one.
  const int c = static_cast<int>(std::ceil(exact - 1e-9));
  return std::max(1, c);
}

void Router::register_params(ParamStore& ps, const std::string& prefix, int D, int E,
                             double init_scale) {
  ps.add({.name = prefix + ".router.classifier.weight", .shape = {E, D},
          .init_std = std::sqrt(init_scale / D)});
}

Router::Router(Backend& be, ParamStore& ps, const std::string& prefix, RouterShape s,
               TensorParallel tp)
    : be_(be), ps_(ps), s_(s), tp_(tp), weight_(&ps.info(prefix + ".router.classifier.weight")) {
  SWT_CHECK(s.T % s.S == 0, "tokens {} not a multiple of the group size {}", s.T, s.S);
  const int G = s.T / s.S;
  logits_ = DeviceArray<float>(be, int64_t(s.T) * s.E);
  probs_ = DeviceArray<float>(be, int64_t(s.T) * s.E);
  lse_ = DeviceArray<float>(be, s.T);
  gate_ = DeviceArray<float>(be, s.T);
  expert_ = DeviceArray<int32_t>(be, s.T);
  slot_ = DeviceArray<int32_t>(be, s.T);
  rows_ = DeviceArray<int32_t>(be, s.E);
  counts_ = DeviceArray<float>(be, int64_t(G) * s.E);
  balance_ = DeviceArray<float>(be, G);
  if (s.jitter) jittered_ = DeviceArray<float>(be, int64_t(s.T) * s.D);
}

void Router::forward(ActivationView x, const float* x_f32, bool training, float jitter_eps,
                     RandomKey seed, uint64_t jitter_offset) {
  const int T = s_.T, S = s_.S, D = s_.D, E = s_.E, G = T / S;
  C_ = training ? s_.capacity_train : s_.capacity_eval;
  jitter_eps_ = training ? jitter_eps : 0.0f;
  jitter_offset_ = jitter_offset;
  jitter_seed_ = seed.derive(1);
  xr_ = x;
  const float* xr = x_f32;
  if (jitter_eps_ > 0.0f) {
    if (jittered_.size() == 0) jittered_ = DeviceArray<float>(be_, int64_t(T) * D);
    be_.uniform_jitter(jittered_.data(), x_f32, int64_t(T) * D, jitter_eps_, jitter_seed_,
                       jitter_offset);
    xr_ = jittered_.data();
    xr = jittered_.data();
  }
  linear_forward(be_, logits_.data(), xr, ps_.master(*weight_), T, D, E);
  tp_.broadcast_from_first(logits_.data(), logits_.size());
  if (s_.force_balance) {
    // 1 * U(0.5, 1.5) per logit; the offset is the first token's global index times E, as the
    // jitter's is its first element's, so the draw does not depend on the layout.
    be_.fill(logits_.data(), 1.0f, logits_.size());
    be_.uniform_jitter(logits_.data(), logits_.data(), logits_.size(), 0.5f, seed.derive(3),
                       jitter_offset / uint64_t(D) * uint64_t(E));
  }
  be_.router_forward(probs_.data(), lse_.data(), expert_.data(), slot_.data(), rows_.data(),
                     gate_.data(), counts_.data(), logits_.data(), G, S, E, C_);
}

RouterStats decode_router_stats(const double* acc, int num_experts) {
  RouterStats st;
  st.balance_loss = acc[kRouterBalanceSum];
  st.z_loss = acc[kRouterZSum];
  st.tokens = static_cast<int64_t>(acc[kRouterTokens]);
  st.dropped = static_cast<int64_t>(acc[kRouterDropped]);
  st.expert_fraction.resize(num_experts);
  for (int e = 0; e < num_experts; ++e)
    st.expert_fraction[e] = acc[kRouterTokens] > 0 ? acc[kRouterStatsFixed + e] / acc[kRouterTokens] : 0.0;
  const double* confidence = acc + router_confidence_slot(num_experts);
  st.entropy = confidence[kRouterEntropySum];
  st.top1_prob = confidence[kRouterTop1Sum];
  st.top1_margin = confidence[kRouterMarginSum];
  return st;
}

void Router::accumulate_statistics(double* acc) {
  const int T = s_.T, S = s_.S, E = s_.E, G = T / S;
  be_.router_balance_loss(balance_.data(), probs_.data(), counts_.data(), G, S, E);
  be_.accumulate_router_statistics(acc, balance_.data(), lse_.data(), counts_.data(), G, S, E, C_);
  be_.accumulate_router_confidence(acc + router_confidence_slot(E), probs_.data(), logits_.data(),
                                   lse_.data(), T, E);
}

const RouterStats& Router::statistics() {
  const int64_t n = router_stats_size(s_.E);
  if (stats_acc_.size() == 0) stats_acc_ = DeviceArray<double>(be_, n);
  be_.zero_bytes(stats_acc_.data(), stats_acc_.bytes());
  accumulate_statistics(stats_acc_.data());
  host_stats_.resize(n);
  be_.copy_to_host(host_stats_.data(), stats_acc_.data(), stats_acc_.bytes());
  stats_ = decode_router_stats(host_stats_.data(), s_.E);
  return stats_;
}

int64_t Router::scratch_floats() const { return int64_t(s_.T) * s_.E + int64_t(s_.T) * s_.D; }

void Router::backward(float* dx, const float* dgate, float lb_scale, float z_scale,
                      float* scratch) {
  const int T = s_.T, S = s_.S, D = s_.D, E = s_.E, G = T / S;
  ScratchArena arena(scratch, scratch_floats(), "Router::backward scratch");
  float* dlogits = arena.take<float>(int64_t(T) * E);  // [T,E]
  float* dxr = arena.take<float>(int64_t(T) * D);      // [T,D]
  be_.router_backward(dlogits, probs_.data(), lse_.data(), expert_.data(), dgate, counts_.data(),
                      G, S, E, lb_scale, z_scale);
  // Forced balance: the logits were noise, not x Wr^T, so nothing flows back through them.
  if (s_.force_balance) be_.fill(dlogits, 0.0f, int64_t(T) * E);
  linear_backward_weight(be_, ps_, *weight_, dlogits, xr_, T, D, E);
  linear_backward_input(be_, dxr, dlogits, ps_.master(*weight_), T, D, E, false);
  // Jitter is linear in x: its backward is the same multiplication.
  if (jitter_eps_ > 0.0f)
    be_.uniform_jitter(dxr, dxr, int64_t(T) * D, jitter_eps_, jitter_seed_, jitter_offset_);
  be_.add(dx, dx, dxr, int64_t(T) * D);
}

bool Router::logits_nonfinite() const {
  return be_.count_nonfinite(logits_.data(), logits_.size()) > 0;
}

size_t Router::activation_bytes() const {
  return jittered_.bytes() + logits_.bytes() + probs_.bytes() + lse_.bytes() + gate_.bytes() +
         expert_.bytes() + slot_.bytes() + rows_.bytes() + counts_.bytes() + balance_.bytes();
}

}  // namespace switcht5
