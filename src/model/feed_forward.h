// T5 feed-forward networks, bias-free, for dense blocks (count = 1) and for the experts of a
// Switch layer (count = E stacked experts, each applied to its own rows).
//
// Legend: count sets of N rows, D d_model, F d_ff.
//   relu       (T5 1.0, released Switch; HF wi, wo):      h = relu(x wi^T)
//   gated-gelu (T5 1.1; HF wi_0, wi_1, wo):               h = gelu_tanh(x wi_0^T) * (x wi_1^T)
//   out = dropout(h) wo^T
// x [count, N, D] -> out [count, N, D]; weights wi* [count, F, D], wo [count, D, F].
#pragma once
#include <cstdint>
#include <string>

#include "backend/backend.h"
#include "model/params.h"

namespace switcht5 {

// The experts a process holds under expert parallelism: [first, first + count) of total.
struct ExpertShard {
  int total = 1;
  int first = 0;
  int count = 1;
};

class FeedForward {
 public:
  // Parameter names: "<prefix>.wi.weight" etc. (prefix "encoder.block.0.layer.1.mlp" for a dense
  // block; "...mlp.experts" for stacked experts, count > 1 or stacked = true).
  // `shard` (stacked only) registers a block of a larger expert tensor. Under model parallelism
  // (model_parallel = M) this process holds d_ff columns [m*F/M, (m+1)*F/M): wi split by rows,
  // wo by columns (Megatron-LM), for every expert alike.
  static void register_params(ParamStore& ps, const std::string& prefix, int count, bool stacked,
                              int D, int F, bool gated, double init_scale,
                              const ExpertShard* shard = nullptr, int model_parallel = 1,
                              int model_rank = 0);

  // max_rows: the largest N passed to forward (forward_transient takes any N).
  FeedForward(Backend& be, ParamStore& ps, const std::string& prefix, int count, int max_rows,
              int D, int F, bool gated);

  // x must stay alive until backward. N <= max_rows.
  void forward(float* out, const float* x, int N, float dropout_p, uint64_t seed);
  // Forward that keeps nothing for backward (evaluation: no dropout): a (and b) live in
  // `scratch` (transient_floats(N) floats) and h is formed in place of a, so N may exceed
  // max_rows. backward must not follow.
  void forward_transient(float* out, const float* x, int N, float* scratch);
  int64_t transient_floats(int N) const { return int64_t(gated_ ? 2 : 1) * count_ * N * F_; }
  // dx [count, N, D] assigned.
  void backward(float* dx, const float* dout, float* scratch);
  int64_t scratch_floats() const { return 2 * h_.size(); }
  int64_t activation_floats() const { return a_.size() + b_.size() + h_.size(); }

 private:
  // The forward math, with a, b and h [count, N, F] wherever the caller puts them (h may be a).
  void forward_into(float* a, float* b, float* h, float* out, const float* x, int N,
                    float dropout_p, uint64_t seed);

  Backend& be_;
  ParamStore& ps_;
  int count_, D_, F_;
  bool gated_;
  const ParamInfo *wi_ = nullptr, *wi1_ = nullptr, *wo_;  // wi_ is wi (relu) or wi_0 (gated)
  int max_rows_;
  // Saved for backward.
  const float* x_ = nullptr;  // null after forward_transient
  int N_ = 0;
  float dropout_p_ = 0.0f;
  uint64_t seed_ = 0;
  DeviceArray<float> a_;   // [count, N, F] pre-activation (x wi^T or x wi_0^T)
  DeviceArray<float> b_;   // [count, N, F] x wi_1^T (gated only)
  DeviceArray<float> h_;   // [count, N, F] activation, then dropout in place
};

}  // namespace switcht5
