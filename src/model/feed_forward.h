// T5 feed-forward networks, bias-free, for dense blocks (count = 1) and for the experts of a
// Switch layer (count = E stacked experts, each applied to its own rows).
//
// Legend: count sets of N rows, D d_model, F d_ff.
//   relu       (T5 1.0, released Switch; HF wi, wo):      h = relu(x wi^T)
//   gated-gelu (T5 1.1; HF wi_0, wi_1, wo):               h = gelu_tanh(x wi_0^T) * (x wi_1^T)
//   out = dropout(h) wo^T
// x [count, N, D] -> out [count, N, D]; weights wi* [count, F, D], wo [count, D, F].
// Kept activations (a, b, h and the input x) are in the compute dtype
// (model/activation_buffer.h); gelu and relu run in fp32.
#pragma once
#include <cstdint>
#include <string>

#include "backend/backend.h"
#include "model/activation_buffer.h"
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

  // max_rows: the largest N passed to forward (forward_transient takes any N). Kept activations
  // are held in ps.compute_dtype() as it is now.
  FeedForward(Backend& be, ParamStore& ps, const std::string& prefix, int count, int max_rows,
              int D, int F, bool gated);

  // x (fp32 or the compute dtype) must stay alive until backward. N <= max_rows. scratch:
  // forward_scratch_floats() floats of workspace, dead once forward returns; null: a buffer of
  // the layer's own, allocated on first use (standalone layers, tests).
  // rows (backend memory, int32 [count], or null): set i's rows of x past rows[i] are zero (an
  // expert's capacity buffer past its kept tokens, Router::rows()), and so are those rows of
  // out, and of dout in backward; the products may skip them (Backend::gemm_ex_rows). Read
  // again by backward: it must hold the same counts until then.
  void forward(float* out, ActivationView x, int N, float dropout_p, RandomKey seed,
               float* scratch = nullptr, const int32_t* rows = nullptr);
  // bf16 mode: a (and b) in fp32 before they are stored, h formed in place of a. fp32: none.
  int64_t forward_scratch_floats() const { return a_.staging_floats() + b_.staging_floats(); }
  // Forward that keeps nothing for backward (evaluation: no dropout): a (and b) live in
  // `scratch` (transient_floats(N) floats) and h is formed in place of a, so N may exceed
  // max_rows. backward must not follow.
  void forward_transient(float* out, ActivationView x, int N, float* scratch,
                         const int32_t* rows = nullptr);
  int64_t transient_floats(int N) const { return int64_t(gated_ ? 2 : 1) * count_ * N * F_; }
  // dx [count, N, D] assigned.
  void backward(float* dx, const float* dout, float* scratch);
  // dh, db [count, N, F] (+ bf16: a, and for gated-gelu b and da, in fp32)
  int64_t scratch_floats() const {
    return 2 * h_.size() + a_.staging_floats() +
           (gated_ ? b_.staging_floats() + h_.staging_floats() : 0);
  }
  size_t activation_bytes() const {
    return a_.bytes() + b_.bytes() + h_.bytes() + own_scratch_.bytes();
  }

 private:
  // The forward math, with a, b and h [count, N, F] in fp32 wherever the caller puts them (h may
  // be a). keep: store a, b and h in the kept buffers as they are formed (a, b and h are then
  // what f32_or gave), and read h for the output GEMM as kept.
  void forward_into(float* a, float* b, float* h, float* out, ActivationView x, int N,
                    float dropout_p, RandomKey seed, bool keep, const int32_t* rows);

  Backend& be_;
  ParamStore& ps_;
  int count_, D_, F_;
  bool gated_;
  const ParamInfo *wi_ = nullptr, *wi1_ = nullptr, *wo_;  // wi_ is wi (relu) or wi_0 (gated)
  int max_rows_;
  // Saved for backward.
  ActivationView x_;  // data null after forward_transient
  int N_ = 0;
  const int32_t* rows_ = nullptr;  // forward's rows (null: every row may be nonzero)
  float dropout_p_ = 0.0f;
  RandomKey seed_;
  ActivationBuffer a_;   // [count, N, F] pre-activation (x wi^T or x wi_0^T)
  ActivationBuffer b_;   // [count, N, F] x wi_1^T (gated only)
  ActivationBuffer h_;   // [count, N, F] activation, then dropout in place
  DeviceArray<float> own_scratch_;  // forward workspace when the caller passes none
};

}  // namespace switcht5
