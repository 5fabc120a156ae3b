#include "model/feed_forward.h"

#include <cmath>

#include "core/check.h"
#include "model/linear.h"
#include "model/scratch_arena.h"

namespace switcht5 {

void FeedForward::register_params(ParamStore& ps, const std::string& prefix, int count,
                                  bool stacked, int D, int F, bool gated, double init_scale,
                                  const ExpertShard* shard, int model_parallel, int model_rank) {
  const ParamKind kind = stacked ? ParamKind::kStacked : ParamKind::kMatrix;
  auto add = [&](const std::string& name, int64_t r, int64_t c, double std, int split_dim) {
    ParamInfo p{.name = prefix + name, .shape = {r, c}, .kind = kind, .init_std = std};
    if (stacked) p.shape.insert(p.shape.begin(), count);
    if (shard) {
      SWT_CHECK(stacked && shard->count == count, "expert shard of {} for {} experts", shard->count,
                count);
      p.full_shape = {shard->total, r, c};
      p.slice_start = {shard->first, 0, 0};
    }
    if (model_parallel > 1)
      split_over_model(p, split_dim + (stacked ? 1 : 0), model_parallel, model_rank);
    ps.add(std::move(p));
  };
  const double in_std = std::sqrt(init_scale / D), out_std = std::sqrt(init_scale / F);
  if (gated) {
    add(".wi_0.weight", F, D, in_std, 0);
    add(".wi_1.weight", F, D, in_std, 0);
  } else {
    add(".wi.weight", F, D, in_std, 0);
  }
  add(".wo.weight", D, F, out_std, 1);
}

FeedForward::FeedForward(Backend& be, ParamStore& ps, const std::string& prefix, int count,
                         int max_rows, int D, int F, bool gated)
    : be_(be), ps_(ps), count_(count), D_(D), F_(F), gated_(gated),
      wo_(&ps.info(prefix + ".wo.weight")), max_rows_(max_rows) {
  if (gated) {
    wi_ = &ps.info(prefix + ".wi_0.weight");
    wi1_ = &ps.info(prefix + ".wi_1.weight");
  } else {
    wi_ = &ps.info(prefix + ".wi.weight");
  }
  const int64_t n = int64_t(count) * max_rows * F;
  const DType dt = ps.compute_dtype();
  a_ = ActivationBuffer(be, dt, n);
  if (gated) b_ = ActivationBuffer(be, dt, n);
  h_ = ActivationBuffer(be, dt, n);
}

void FeedForward::forward(float* out, ActivationView x, int N, float dropout_p, RandomKey seed,
                          float* scratch, const int32_t* rows) {
  SWT_CHECK(N <= max_rows_, "FeedForward::forward of {} rows, sized for {}", N, max_rows_);
  x_ = x;
  N_ = N;
  rows_ = rows;
  dropout_p_ = dropout_p;
  seed_ = seed;
  if (!scratch && forward_scratch_floats() > 0) {
    if (own_scratch_.size() == 0) own_scratch_ = DeviceArray<float>(be_, forward_scratch_floats());
    scratch = own_scratch_.data();
  }
  ScratchArena arena(scratch, forward_scratch_floats(), "FeedForward::forward scratch");
  float* a = a_.f32_or(arena);                       // [count, N, F]
  float* b = gated_ ? b_.f32_or(arena) : nullptr;    // [count, N, F] (gated)
  float* h = h_.f32_or(a);  // bf16: in place of a, once a is stored
  forward_into(a, b, h, out, x, N, dropout_p, seed, /*keep=*/true, rows);
}

void FeedForward::forward_transient(float* out, ActivationView x, int N, float* scratch,
                                    const int32_t* rows) {
  x_ = ActivationView();
  rows_ = nullptr;
  ScratchArena arena(scratch, transient_floats(N), "FeedForward::forward_transient scratch");
  const int64_t n = int64_t(count_) * N * F_;
  float* a = arena.take<float>(n);                      // [count, N, F], then h in place
  float* b = gated_ ? arena.take<float>(n) : nullptr;   // [count, N, F] (gated)
  forward_into(a, b, /*h=*/a, out, x, N, 0.0f, 0, /*keep=*/false, rows);
}

void FeedForward::forward_into(float* a, float* b, float* h, float* out, ActivationView x, int N,
                               float dropout_p, RandomKey seed, bool keep, const int32_t* rows) {
  // With rows, a (and b) get zero rows past them, which relu / gated-gelu and dropout keep zero:
  // so h and out do too.
  const int64_t n = int64_t(count_) * N * F_;
  linear_forward(be_, a, x, ps_.weight(*wi_), N, D_, F_, count_, rows);
  if (keep) a_.store(be_, a, n);
  if (gated_) {
    linear_forward(be_, b, x, ps_.weight(*wi1_), N, D_, F_, count_, rows);
    if (keep) b_.store(be_, b, n);
    be_.gated_gelu_forward(h, a, b, n);
    if (dropout_p > 0.0f) be_.dropout(h, h, n, dropout_p, seed);
  } else {
    be_.relu_dropout_forward(h, a, n, dropout_p, seed);
  }
  store_activation(be_, ps_, h, n);  // bf16: the activation is stored as bf16 (GEMM input)
  if (keep) h_.store(be_, h, n);
  linear_forward(be_, out, keep ? h_.view() : ActivationView(h), ps_.weight(*wo_), N, F_, D_,
                 count_, rows);
}

void FeedForward::backward(float* dx, const float* dout, float* scratch) {
  SWT_CHECK(x_.data, "FeedForward::backward after forward_transient, which keeps nothing");
  const int N = N_;
  const int64_t n = int64_t(count_) * N * F_;
  ScratchArena arena(scratch, scratch_floats(), "FeedForward::backward scratch");
  float* dh = arena.take<float>(h_.size());  // [count, N, F]
  float* db = arena.take<float>(h_.size());  // [count, N, F] (gated)
  const float* a = a_.load(be_, arena, n);   // [count, N, F] in fp32
  // rows: dout's rows past them are zero (the caller's promise), and so are dh, da and db's.
  const int32_t* rows = rows_;
  linear_backward_weight(be_, ps_, *wo_, dout, h_.view(), N, F_, D_, count_, rows);
  linear_backward_input(be_, dh, dout, ps_.weight(*wo_), N, F_, D_, false, count_, rows);
  if (gated_) {
    if (dropout_p_ > 0.0f) be_.dropout(dh, dh, n, dropout_p_, seed_);
    const float* b = b_.load(be_, arena, n);
    // fp32: h_ is dead once dWo is formed, so da goes there; bf16: to scratch. db to scratch.
    float* da = h_.f32_or(arena);
    be_.gated_gelu_backward(da, db, dh, a, b, n);
    store_activation(be_, ps_, da, n);
    store_activation(be_, ps_, db, n);
    linear_backward_weight(be_, ps_, *wi_, da, x_, N, D_, F_, count_, rows);
    linear_backward_weight(be_, ps_, *wi1_, db, x_, N, D_, F_, count_, rows);
    linear_backward_input(be_, dx, da, ps_.weight(*wi_), N, D_, F_, false, count_, rows);
    linear_backward_input(be_, dx, db, ps_.weight(*wi1_), N, D_, F_, true, count_, rows);
  } else {
    be_.relu_dropout_backward(dh, dh, a, n, dropout_p_, seed_);
    linear_backward_weight(be_, ps_, *wi_, dh, x_, N, D_, F_, count_, rows);
    linear_backward_input(be_, dx, dh, ps_.weight(*wi_), N, D_, F_, false, count_, rows);
  }
}

}  // namespace switcht5
