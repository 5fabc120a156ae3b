// T5 multi-head attention (self or cross), bias-free projections, no 1/sqrt(d_kv) scaling.
//
// Legend: B batch, Tq query length, Tk key length, D d_model, H heads, K d_kv, HK = H*K.
//   q = xq Wq^T [B*Tq, HK]   k = xkv Wk^T, v = xkv Wv^T [B*Tk, HK]
//   scores = q_h k_h^T [B,H,Tq,Tk];  probs = softmax(scores + bias[H,Tq,Tk], masks)
//   ctx_h = dropout(probs) v_h  [B,H,Tq,K];  out = ctx Wo^T [B*Tq, D]
// Parameters (HF names under `prefix`): q.weight [HK,D], k.weight [HK,D], v.weight [HK,D],
// o.weight [D,HK]. The relative position bias is owned by the stack, not by this layer.
// Kept activations (q_h, k_h, v_h, probs, ctx and the inputs) are in the compute dtype
// (model/activation_buffer.h); scores and the softmax run in fp32.
#pragma once
#include <cstdint>
#include <string>

#include "backend/backend.h"
#include "model/activation_buffer.h"
#include "model/params.h"

namespace switcht5 {

struct AttentionShape {
  int B = 1, Tq = 1, Tk = 1, D = 1, H = 1, K = 1;
  bool causal = false;
};

class Attention {
 public:
  // Registers the layer's parameters under `prefix` (e.g.
  // "encoder.block.0.layer.0.SelfAttention"). init_scale: std = sqrt(init_scale / fan_in), with
  // q additionally scaled by K^-0.5 (Mesh TF folds the missing softmax scaling into q's init).
  // Under model parallelism (sharding.model_parallel = M) this process holds heads
  // [m*H/M, (m+1)*H/M): q, k, v split by rows, o by columns (Megatron-LM).
  static void register_params(ParamStore& ps, const std::string& prefix, int D, int H, int K,
                              double init_scale, const Sharding& sharding = {});

  // Kept activations are held in ps.compute_dtype() as it is now.
  Attention(Backend& be, ParamStore& ps, const std::string& prefix, AttentionShape shape);

  // xq [B*Tq, D] and xkv [B*Tk, D] (fp32 or the compute dtype) must stay alive until backward. bias [H,Tq,Tk] or null,
  // key_mask [B,Tk] or null. out [B*Tq, D]. scratch: forward_scratch_floats() floats of
  // workspace that is dead once forward returns (the caller may reuse it, e.g. for backward);
  // null: a buffer of the layer's own, allocated on first use (standalone layers, tests).
  void forward(float* out, ActivationView xq, ActivationView xkv, const float* bias,
               const float* key_mask, float dropout_p, RandomKey seed, float* scratch = nullptr);
  // dxq [B*Tq,D] is assigned; dxkv [B*Tk,D] is accumulated (+=) after dxq is written, so a
  // self-attention may pass the same buffer for both. dbias [H,Tq,Tk] (+=) may be null.
  void backward(float* dxq, float* dxkv, float* dbias, const float* dout, float* scratch);
  // Floats of scratch that backward needs (in bf16 mode with an fp32 copy of probs).
  int64_t scratch_floats() const;
  // Floats of workspace forward needs: the projections before the head-major permute and
  // dropout(probs) (in bf16 mode with the fp32 staging of what is kept).
  int64_t forward_scratch_floats() const;
  // Bytes of activations this layer keeps for backward.
  size_t activation_bytes() const {
    return qh_.bytes() + kh_.bytes() + vh_.bytes() + probs_.bytes() + ctx_.bytes() +
           own_scratch_.bytes();
  }

 private:
  Backend& be_;
  AttentionShape s_;
  ParamStore& ps_;
  const ParamInfo *wq_, *wk_, *wv_, *wo_;
  // Saved for backward.
  ActivationView xq_, xkv_;
  float dropout_p_ = 0.0f;
  RandomKey seed_;
  ActivationBuffer qh_, kh_, vh_;           // [B,H,T,K]
  ActivationBuffer probs_;                  // [B,H,Tq,Tk] softmax output (before dropout)
  ActivationBuffer ctx_;                    // [B*Tq, HK]
  // Forward workspace when the caller passes none. dropout(probs) is not kept: backward
  // recomputes it from probs_ and the seed (Backend::dropout is a function of (seed, index)).
  DeviceArray<float> own_scratch_;
};

}  // namespace switcht5
