#include "model/feed_forward.h"

#include <cmath>

#include "model/linear.h"

namespace switcht5 {

void FeedForward::register_params(ParamStore& ps, const std::string& prefix, int count,
                                  bool stacked, int D, int F, bool gated, double init_scale) {
  const ParamKind kind = stacked ? ParamKind::kStacked : ParamKind::kMatrix;
  auto shape = [&](int64_t r, int64_t c) {
    return stacked ? std::vector<int64_t>{count, r, c} : std::vector<int64_t>{r, c};
  };
  const double in_std = std::sqrt(init_scale / D), out_std = std::sqrt(init_scale / F);
  if (gated) {
    ps.add({.name = prefix + ".wi_0.weight", .shape = shape(F, D), .kind = kind, .init_std = in_std});
    ps.add({.name = prefix + ".wi_1.weight", .shape = shape(F, D), .kind = kind, .init_std = in_std});
  } else {
    ps.add({.name = prefix + ".wi.weight", .shape = shape(F, D), .kind = kind, .init_std = in_std});
  }
  ps.add({.name = prefix + ".wo.weight", .shape = shape(D, F), .kind = kind, .init_std = out_std});
}

FeedForward::FeedForward(Backend& be, ParamStore& ps, const std::string& prefix, int count,
                         int max_rows, int D, int F, bool gated)
    : be_(be), ps_(ps), count_(count), D_(D), F_(F), gated_(gated),
      wo_(&ps.info(prefix + ".wo.weight")) {
  if (gated) {
    wi_ = &ps.info(prefix + ".wi_0.weight");
    wi1_ = &ps.info(prefix + ".wi_1.weight");
  } else {
    wi_ = &ps.info(prefix + ".wi.weight");
  }
  const int64_t n = int64_t(count) * max_rows * F;
  a_ = DeviceArray<float>(be, n);
  if (gated) b_ = DeviceArray<float>(be, n);
  h_ = DeviceArray<float>(be, n);
}

void FeedForward::forward(float* out, const float* x, int N, float dropout_p, uint64_t seed) {
  x_ = x;
  N_ = N;
  dropout_p_ = dropout_p;
  seed_ = seed;
  const float* values = ps_.values();
  const int64_t n = int64_t(count_) * N * F_;
  linear_forward(be_, a_.data(), x, values + wi_->offset, N, D_, F_, count_);
  if (gated_) {
    linear_forward(be_, b_.data(), x, values + wi1_->offset, N, D_, F_, count_);
    be_.gated_gelu_forward(h_.data(), a_.data(), b_.data(), n);
  } else {
    be_.relu_forward(h_.data(), a_.data(), n);
  }
  if (dropout_p > 0.0f) be_.dropout(h_.data(), h_.data(), n, dropout_p, seed);
  linear_forward(be_, out, h_.data(), values + wo_->offset, N, F_, D_, count_);
}

void FeedForward::backward(float* dx, const float* dout, float* scratch) {
  const int N = N_;
  const int64_t n = int64_t(count_) * N * F_;
  const float* values = ps_.values();
  float* grads = ps_.grads();
  float* dh = scratch;       // [count, N, F]
  float* db = scratch + n;   // [count, N, F] (gated)
  linear_backward_weight(be_, grads + wo_->offset, dout, h_.data(), N, F_, D_, count_);
  linear_backward_input(be_, dh, dout, values + wo_->offset, N, F_, D_, false, count_);
  if (dropout_p_ > 0.0f) be_.dropout(dh, dh, n, dropout_p_, seed_);
  if (gated_) {
    // h_ is dead once dWo is formed, so da goes there; db goes to scratch.
    float* da = h_.data();
    be_.gated_gelu_backward(da, db, dh, a_.data(), b_.data(), n);
    linear_backward_weight(be_, grads + wi_->offset, da, x_, N, D_, F_, count_);
    linear_backward_weight(be_, grads + wi1_->offset, db, x_, N, D_, F_, count_);
    linear_backward_input(be_, dx, da, values + wi_->offset, N, D_, F_, false, count_);
    linear_backward_input(be_, dx, db, values + wi1_->offset, N, D_, F_, true, count_);
  } else {
    be_.relu_backward(dh, dh, a_.data(), n);
    linear_backward_weight(be_, grads + wi_->offset, dh, x_, N, D_, F_, count_);
    linear_backward_input(be_, dx, dh, values + wi_->offset, N, D_, F_, false, count_);
  }
}

}  // namespace switcht5
