#include "model/switch_ffn.h"

#include <algorithm>

#include "core/check.h"
#include "core/rng.h"
#include "comm/communicator.h"
#include "model/linear.h"
#include "model/scratch_arena.h"

namespace switcht5 {

void SwitchFFN::register_params(ParamStore& ps, const std::string& prefix, int D, int F, int E,
                                bool gated, double init_scale, const Sharding& sh) {
  const int expert_parallel = sh.expert_parallel, expert_rank = sh.expert_rank;
  SWT_CHECK(E % expert_parallel == 0, "{} experts over {} processes", E, expert_parallel);
  Router::register_params(ps, prefix, D, E, init_scale);
  const int local = E / expert_parallel;
  const ExpertShard shard{E, expert_rank * local, local};
  FeedForward::register_params(ps, prefix + ".experts", local, /*stacked=*/true, D, F, gated,
                               init_scale, &shard, sh.model_parallel, sh.model_rank);
}

namespace {
int group_size_of(const Communicator* c) { return c ? c->size() : 1; }
}  // namespace

SwitchFFN::SwitchFFN(Backend& be, ParamStore& ps, const std::string& prefix, SwitchShape s)
    : be_(be), ps_(ps), s_(s),
      router_(be, ps, prefix, RouterShape{s.T, s.S, s.D, s.E, s.capacity_train, s.capacity_eval,
                                     s.jitter, s.force_balance},
              s.tp),
      experts_(be, ps, prefix + ".experts", s.E / group_size_of(s.expert_group),
               group_size_of(s.expert_group) * (s.T / s.S) * s.capacity_train, s.D, s.F, s.gated),
      exchange_(be, s.expert_group, s.E, /*max_rows_per_expert=*/0, s.D),  // staging: scratch
      P_(exchange_.peers()), E_local_(exchange_.local_experts()) {
  SWT_CHECK(s.E % P_ == 0, "{} experts over an expert group of {}", s.E, P_);
  SWT_CHECK(s.T % s.S == 0, "tokens {} not a multiple of the group size {}", s.T, s.S);
  const int G = s.T / s.S;
  const DType dt = ps.compute_dtype();
  buf_ = ActivationBuffer(be, dt, int64_t(s.E) * G * s.capacity_train * s.D);
  y_ = ActivationBuffer(be, dt, buf_.size());
}

int64_t SwitchFFN::scratch_floats() const {
  // dbuf [E,GC,D] + dx_buf [E,GC,D] + dgate [T] + router scratch + expert FFN scratch
  // (+ bf16: y in fp32 [E,GC,D]) (+ two exchange buffers of [E,GC,D] under expert parallelism)
  return (P_ > 1 ? 4 : 2) * buf_.size() + s_.T + router_.scratch_floats() +
         experts_.scratch_floats() + y_.staging_floats();
}

int64_t SwitchFFN::forward_scratch_floats() const {
  const int G = s_.T / s_.S;
  const int64_t n_eval = int64_t(s_.E) * G * s_.capacity_eval * s_.D;
  // bf16: x in fp32 [T,D] for the router and the dispatch.
  const int64_t x_staging = buf_.is_f32() ? 0 : int64_t(s_.T) * s_.D;
  // Training, P > 1: the dispatch buffer and the experts' output [E,GC,D]; bf16: the experts'
  // input and output in fp32 [E,GC,D] and the experts' forward staging.
  const int64_t train = (P_ > 1 ? 2 * buf_.size() : 0) + buf_.staging_floats() +
                        y_.staging_floats() + experts_.forward_scratch_floats() + x_staging;
  // Evaluation: dispatch buffer and y (+ the experts' input and output when P > 1) [E,GC,D],
  // and the experts' transient activations.
  const int64_t eval = (P_ > 1 ? 4 : 2) * n_eval +
                       experts_.transient_floats(P_ * G * s_.capacity_eval) + x_staging;
  return std::max(train, eval);
}

const RouterStats& SwitchFFN::forward(float* out, ActivationView x, bool training,
                                      float jitter_eps, float expert_dropout, RandomKey seed,
                                      uint64_t jitter_offset, uint64_t dropout_salt,
                                      float* scratch) {
  forward_accumulate(out, x, training, jitter_eps, expert_dropout, seed, jitter_offset,
                     dropout_salt, nullptr, scratch);
  return router_.statistics();
}

void SwitchFFN::forward_accumulate(float* out, ActivationView x, bool training,
                                   float jitter_eps, float expert_dropout, RandomKey seed,
                                   uint64_t jitter_offset, uint64_t dropout_salt, double* stats,
                                   float* scratch) {
  const int T = s_.T, S = s_.S, D = s_.D, E = s_.E, G = T / S;
  // Training on one process in fp32 needs no workspace.
  if (!scratch && (P_ > 1 || !training || !buf_.is_f32())) {
    if (own_scratch_.size() == 0) own_scratch_ = DeviceArray<float>(be_, forward_scratch_floats());
    scratch = own_scratch_.data();
  }
  ScratchArena arena(scratch, scratch ? forward_scratch_floats() : 0,
                     "SwitchFFN::forward scratch");
  const float* x_f32 = load_f32(be_, x, int64_t(T) * D, arena);  // [T,D]
  router_.forward(x, x_f32, training, jitter_eps, seed, jitter_offset);
  const int GC = G * router_.capacity();
  // Where each stage lives: training keeps the experts' input (buf_) and output (y_), computed in
  // fp32 in place (fp32) or in scratch (bf16); under expert parallelism the dispatch buffer and
  // the experts' process-local output are transient. Evaluation keeps nothing: every buffer is
  // in scratch, at the evaluation capacity.
  const int64_t n = int64_t(E) * GC * D;  // one capacity buffer [E,GC,D] = [E_loc,P*GC,D]
  float *dispatched, *expert_in, *expert_out, *y, *ffn_scratch;
  if (training) {
    expert_in = buf_.f32_or(arena);
    y = y_.f32_or(arena);
    dispatched = P_ == 1 ? expert_in : arena.take<float>(n);
    expert_out = P_ == 1 ? y : arena.take<float>(n);
    ffn_scratch = arena.take<float>(experts_.forward_scratch_floats());
  } else {
    dispatched = arena.take<float>(n);
    y = arena.take<float>(n);
    expert_in = P_ == 1 ? dispatched : arena.take<float>(n);
    expert_out = P_ == 1 ? y : arena.take<float>(n);
    ffn_scratch = arena.take<float>(experts_.transient_floats(P_ * GC));
  }
  kept_ = training;
  be_.moe_dispatch(dispatched, x_f32, router_.expert(), router_.slot(), T, D, E, GC);
  // The exchanges' staging: y before it is written, and the dispatch buffer once it is dead.
  if (P_ > 1) exchange_.to_experts(expert_in, dispatched, GC, /*staging=*/y);
  // On one process each expert's kept tokens lead its buffer (Router::rows()), so its products
  // may skip the empty rows; the owner's buffer under expert parallelism holds P processes'
  // blocks, each packed, and is taken whole.
  const int32_t* rows = P_ == 1 ? router_.rows() : nullptr;
  if (training) {
    buf_.store(be_, expert_in);  // rows of x (bf16 values) and zeros
    const RandomKey drop_seed = seed.derive(2).derive(dropout_salt);
    experts_.forward(expert_out, buf_.view(), P_ * GC, expert_dropout, drop_seed, ffn_scratch,
                     rows);
  } else {
    experts_.forward_transient(expert_out, expert_in, P_ * GC, ffn_scratch, rows);
  }
  if (P_ > 1) exchange_.from_experts(y, expert_out, GC, /*staging=*/dispatched);
  if (training) y_.store(be_, y);  // the experts' output GEMM rounded it to bf16
  // y is this model rank's partial sum over its d_ff share; the combine is linear in y.
  be_.moe_combine(out, y, router_.gate(), router_.expert(), router_.slot(), T, D, GC);
  s_.tp.g_forward(out, int64_t(T) * D);
  store_activation(be_, ps_, out, int64_t(T) * D);
  if (stats) router_.accumulate_statistics(stats);
}

void SwitchFFN::backward(float* dx, const float* dout, float lb_scale, float z_scale,
                         float* scratch) {
  SWT_CHECK(kept_, "SwitchFFN::backward after an evaluation forward, which keeps nothing for "
            "backward");
  const int T = s_.T, S = s_.S, D = s_.D, E = s_.E, G = T / S, GC = G * router_.capacity();
  ScratchArena arena(scratch, scratch_floats(), "SwitchFFN::backward scratch");
  float* dbuf = arena.take<float>(buf_.size());    // [E,GC,D]
  float* dx_buf = arena.take<float>(buf_.size());  // [E,GC,D]
  float* dgate = arena.take<float>(T);             // [T]
  float* router_scratch = arena.take<float>(router_.scratch_floats());
  float* ffn_scratch = arena.take<float>(experts_.scratch_floats());
  const float* y = y_.load(be_, arena);            // [E,GC,D] in fp32

  // Combine: out[t] = gate[t] * y[e,r]. dbuf needs only the gate; dgate = <dout, y> is a
  // partial sum like y.
  be_.moe_combine_backward(dbuf, dgate, dout, y, router_.gate(), router_.expert(),
                           router_.slot(), T, D, E, GC);
  s_.tp.sum_partials(dgate, T);
  store_activation(be_, ps_, dbuf, int64_t(E) * GC * D);  // the experts' output gradient
  if (P_ == 1) {
    experts_.backward(dx_buf, dbuf, ffn_scratch);
  } else {
    // to_experts and from_experts are mutual transposes: gradients go through the other one.
    float* ex_a = arena.take<float>(buf_.size());  // [E_loc, P*GC, D]
    float* ex_b = arena.take<float>(buf_.size());
    // Staging: dx_buf before it is written, then dbuf once it is dead.
    exchange_.to_experts(ex_a, dbuf, GC, /*staging=*/dx_buf);
    experts_.backward(ex_b, ex_a, ffn_scratch);
    exchange_.from_experts(dx_buf, ex_b, GC, /*staging=*/dbuf);
  }
  be_.moe_dispatch_backward(dx, dx_buf, router_.expert(), router_.slot(), T, D, GC);
  s_.tp.f_backward(dx, int64_t(T) * D);  // each rank saw its d_ff columns of wi
  router_.backward(dx, dgate, lb_scale, z_scale, router_scratch);
  store_activation(be_, ps_, dx, int64_t(T) * D);
}

}  // namespace switcht5
