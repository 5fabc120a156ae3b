#include "model/switch_ffn.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"
#include "core/rng.h"
#include "comm/communicator.h"
#include "model/linear.h"

namespace switcht5 {

void SwitchFFN::register_params(ParamStore& ps, const std::string& prefix, int D, int F, int E,
                                bool gated, double init_scale, const Sharding& sh) {
  const int expert_parallel = sh.expert_parallel, expert_rank = sh.expert_rank;
  SWT_CHECK(E % expert_parallel == 0, "{} experts over {} processes", E, expert_parallel);
  ps.add({.name = prefix + ".router.classifier.weight", .shape = {E, D},
          .init_std = std::sqrt(init_scale / D)});
  const int local = E / expert_parallel;
  const ExpertShard shard{E, expert_rank * local, local};
  FeedForward::register_params(ps, prefix + ".experts", local, /*stacked=*/true, D, F, gated,
                               init_scale, &shard, sh.model_parallel, sh.model_rank);
}

namespace {
int group_size_of(const Communicator* c) { return c ? c->size() : 1; }
}  // namespace

SwitchFFN::SwitchFFN(Backend& be, ParamStore& ps, const std::string& prefix, SwitchShape s)
    : be_(be), ps_(ps), s_(s), router_(&ps.info(prefix + ".router.classifier.weight")),
      experts_(be, ps, prefix + ".experts", s.E / group_size_of(s.expert_group),
               group_size_of(s.expert_group) * (s.T / s.S) *
                   std::max(s.capacity_train, s.capacity_eval),
               s.D, s.F, s.gated),
      dispatcher_(be, s.expert_group, s.E,
                  int64_t(s.T / s.S) * std::max(s.capacity_train, s.capacity_eval), s.D),
      P_(dispatcher_.peers()), E_local_(dispatcher_.local_experts()) {
  SWT_CHECK(s.E % P_ == 0, "{} experts over an expert group of {}", s.E, P_);
  SWT_CHECK(s.T % s.S == 0, "tokens {} not a multiple of the group size {}", s.T, s.S);
  const int G = s.T / s.S;
  const int64_t rows = int64_t(G) * std::max(s.capacity_train, s.capacity_eval);
  logits_ = DeviceArray<float>(be, int64_t(s.T) * s.E);
  probs_ = DeviceArray<float>(be, int64_t(s.T) * s.E);
  lse_ = DeviceArray<float>(be, s.T);
  gate_ = DeviceArray<float>(be, s.T);
  expert_ = DeviceArray<int32_t>(be, s.T);
  slot_ = DeviceArray<int32_t>(be, s.T);
  counts_ = DeviceArray<float>(be, int64_t(G) * s.E);
  balance_ = DeviceArray<float>(be, G);
  buf_ = DeviceArray<float>(be, int64_t(s.E) * rows * s.D);
  y_ = DeviceArray<float>(be, buf_.size());
  if (P_ > 1) {
    ep_in_ = DeviceArray<float>(be, buf_.size());
    ep_out_ = DeviceArray<float>(be, buf_.size());
  }
}

int64_t SwitchFFN::scratch_floats() const {
  // dbuf [E,GC,D] + dgate [T] + dlogits [T,E] + dxr [T,D] + expert FFN scratch + dx_buf [E,GC,D]
  // (+ two exchange buffers of the same size under expert parallelism)
  return (P_ > 1 ? 4 : 2) * buf_.size() + s_.T + logits_.size() + int64_t(s_.T) * s_.D +
         experts_.scratch_floats();
}

const RouterStats& SwitchFFN::forward(float* out, const float* x, bool training,
                                      float jitter_eps, float expert_dropout, uint64_t seed,
                                      uint64_t jitter_offset, uint64_t dropout_salt) {
  const int T = s_.T, S = s_.S, D = s_.D, E = s_.E, G = T / S;
  const int C = training ? s_.capacity_train : s_.capacity_eval;
  x_ = x;
  seed_ = seed;
  C_ = C;
  jitter_eps_ = training ? jitter_eps : 0.0f;
  jitter_offset_ = jitter_offset;
  xr_ = x;
  if (jitter_eps_ > 0.0f) {
    if (jittered_.size() == 0) jittered_ = DeviceArray<float>(be_, int64_t(T) * D);
    be_.uniform_jitter(jittered_.data(), x, int64_t(T) * D, jitter_eps_, derive_seed(seed, 1),
                       jitter_offset);
    xr_ = jittered_.data();
  }
  linear_forward(be_, logits_.data(), xr_, ps_.values() + router_->offset, T, D, E);
  // Every model rank must route identically (each sums its share of the same experts' outputs):
  // take model rank 0's logits, so that a GEMM rounding difference (other thread count or
  // instruction set) cannot send a near-tied token to different experts on different ranks.
  if (s_.model_group && s_.model_group->size() > 1)
    s_.model_group->broadcast(logits_.data(), logits_.size(), 0);
  be_.router_forward(probs_.data(), lse_.data(), expert_.data(), slot_.data(), gate_.data(),
                     counts_.data(), logits_.data(), G, S, E, C);
  const int GC = G * C;
  be_.moe_dispatch(buf_.data(), x, expert_.data(), slot_.data(), T, D, E, GC);
  const float drop = training ? expert_dropout : 0.0f;
  const uint64_t drop_seed = derive_seed(derive_seed(seed, 2), dropout_salt);
  if (P_ == 1) {
    experts_.forward(y_.data(), buf_.data(), GC, drop, drop_seed);
  } else {
    dispatcher_.dispatch(ep_in_.data(), buf_.data(), GC);
    experts_.forward(ep_out_.data(), ep_in_.data(), P_ * GC, drop, drop_seed);
    dispatcher_.combine(y_.data(), ep_out_.data(), GC);
  }
  // Each model rank computed its d_ff share of every expert: sum the partial outputs.
  if (s_.model_group && s_.model_group->size() > 1)
    s_.model_group->all_reduce_sum(y_.data(), int64_t(E) * GC * D);
  be_.moe_combine(out, y_.data(), gate_.data(), expert_.data(), slot_.data(), T, D, GC);

  // Statistics: small [G,E] and [G] reductions on the host.
  RouterStats& st = stats_;
  st.dropped = 0;
  be_.router_balance_loss(balance_.data(), probs_.data(), counts_.data(), G, S, E);
  st.balance_loss = be_.sum(balance_.data(), G) / G;
  st.z_loss = be_.sum_squares(lse_.data(), T) / T;
  st.tokens = T;
  std::vector<float>& counts = host_counts_;
  counts.resize(static_cast<size_t>(G) * E);
  be_.copy_to_host(counts.data(), counts_.data(), sizeof(float) * counts.size());
  st.expert_fraction.assign(E, 0.0);
  for (int g = 0; g < G; ++g)
    for (int e = 0; e < E; ++e) {
      const double c = counts[size_t(g) * E + e];
      st.expert_fraction[e] += c / T;
      st.dropped += static_cast<int64_t>(std::max(0.0, c - C));
    }
  return st;
}

void SwitchFFN::backward(float* dx, const float* dout, float lb_scale, float z_scale,
                         float* scratch) {
  const int T = s_.T, S = s_.S, D = s_.D, E = s_.E, G = T / S, GC = G * C_;
  float* dbuf = scratch;
  float* dx_buf = dbuf + buf_.size();
  float* dgate = dx_buf + buf_.size();
  float* dlogits = dgate + T;
  float* dxr = dlogits + logits_.size();
  float* ffn_scratch = dxr + int64_t(T) * D;

  // Combine: out[t] = gate[t] * y[e,r].
  be_.moe_combine_backward(dbuf, dgate, dout, y_.data(), gate_.data(), expert_.data(),
                           slot_.data(), T, D, E, GC);
  if (P_ == 1) {
    experts_.backward(dx_buf, dbuf, ffn_scratch);
  } else {
    // dispatch and combine are mutual transposes: gradients go through the other one.
    float* ex_a = ffn_scratch + experts_.scratch_floats();
    float* ex_b = ex_a + buf_.size();
    dispatcher_.dispatch(ex_a, dbuf, GC);
    experts_.backward(ex_b, ex_a, ffn_scratch);
    dispatcher_.combine(dx_buf, ex_b, GC);
  }
  if (s_.model_group && s_.model_group->size() > 1)
    s_.model_group->all_reduce_sum(dx_buf, int64_t(E) * GC * D);
  be_.moe_dispatch_backward(dx, dx_buf, expert_.data(), slot_.data(), T, D, GC);
  // Router: gate, load-balancing and z-loss terms, then logits = xr Wr^T.
  be_.router_backward(dlogits, probs_.data(), lse_.data(), expert_.data(), dgate, counts_.data(),
                      G, S, E, lb_scale, z_scale);
  linear_backward_weight(be_, ps_.grads() + router_->offset, dlogits, xr_, T, D, E);
  linear_backward_input(be_, dxr, dlogits, ps_.values() + router_->offset, T, D, E, false);
  if (jitter_eps_ > 0.0f)
    be_.uniform_jitter(dxr, dxr, int64_t(T) * D, jitter_eps_, derive_seed(seed_, 1),
                       jitter_offset_);
  be_.add(dx, dx, dxr, int64_t(T) * D);
}

}  // namespace switcht5
