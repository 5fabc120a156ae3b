#include "model/attention.h"

#include <algorithm>
#include <cmath>

#include "model/linear.h"
#include "model/scratch_arena.h"

namespace switcht5 {

void Attention::register_params(ParamStore& ps, const std::string& prefix, int D, int H, int K,
                                double init_scale, const Sharding& sh) {
  const int64_t HK = int64_t(H) * K;
  const double in_std = std::sqrt(init_scale / D);
  auto add = [&](const char* name, int64_t r, int64_t c, double std, int split_dim) {
    ParamInfo p{.name = prefix + name, .shape = {r, c}, .init_std = std};
    if (sh.model_parallel > 1) split_over_model(p, split_dim, sh.model_parallel, sh.model_rank);
    ps.add(std::move(p));
  };
  add(".q.weight", HK, D, in_std / std::sqrt(double(K)), 0);
  add(".k.weight", HK, D, in_std, 0);
  add(".v.weight", HK, D, in_std, 0);
  add(".o.weight", D, HK, std::sqrt(init_scale / double(HK)), 1);
}

Attention::Attention(Backend& be, ParamStore& ps, const std::string& prefix, AttentionShape s)
    : be_(be), s_(s), ps_(ps),
      wq_(&ps.info(prefix + ".q.weight")), wk_(&ps.info(prefix + ".k.weight")),
      wv_(&ps.info(prefix + ".v.weight")), wo_(&ps.info(prefix + ".o.weight")) {
  const int64_t HK = int64_t(s.H) * s.K;
  const DType dt = ps.compute_dtype();
  qh_ = ActivationBuffer(be, dt, int64_t(s.B) * s.Tq * HK);
  kh_ = ActivationBuffer(be, dt, int64_t(s.B) * s.Tk * HK);
  vh_ = ActivationBuffer(be, dt, kh_.size());
  probs_ = ActivationBuffer(be, dt, int64_t(s.B) * s.H * s.Tq * s.Tk);
  ctx_ = ActivationBuffer(be, dt, qh_.size());
}

int64_t Attention::scratch_floats() const {
  // dprobs [B,H,Tq,Tk] + dctx, dctx_h/dq_h, dq [B*Tq,HK] + dk_h, dv_h, dk, dv [B*Tk,HK]
  // (+ bf16: probs in fp32 [B,H,Tq,Tk])
  return probs_.size() + 3 * qh_.size() + 4 * kh_.size() + probs_.staging_floats();
}

int64_t Attention::forward_scratch_floats() const {
  // q (later ctx_h) [B*Tq,HK] + k, v [B*Tk,HK] + dropout(probs) [B,H,Tq,Tk]
  // (+ bf16: one head-major permute in fp32, [B*T,HK] for the longer of Tq and Tk; the fp32
  // scores live where dropout(probs) goes)
  return qh_.size() + 2 * kh_.size() + probs_.size() +
         std::max(qh_.staging_floats(), kh_.staging_floats());
}

void Attention::forward(float* out, ActivationView xq, ActivationView xkv, const float* bias,
                        const float* key_mask, float dropout_p, RandomKey seed, float* scratch) {
  const int B = s_.B, Tq = s_.Tq, Tk = s_.Tk, D = s_.D, H = s_.H, K = s_.K, HK = H * K;
  xq_ = xq;
  xkv_ = xkv;
  dropout_p_ = dropout_p;
  seed_ = seed;
  if (!scratch) {
    if (own_scratch_.size() == 0) own_scratch_ = DeviceArray<float>(be_, forward_scratch_floats());
    scratch = own_scratch_.data();
  }
  // The token-major projections are needed only until they are permuted head-major.
  ScratchArena arena(scratch, forward_scratch_floats(), "Attention::forward scratch");
  float* q = arena.take<float>(qh_.size());              // [B*Tq, HK]
  float* k = arena.take<float>(kh_.size());              // [B*Tk, HK]
  float* v = arena.take<float>(vh_.size());              // [B*Tk, HK]
  float* p_dropped = arena.take<float>(probs_.size());   // [B,H,Tq,Tk]
  // bf16: a head-major tensor in fp32 before it is stored ([B,H,T,K] or [B*Tq,HK]).
  float* permuted = qh_.is_f32() ? nullptr : arena.take<float>(std::max(qh_.size(), kh_.size()));
  linear_forward(be_, q, xq, ps_.weight(*wq_), B * Tq, D, HK);
  linear_forward(be_, k, xkv, ps_.weight(*wk_), B * Tk, D, HK);
  linear_forward(be_, v, xkv, ps_.weight(*wv_), B * Tk, D, HK);
  be_.permute_0213(qh_.f32_or(permuted), q, B, Tq, H, K);
  qh_.store(be_, qh_.f32_or(permuted));
  be_.permute_0213(kh_.f32_or(permuted), k, B, Tk, H, K);
  kh_.store(be_, kh_.f32_or(permuted));
  be_.permute_0213(vh_.f32_or(permuted), v, B, Tk, H, K);
  vh_.store(be_, vh_.f32_or(permuted));
  // ctx_h = dropout(softmax(q_h k_h^T + bias)) v_h, one [Tq,Tk] problem per (b,h), written over
  // q (free once permuted into qh_), then permuted token-major into ctx_ [B*Tq, HK].
  float* ctx_h = q;
  if (probs_.is_f32()) {
    // fp32: one op (Backend::attention_core_forward), which a backend may run problem by problem.
    be_.attention_core_forward(probs_.f32_or(nullptr), ctx_h, qh_.view().f32(), kh_.view().f32(),
                               vh_.view().f32(), bias, key_mask, B, H, Tq, Tk, K, s_.causal,
                               dropout_p, seed, p_dropped);
  } else {
    // bf16: the fp32 scores where dropout(probs) goes; probs_ stores the rounded probs, and p
    // (always written, a copy when dropout_p == 0) holds the fp32 values the GEMM below reads.
    float* scores = p_dropped;
    activation_gemm(be_, false, true, Tq, Tk, K, 1.0f, qh_.view(), K, int64_t(Tq) * K,
                    kh_.view(), K, int64_t(Tk) * K, 0.0f, scores, Tk, int64_t(Tq) * Tk, B * H);
    be_.attention_softmax_dropout_forward(probs_.data(), probs_.dtype(), p_dropped, scores, bias,
                                          key_mask, B, H, Tq, Tk, s_.causal, dropout_p, seed);
    activation_gemm(be_, false, false, Tq, K, Tk, 1.0f, p_dropped, Tk, int64_t(Tq) * Tk,
                    vh_.view(), K, int64_t(Tk) * K, 0.0f, ctx_h, K, int64_t(Tq) * K, B * H);
  }
  store_activation(be_, ps_, ctx_h, int64_t(B) * Tq * HK);
  be_.permute_0213(ctx_.f32_or(permuted), ctx_h, B, H, Tq, K);
  ctx_.store(be_, ctx_.f32_or(permuted));
  linear_forward(be_, out, ctx_.view(), ps_.weight(*wo_), B * Tq, HK, D);
}

void Attention::backward(float* dxq, float* dxkv, float* dbias, const float* dout, float* scratch) {
  const int B = s_.B, Tq = s_.Tq, Tk = s_.Tk, D = s_.D, H = s_.H, K = s_.K, HK = H * K;
  const int64_t nq = int64_t(B) * Tq * HK, nk = int64_t(B) * Tk * HK;
  ScratchArena arena(scratch, scratch_floats(), "Attention::backward scratch");
  float* dprobs = arena.take<float>(probs_.size());  // [B,H,Tq,Tk]
  float* dctx = arena.take<float>(nq);               // [B*Tq,HK]
  float* dctx_h = arena.take<float>(nq);             // [B,H,Tq,K], later reused for dq_h
  float* dq = arena.take<float>(nq);                 // [B*Tq,HK]
  float* dk_h = arena.take<float>(nk);               // [B,H,Tk,K]
  float* dv_h = arena.take<float>(nk);
  float* dk = arena.take<float>(nk);                 // [B*Tk,HK]
  float* dv = arena.take<float>(nk);
  // The softmax output in fp32, for the dropout recomputation and the softmax backward.
  const float* probs = probs_.load(be_, arena);      // [B,H,Tq,Tk]

  // out = ctx Wo^T
  linear_backward_weight(be_, ps_, *wo_, dout, ctx_.view(), B * Tq, HK, D);
  linear_backward_input(be_, dctx, dout, ps_.weight(*wo_), B * Tq, HK, D, false);
  be_.permute_0213(dctx_h, dctx, B, Tq, H, K);
  // ctx_h = p v_h with p = dropout(probs), probs = softmax(q_h k_h^T + bias): dv_h, dq_h (over
  // dctx_h), dk_h and the bias gradient. p was not kept: dropout is a function of (seed, index),
  // so the forward's p is recomputed exactly.
  float* dq_h = dctx_h;
  if (probs_.is_f32()) {
    be_.attention_core_backward(dq_h, dk_h, dv_h, dbias, dctx_h, probs, qh_.view().f32(),
                                kh_.view().f32(), vh_.view().f32(), B, H, Tq, Tk, K, dropout_p_,
                                seed_, dprobs);
  } else {
    // bf16: p recomputed into dprobs, used for dv_h, then overwritten by dp = dctx_h v_h^T.
    const float* p = probs;
    if (dropout_p_ > 0.0f) {
      be_.dropout(dprobs, probs, probs_.size(), dropout_p_, seed_);
      store_activation(be_, ps_, dprobs, probs_.size());
      p = dprobs;
    }
    be_.gemm(true, false, Tk, K, Tq, 1.0f, p, Tk, int64_t(Tq) * Tk, dctx_h, K,
             int64_t(Tq) * K, 0.0f, dv_h, K, int64_t(Tk) * K, B * H);
    store_activation(be_, ps_, dv_h, nk);
    activation_gemm(be_, false, true, Tq, Tk, K, 1.0f, dctx_h, K, int64_t(Tq) * K, vh_.view(),
                    K, int64_t(Tk) * K, 0.0f, dprobs, Tk, int64_t(Tq) * Tk, B * H);
    // dscores in place of dprobs; the bias gradient summed over the batch from them, then
    // rounded (dscores feed bf16 GEMMs).
    be_.attention_softmax_dropout_backward(dprobs, dbias, dprobs, probs, B, H, Tq, Tk,
                                           dropout_p_, seed_, /*round_bf16=*/true);
    activation_gemm(be_, false, false, Tq, K, Tk, 1.0f, dprobs, Tk, int64_t(Tq) * Tk,
                    kh_.view(), K, int64_t(Tk) * K, 0.0f, dq_h, K, int64_t(Tq) * K, B * H);
    activation_gemm(be_, true, false, Tk, K, Tq, 1.0f, dprobs, Tk, int64_t(Tq) * Tk,
                    qh_.view(), K, int64_t(Tq) * K, 0.0f, dk_h, K, int64_t(Tk) * K, B * H);
    store_activation(be_, ps_, dq_h, nq);
    store_activation(be_, ps_, dk_h, nk);
  }
  be_.permute_0213(dq, dq_h, B, H, Tq, K);
  be_.permute_0213(dk, dk_h, B, H, Tk, K);
  be_.permute_0213(dv, dv_h, B, H, Tk, K);
  // Projections.
  linear_backward_weight(be_, ps_, *wq_, dq, xq_, B * Tq, D, HK);
  linear_backward_weight(be_, ps_, *wk_, dk, xkv_, B * Tk, D, HK);
  linear_backward_weight(be_, ps_, *wv_, dv, xkv_, B * Tk, D, HK);
  linear_backward_input(be_, dxq, dq, ps_.weight(*wq_), B * Tq, D, HK, false);
  linear_backward_input(be_, dxkv, dk, ps_.weight(*wk_), B * Tk, D, HK, true);
  linear_backward_input(be_, dxkv, dv, ps_.weight(*wv_), B * Tk, D, HK, true);
}

}  // namespace switcht5
