#include "model/model.h"

#include <algorithm>
#include <cmath>

#include "core/check.h"
#include "core/rng.h"
#include "model/linear.h"
#include "model/relpos.h"

namespace switcht5 {

namespace {

std::string block_prefix(bool decoder, int i) {
  return fmt::format("{}.block.{}", decoder ? "decoder" : "encoder", i);
}

bool feed_forward_gated(const ModelConfig& cfg) { return cfg.feed_forward_proj == "gated-gelu"; }

// Dropout sites get seeds derived from the forward call's seed and a per-site tag, so that
// every mask is reproducible in backward and independent of everything else.
RandomKey site_seed(RandomKey seed, bool decoder, int block, int site) {
  return seed.derive((uint64_t(decoder) << 40) | (uint64_t(block + 1) << 8) | uint64_t(site));
}

}  // namespace

bool is_sparse_layer(int step, int layer_index) {
  return step > 0 && (step == 1 || layer_index % step == 1);
}

void register_model_params(ParamStore& ps, const ModelConfig& cfg, const Sharding& sh) {
  const int D = cfg.d_model, F = cfg.d_ff, H = cfg.num_heads, K = cfg.d_kv, E = cfg.num_experts;
  const bool gated = feed_forward_gated(cfg);
  const double sc = cfg.init_scale;
  // T5 initialises token embeddings with std 1.0 (Mesh TF / HF T5 `shared`).
  ps.add({.name = "shared.weight", .shape = {cfg.vocab_size, D}, .kind = ParamKind::kEmbedding,
          .init_std = 1.0});
  for (int dec = 0; dec < 2; ++dec) {
    const bool decoder = dec == 1;
    const int layers = decoder ? cfg.num_decoder_layers : cfg.num_layers;
    const int step = decoder ? cfg.decoder_sparse_step : cfg.encoder_sparse_step;
    for (int i = 0; i < layers; ++i) {
      const std::string b = block_prefix(decoder, i);
      Attention::register_params(ps, b + ".layer.0.SelfAttention", D, H, K, sc, sh);
      if (i == 0) {
        ParamInfo bias{.name = b + ".layer.0.SelfAttention.relative_attention_bias.weight",
                       .shape = {cfg.relative_attention_num_buckets, H},
                       .init_std = std::sqrt(sc / D)};
        if (sh.model_parallel > 1) split_over_model(bias, 1, sh.model_parallel, sh.model_rank);
        ps.add(std::move(bias));
      }
      ps.add({.name = b + ".layer.0.layer_norm.weight", .shape = {D}, .kind = ParamKind::kVector,
              .init_value = 1.0f});
      int ff = 1;
      if (decoder) {
        Attention::register_params(ps, b + ".layer.1.EncDecAttention", D, H, K, sc, sh);
        ps.add({.name = b + ".layer.1.layer_norm.weight", .shape = {D},
                .kind = ParamKind::kVector, .init_value = 1.0f});
        ff = 2;
      }
      const std::string mlp = fmt::format("{}.layer.{}.mlp", b, ff);
      if (is_sparse_layer(step, i))
        SwitchFFN::register_params(ps, mlp, D, F, E, gated, sc, sh);
      else
        FeedForward::register_params(ps, mlp, 1, false, D, F, gated, sc, nullptr,
                                     sh.model_parallel, sh.model_rank);
      ps.add({.name = fmt::format("{}.layer.{}.layer_norm.weight", b, ff), .shape = {D},
              .kind = ParamKind::kVector, .init_value = 1.0f});
    }
    ps.add({.name = std::string(decoder ? "decoder" : "encoder") + ".final_layer_norm.weight",
            .shape = {D}, .kind = ParamKind::kVector, .init_value = 1.0f});
  }
  if (!cfg.tie_word_embeddings)
    ps.add({.name = "lm_head.weight", .shape = {cfg.vocab_size, D}, .kind = ParamKind::kEmbedding,
            .init_std = std::sqrt(sc / D)});
}

// ---- one stack (encoder or decoder) ------------------------------------------------------------

// A pre-norm residual sublayer: h_next = h_prev + dropout(f(rmsnorm(h_prev))).
struct NormedResidual {
  const ParamInfo* ln = nullptr;
  ActivationBuffer normed;    // [N,D] rmsnorm(h_prev), the sublayer input
  DeviceArray<float> rstd;    // [N] fp32 in every compute dtype: a norm statistic
  ActivationBuffer h_next;    // [N,D]
  ActivationView h_prev;      // [N,D] the previous h_next, or the stack's h0
  RandomKey seed;
};

struct SwitchT5Model::Stack {
  struct Block {
    NormedResidual attn, cross, ff;
    std::unique_ptr<Attention> self_attention, cross_attention;
    std::unique_ptr<FeedForward> dense;
    std::unique_ptr<SwitchFFN> sparse;
  };

  Backend& be;
  const ModelConfig& cfg;
  ParamStore& ps;
  bool decoder;
  int B, T, Tenc, N, D;
  int S;  // routing group size
  TensorParallel tp;          // heads and d_ff split over the model group (or not)
  int H, F;                   // this process's heads and d_ff columns
  std::vector<Block> blocks;
  const ParamInfo* embedding;  // shared.weight [V, D]
  const ParamInfo* relbias;    // [num_buckets, H], block 0
  const ParamInfo* final_ln;
  DeviceArray<int32_t> buckets;          // [T,T]
  // fp32 in every compute dtype: the bias gathered from the fp32 master table, added to fp32
  // scores (never a bf16 store), and its fp32 gradient.
  DeviceArray<float> bias, dbias;        // [H,T,T]
  ActivationBuffer h0;                   // [N,D] dropout(embed)
  ActivationBuffer out;                  // [N,D] dropout(rmsnorm_final(h_L))
  DeviceArray<float> final_rstd;         // [N] fp32: a norm statistic
  DeviceArray<float> sub_out;            // [N,D] sublayer output (scratch)
  // [N,D] backward scratch; bf16 mode: dnormed also holds normed and out in fp32 in forward.
  DeviceArray<float> dh, dtmp, dnormed;
  // bf16 mode only (empty in fp32): the residual stream in fp32, [N,D]. Forward: the running h,
  // stored into each h_next; backward: h_prev of the sublayer being differentiated.
  DeviceArray<float> h_f32;
  RandomKey embed_seed, final_seed;
  float dropout_p = 0.0f;

  Stack(Backend& be_, const ModelConfig& cfg_, ParamStore& ps_, bool decoder_, int B_, int T_,
        int Tenc_, const ModelParallelism& mp)
      : be(be_), cfg(cfg_), ps(ps_), decoder(decoder_), B(B_), T(T_), Tenc(Tenc_), N(B_ * T_),
        D(cfg_.d_model), tp(mp.model_group),
        H(cfg_.num_heads / mp.sharding.model_parallel),
        F(cfg_.d_ff / mp.sharding.model_parallel) {
    const std::string name = decoder ? "decoder" : "encoder";
    const int layers = decoder ? cfg.num_decoder_layers : cfg.num_layers;
    const int step = decoder ? cfg.decoder_sparse_step : cfg.encoder_sparse_step;
    S = cfg.group_size > 0 ? cfg.group_size : T;
    SWT_USER_CHECK(int64_t(N) % S == 0,
                   "model.group_size {} does not divide the {} {} tokens of a micro-batch "
                   "({} sequences x {})",
                   S, N, name, B, T);
    embedding = &ps.info("shared.weight");
    relbias = &ps.info(name + ".block.0.layer.0.SelfAttention.relative_attention_bias.weight");
    final_ln = &ps.info(name + ".final_layer_norm.weight");
    const bool gated = feed_forward_gated(cfg);
    AttentionShape self{B, T, T, D, H, cfg.d_kv, decoder};
    AttentionShape cross{B, T, Tenc, D, H, cfg.d_kv, false};
    blocks.resize(layers);
    auto make_residual = [&](NormedResidual& r, const std::string& ln_name) {
      r.ln = &ps.info(ln_name);
      r.normed = ActivationBuffer(be, ps.compute_dtype(), int64_t(N) * D);
      r.rstd = DeviceArray<float>(be, N);
      r.h_next = ActivationBuffer(be, ps.compute_dtype(), int64_t(N) * D);
    };
    for (int i = 0; i < layers; ++i) {
      Block& blk = blocks[i];
      const std::string b = block_prefix(decoder, i);
      make_residual(blk.attn, b + ".layer.0.layer_norm.weight");
      blk.self_attention = std::make_unique<Attention>(be, ps, b + ".layer.0.SelfAttention", self);
      int ff = 1;
      if (decoder) {
        make_residual(blk.cross, b + ".layer.1.layer_norm.weight");
        blk.cross_attention =
            std::make_unique<Attention>(be, ps, b + ".layer.1.EncDecAttention", cross);
        ff = 2;
      }
      make_residual(blk.ff, fmt::format("{}.layer.{}.layer_norm.weight", b, ff));
      const std::string mlp = fmt::format("{}.layer.{}.mlp", b, ff);
      if (is_sparse_layer(step, i)) {
        SwitchShape ss{N, S, D, F, cfg.num_experts, expert_capacity(cfg, S, true),
                       expert_capacity(cfg, S, false), gated, cfg.router_jitter_noise > 0.0,
                       cfg.router_force_balance, mp.expert_group, tp};
        blk.sparse = std::make_unique<SwitchFFN>(be, ps, mlp, ss);
      } else {
        blk.dense = std::make_unique<FeedForward>(be, ps, mlp, 1, N, D, F, gated);
      }
    }
    const auto host_buckets = relative_position_buckets(
        T, T, /*bidirectional=*/!decoder, cfg.relative_attention_num_buckets,
        cfg.relative_attention_max_distance);
    buckets = DeviceArray<int32_t>(be, int64_t(T) * T);
    be.copy_to_device(buckets.data(), host_buckets.data(), buckets.bytes());
    bias = DeviceArray<float>(be, int64_t(H) * T * T);
    dbias = DeviceArray<float>(be, bias.size());
    h0 = ActivationBuffer(be, ps.compute_dtype(), int64_t(N) * D);
    out = ActivationBuffer(be, ps.compute_dtype(), int64_t(N) * D);
    if (!h0.is_f32()) h_f32 = DeviceArray<float>(be, int64_t(N) * D);
    final_rstd = DeviceArray<float>(be, N);
    sub_out = DeviceArray<float>(be, int64_t(N) * D);
    dh = DeviceArray<float>(be, int64_t(N) * D);
    dtmp = DeviceArray<float>(be, int64_t(N) * D);
    dnormed = DeviceArray<float>(be, int64_t(N) * D);
    collect_block_params();
  }

  // The layers' forward workspace and backward scratch share one arena: each layer uses it
  // only within one call.
  int64_t scratch_floats() const {
    int64_t s = 0;
    for (const Block& blk : blocks) {
      for (const Attention* a : {blk.self_attention.get(), blk.cross_attention.get()})
        if (a) s = std::max({s, a->scratch_floats(), a->forward_scratch_floats()});
      if (blk.dense)
        s = std::max({s, blk.dense->scratch_floats(), blk.dense->forward_scratch_floats()});
      else
        s = std::max({s, blk.sparse->scratch_floats(), blk.sparse->forward_scratch_floats()});
    }
    return s;
  }

  // r.h_next = h_prev + dropout(sub(rmsnorm(h_prev))); `sub(sub_out, normed)` writes the
  // sublayer's output to sub_out. h_prev_f32 holds h_prev's values in fp32 (h_prev itself in fp32
  // mode, h_f32 in bf16 mode); returns h_next's values in fp32 likewise. bf16: normed is formed
  // in dnormed (free until backward).
  template <class Sub>
  const float* residual_forward(NormedResidual& r, ActivationView h_prev, const float* h_prev_f32,
                                RandomKey seed, Sub&& sub) {
    const int64_t n = int64_t(N) * D;
    r.h_prev = h_prev;
    r.seed = seed;
    float* normed = r.normed.f32_or(dnormed.data());
    be.rmsnorm_forward(normed, r.rstd.data(), h_prev_f32, ps.master(*r.ln), N, D,
                       float(cfg.layer_norm_epsilon));
    store_activation(be, ps, normed, n);  // bf16: statistics fp32, output bf16
    r.normed.store(be, normed);
    sub(sub_out.data(), r.normed.view());
    be.dropout(sub_out.data(), sub_out.data(), n, dropout_p, seed);
    store_activation(be, ps, sub_out.data(), n);
    float* h_next = r.h_next.f32_or(h_f32.data());  // bf16: h_f32 += sub_out, in place
    be.add(h_next, h_prev_f32, sub_out.data(), n);
    store_activation(be, ps, h_next, n);  // the residual stream is bf16 too
    r.h_next.store(be, h_next);
    return h_next;
  }

  // dh holds dJ/dh_next on entry and dJ/dh_prev on exit. `sub_backward(dnormed, dsub)`.
  template <class SubBackward>
  void residual_backward(NormedResidual& r, SubBackward&& sub_backward) {
    const int64_t n = int64_t(N) * D;
    be.dropout(dtmp.data(), dh.data(), n, dropout_p, r.seed);
    store_activation(be, ps, dtmp.data(), n);
    sub_backward(dnormed.data(), dtmp.data());
    const float* h_prev = load_f32(be, r.h_prev, n, h_f32.data());
    be.rmsnorm_backward(dtmp.data(), ps.grad(*r.ln), dnormed.data(), h_prev, ps.master(*r.ln),
                        r.rstd.data(), N, D);
    store_activation(be, ps, dtmp.data(), n);
    be.add(dh.data(), dh.data(), dtmp.data(), n);
    store_activation(be, ps, dh.data(), n);
  }

  int switch_layers() const {
    int n = 0;
    for (const Block& blk : blocks) n += blk.sparse ? 1 : 0;
    return n;
  }

  // ids [N], mask [B,T]; enc/enc_mask: encoder output and mask (decoder only). router_stats:
  // switch_layers() consecutive RouterStatsSlot arrays in backend memory, added to. scratch:
  // scratch_floats() floats, the layers' forward workspace.
  void forward(const int32_t* ids, const float* mask, ActivationView enc, const float* enc_mask,
               bool training, RandomKey seed, uint64_t first_row, double* router_stats,
               float* scratch) {
    const int64_t n = int64_t(N) * D;
    dropout_p = training ? float(cfg.dropout_rate) : 0.0f;
    const float expert_dropout = training ? float(cfg.expert_dropout) : 0.0f;
    // Dropout masks are indexed within this batch, so each micro-batch gets its own seed; router
    // jitter is indexed by global position and keeps the step's seed.
    const RandomKey drop = seed.derive(first_row + 1);
    embed_seed = site_seed(drop, decoder, -1, 0);
    final_seed = site_seed(drop, decoder, -1, 1);
    // h: the residual stream as kept; h_f32_values: its values in fp32 (the kept buffer itself
    // in fp32 mode, this stack's h_f32 in bf16 mode).
    float* embedded = h0.f32_or(h_f32.data());
    be.embedding_forward(embedded, ids, ps.master(*embedding), N, D);
    store_activation(be, ps, embedded, n);  // the rows of the bf16 compute copy
    be.dropout(embedded, embedded, n, dropout_p, embed_seed);
    store_activation(be, ps, embedded, n);
    h0.store(be, embedded);
    be.relpos_bias_forward(bias.data(), ps.master(*relbias), buckets.data(),
                           H, T, T);
    ActivationView h = h0.view();
    const float* h_f32_values = embedded;
    double* layer_stats = router_stats;
    for (size_t i = 0; i < blocks.size(); ++i) {
      Block& blk = blocks[i];
      const int bi = static_cast<int>(i);
      h_f32_values = residual_forward(
          blk.attn, h, h_f32_values, site_seed(drop, decoder, bi, 0),
          [&](float* o, ActivationView x) {
            blk.self_attention->forward(o, x, x, bias.data(), mask, dropout_p,
                                        site_seed(drop, decoder, bi, 1), scratch);
            tp.g_forward(o, int64_t(N) * D);
          });
      h = blk.attn.h_next.view();
      if (decoder) {
        h_f32_values = residual_forward(
            blk.cross, h, h_f32_values, site_seed(drop, decoder, bi, 2),
            [&](float* o, ActivationView x) {
              blk.cross_attention->forward(o, x, enc, nullptr, enc_mask, dropout_p,
                                           site_seed(drop, decoder, bi, 3), scratch);
              tp.g_forward(o, int64_t(N) * D);
            });
        h = blk.cross.h_next.view();
      }
      h_f32_values = residual_forward(
          blk.ff, h, h_f32_values, site_seed(drop, decoder, bi, 4),
          [&](float* o, ActivationView x) {
        if (blk.dense) {
          blk.dense->forward(o, x, N, dropout_p, site_seed(drop, decoder, bi, 5), scratch);
          tp.g_forward(o, int64_t(N) * D);
        } else {
          blk.sparse->forward_accumulate(o, x, training, float(cfg.router_jitter_noise),
                                         expert_dropout, site_seed(seed, decoder, bi, 6),
                                         first_row * T * D, first_row, layer_stats, scratch);
          layer_stats += router_stats_size(cfg.num_experts);
        }
      });
      h = blk.ff.h_next.view();
    }
    float* normed_out = out.f32_or(dnormed.data());
    be.rmsnorm_forward(normed_out, final_rstd.data(), h_f32_values, ps.master(*final_ln), N, D,
                       float(cfg.layer_norm_epsilon));
    be.dropout(normed_out, normed_out, n, dropout_p, final_seed);
    store_activation(be, ps, normed_out, n);
    out.store(be, normed_out);
  }

  ActivationView last_hidden() const {
    const Block& last = blocks.back();
    return last.ff.h_next.view();
  }

  // dout: dJ/d(out) [N,D] (consumed). d_enc (decoder only): dJ/d(encoder output), accumulated.
  // lb_scale/z_scale: router loss weights per group-sum / token-sum (see SwitchFFN::backward).
  // The parameters of block i (name prefix "<stack>.block.<i>."), but the relative-position
  // bias of block 0, which every block's backward adds to. Computed once (no allocation in the
  // step).
  std::vector<std::vector<const ParamInfo*>> block_params;
  void collect_block_params() {
    block_params.resize(blocks.size());
    for (size_t i = 0; i < blocks.size(); ++i) {
      const std::string prefix = block_prefix(decoder, int(i)) + ".";
      for (const ParamInfo& p : ps.infos())
        if (p.name.rfind(prefix, 0) == 0 && &p != relbias) block_params[i].push_back(&p);
    }
  }

  // p's gradient is final: zeroed if nothing wrote it (ParamStore::finish_grad), then reported.
  static void report(GradientReadyListener* ready, ParamStore& ps, const ParamInfo* p) {
    if (!ready) return;
    ps.finish_grad(*p);
    ready->on_gradients_ready(p->offset, p->offset + p->numel);
  }

  // dout: dJ/d(out) [N,D] (consumed). d_enc (decoder only): dJ/d(encoder output), accumulated.
  // lb_scale/z_scale: router loss weights per group-sum / token-sum (see SwitchFFN::backward).
  // ready: told each block's parameters once final (see SwitchT5Model::backward); the shared
  // embedding is the model's to report.
  void backward(float* dout, const int32_t* ids, float* d_enc, float lb_scale, float z_scale,
                float* scratch, GradientReadyListener* ready) {
    const int64_t n = int64_t(N) * D;
    be.dropout(dout, dout, n, dropout_p, final_seed);
    store_activation(be, ps, dout, n);
    be.rmsnorm_backward(dh.data(), ps.grad(*final_ln), dout,
                        load_f32(be, last_hidden(), n, h_f32.data()), ps.master(*final_ln),
                        final_rstd.data(), N, D);
    report(ready, ps, final_ln);
    store_activation(be, ps, dh.data(), n);
    be.fill(dbias.data(), 0.0f, dbias.size());
    for (int i = static_cast<int>(blocks.size()) - 1; i >= 0; --i) {
      Block& blk = blocks[i];
      residual_backward(blk.ff, [&](float* dx, const float* dsub) {
        if (blk.dense) {
          blk.dense->backward(dx, dsub, scratch);
          tp.f_backward(dx, int64_t(N) * D);
        } else {
          blk.sparse->backward(dx, dsub, lb_scale, z_scale, scratch);
        }
      });
      if (decoder) {
        // d_enc collects partial sums from every decoder block; the model sums it once.
        residual_backward(blk.cross, [&](float* dx, const float* dsub) {
          blk.cross_attention->backward(dx, d_enc, nullptr, dsub, scratch);
          tp.f_backward(dx, int64_t(N) * D);
        });
      }
      residual_backward(blk.attn, [&](float* dx, const float* dsub) {
        blk.self_attention->backward(dx, dx, dbias.data(), dsub, scratch);
        tp.f_backward(dx, int64_t(N) * D);
      });
      if (ready)
        for (const ParamInfo* p : block_params[size_t(i)]) report(ready, ps, p);
    }
    be.relpos_bias_backward(ps.grad(*relbias), dbias.data(), buckets.data(),
                            H, T, T, cfg.relative_attention_num_buckets);
    report(ready, ps, relbias);
    be.dropout(dh.data(), dh.data(), n, dropout_p, embed_seed);
    be.embedding_backward(ps.grad(*embedding), ids, dh.data(), N, D,
                          cfg.vocab_size);
  }

  // What forward keeps for backward (and the encoder output the decoder reads).
  size_t kept_activation_bytes() const {
    size_t s = 0;
    for (const Block& blk : blocks) {
      for (const NormedResidual* r : {&blk.attn, &blk.cross, &blk.ff})
        s += r->normed.bytes() + r->rstd.bytes() + r->h_next.bytes();
      s += blk.self_attention->activation_bytes();
      if (blk.cross_attention) s += blk.cross_attention->activation_bytes();
      s += blk.dense ? blk.dense->activation_bytes() : blk.sparse->activation_bytes();
    }
    return s + h0.bytes() + out.bytes() + final_rstd.bytes();
  }
  // Buffers that live within one pass: the position bias and its gradient, the sublayer output,
  // the backward's gradients and the bf16 mode's fp32 residual stream.
  size_t workspace_bytes() const {
    return bias.bytes() + dbias.bytes() + sub_out.bytes() + dh.bytes() + dtmp.bytes() +
           dnormed.bytes() + h_f32.bytes();
  }
};

// ---- model ---------------------------------------------------------------------------------------

SwitchT5Model::SwitchT5Model(Backend& be, const ModelConfig& cfg, ModelShape shape,
                             ModelParallelism parallel, DType compute_dtype)
    : be_(be), cfg_(cfg), shape_(shape), parallel_(parallel) {
  SWT_CHECK(cfg_.num_decoder_layers >= 1 && cfg_.num_layers >= 1, "unresolved layer counts");
  register_model_params(params_, cfg_, parallel.sharding);
  params_.allocate(be);
  // Before the layers: they hold their activations in the compute dtype.
  params_.set_compute_dtype(be, compute_dtype);
  head_ = &params_.info(cfg_.tie_word_embeddings ? "shared.weight" : "lm_head.weight");
  const int B = shape.batch, Ti = shape.inputs_length, Tt = shape.targets_length;
  encoder_ = std::make_unique<Stack>(be, cfg_, params_, false, B, Ti, Ti, parallel);
  decoder_ = std::make_unique<Stack>(be, cfg_, params_, true, B, Tt, Ti, parallel);
  scratch_ = DeviceArray<float>(be, std::max(encoder_->scratch_floats(), decoder_->scratch_floats()));
  in_ = make_device_batch();
  head_in_ = ActivationBuffer(be, compute_dtype, int64_t(B) * Tt * cfg.d_model);
  logits_ = DeviceArray<float>(be, int64_t(B) * Tt * cfg.vocab_size);
  token_loss_ = DeviceArray<float>(be, int64_t(B) * Tt);
  token_lse_ = DeviceArray<float>(be, int64_t(B) * Tt);
}

SwitchT5Model::~SwitchT5Model() = default;

const float* SwitchT5Model::logits() const { return logits_.data(); }

int64_t SwitchT5Model::alltoall_bytes_sent() const {
  int64_t bytes = 0;
  for (const Stack* s : {encoder_.get(), decoder_.get()})
    for (const auto& blk : s->blocks)
      if (blk.sparse) bytes += blk.sparse->alltoall_bytes_sent();
  return bytes;
}

std::vector<std::string> SwitchT5Model::switch_layer_names() const {
  std::vector<std::string> names;
  for (const Stack* s : {encoder_.get(), decoder_.get()})
    for (size_t i = 0; i < s->blocks.size(); ++i)
      if (s->blocks[i].sparse) names.push_back(block_prefix(s->decoder, int(i)));
  return names;
}

std::string SwitchT5Model::first_nonfinite_router_logits() const {
  for (const Stack* s : {encoder_.get(), decoder_.get()})
    for (size_t i = 0; i < s->blocks.size(); ++i)
      if (s->blocks[i].sparse && s->blocks[i].sparse->router_logits_nonfinite())
        return block_prefix(s->decoder, int(i));
  return "";
}

size_t SwitchT5Model::kept_activation_bytes() const {
  return encoder_->kept_activation_bytes() + decoder_->kept_activation_bytes() +
         head_in_.bytes() + logits_.bytes() + token_loss_.bytes() + token_lse_.bytes();
}

size_t SwitchT5Model::activation_bytes() const {
  return kept_activation_bytes() + encoder_->workspace_bytes() + decoder_->workspace_bytes() +
         scratch_.bytes();
}

size_t SwitchT5Model::input_bytes() const {
  return in_.bytes() + encoder_->buckets.bytes() + decoder_->buckets.bytes();
}

int64_t SwitchT5Model::statistics_size() const {
  return kModelStatsFixed + int64_t(encoder_->switch_layers() + decoder_->switch_layers()) *
                                router_stats_size(cfg_.num_experts);
}

ForwardStats SwitchT5Model::decode_statistics(const double* stats) const {
  ForwardStats st;
  st.ce_sum = stats[kCeSum];
  st.logit_lse_sq_sum = stats[kLogitLseSqSum];
  st.target_tokens = static_cast<int64_t>(stats[kTargetTokens]);
  const int E = cfg_.num_experts;
  const double* layer = stats + kModelStatsFixed;
  for (auto [stack, out] : {std::pair{encoder_.get(), &st.encoder_router},
                            std::pair{decoder_.get(), &st.decoder_router}})
    for (int l = 0; l < stack->switch_layers(); ++l, layer += router_stats_size(E))
      out->push_back(decode_router_stats(layer, E));
  return st;
}

const ForwardStats& SwitchT5Model::forward(const Batch& batch, bool training, RandomKey seed,
                                           uint64_t first_row) {
  if (stats_acc_.size() == 0) stats_acc_ = DeviceArray<double>(be_, statistics_size());
  be_.zero_bytes(stats_acc_.data(), stats_acc_.bytes());
  forward_accumulate(batch, training, seed, first_row, stats_acc_.data());
  host_stats_.resize(stats_acc_.size());
  be_.copy_to_host(host_stats_.data(), stats_acc_.data(), stats_acc_.bytes());
  stats_ = decode_statistics(host_stats_.data());
  return stats_;
}

DeviceBatch SwitchT5Model::make_device_batch() {
  const int64_t B = shape_.batch, Ti = shape_.inputs_length, Tt = shape_.targets_length;
  DeviceBatch d;
  d.enc_ids = DeviceArray<int32_t>(be_, B * Ti);
  d.enc_mask = DeviceArray<float>(be_, B * Ti);
  d.dec_ids = DeviceArray<int32_t>(be_, B * Tt);
  d.dec_mask = DeviceArray<float>(be_, B * Tt);
  d.labels = DeviceArray<int32_t>(be_, B * Tt);
  return d;
}

void SwitchT5Model::upload(const Batch& batch, DeviceBatch& dst) {
  const int B = shape_.batch, Ti = shape_.inputs_length, Tt = shape_.targets_length;
  const int V = cfg_.vocab_size;
  SWT_CHECK(batch.batch == B && batch.inputs_length == Ti && batch.targets_length == Tt,
            "batch shape {}x{}/{} does not match the model's {}x{}/{}", batch.batch,
            batch.inputs_length, batch.targets_length, B, Ti, Tt);
  for (int32_t id : batch.encoder_input_tokens)
    SWT_CHECK(id >= 0 && id < V, "encoder token id {} outside the vocabulary [0, {})", id, V);
  for (int32_t id : batch.decoder_input_tokens)
    SWT_CHECK(id >= 0 && id < V, "decoder token id {} outside the vocabulary [0, {})", id, V);
  for (int32_t id : batch.labels)
    SWT_CHECK(id == kIgnoreLabel || (id >= 0 && id < V), "label {} outside the vocabulary", id);
  be_.copy_to_device(dst.enc_ids.data(), batch.encoder_input_tokens.data(), dst.enc_ids.bytes());
  be_.copy_to_device(dst.enc_mask.data(), batch.encoder_mask.data(), dst.enc_mask.bytes());
  be_.copy_to_device(dst.dec_ids.data(), batch.decoder_input_tokens.data(), dst.dec_ids.bytes());
  be_.copy_to_device(dst.dec_mask.data(), batch.decoder_mask.data(), dst.dec_mask.bytes());
  be_.copy_to_device(dst.labels.data(), batch.labels.data(), dst.labels.bytes());
}

void SwitchT5Model::forward_accumulate(const Batch& batch, bool training, RandomKey seed,
                                       uint64_t first_row, double* stats) {
  upload(batch, in_);
  forward_accumulate(in_, training, seed, first_row, stats);
}

void SwitchT5Model::forward_accumulate(const DeviceBatch& batch, bool training, RandomKey seed,
                                       uint64_t first_row, double* stats) {
  const int B = shape_.batch, Tt = shape_.targets_length;
  const int D = cfg_.d_model, V = cfg_.vocab_size;
  SWT_CHECK(batch.bytes() == in_.bytes(), "device batch of {} bytes for a model taking {}",
            batch.bytes(), in_.bytes());
  training_ = training;
  seed_ = seed;
  if (&batch != &in_) {
    be_.copy(in_.enc_ids.data(), batch.enc_ids.data(), in_.enc_ids.bytes());
    be_.copy(in_.enc_mask.data(), batch.enc_mask.data(), in_.enc_mask.bytes());
    be_.copy(in_.dec_ids.data(), batch.dec_ids.data(), in_.dec_ids.bytes());
    be_.copy(in_.dec_mask.data(), batch.dec_mask.data(), in_.dec_mask.bytes());
    be_.copy(in_.labels.data(), batch.labels.data(), in_.labels.bytes());
  }

  SWT_CHECK(params_.compute_dtype() == head_in_.dtype(),
            "the compute dtype changed to {} after the model was built with {} activations",
            dtype_name(params_.compute_dtype()), dtype_name(head_in_.dtype()));
  double* router_stats = stats + kModelStatsFixed;
  encoder_->forward(in_.enc_ids.data(), in_.enc_mask.data(), ActivationView(), nullptr, training, seed,
                    first_row, router_stats, scratch_.data());
  router_stats += int64_t(encoder_->switch_layers()) * router_stats_size(cfg_.num_experts);
  decoder_->forward(in_.dec_ids.data(), in_.dec_mask.data(), encoder_->out.view(), in_.enc_mask.data(),
                    training, seed, first_row, router_stats, scratch_.data());
  const int64_t N = int64_t(B) * Tt;
  // head_in in fp32: head_in_ itself, or (bf16) the decoder's sub_out, free after its forward.
  float* head_in = head_in_.f32_or(decoder_->sub_out.data());
  be_.cast(head_in, DType::kF32, decoder_->out.data(), decoder_->out.dtype(), head_in_.size());
  const ParamStore::WeightView W = params_.weight(*head_);
  if (cfg_.tie_word_embeddings)
    be_.scale(head_in, float(1.0 / std::sqrt(double(D))), head_in_.size());
  store_activation(be_, params_, head_in, head_in_.size());
  head_in_.store(be_, head_in);
  // logits = head_in W^T, kept in fp32 whatever the compute dtype: the cross-entropy and its
  // log-sum-exp run in fp32 on them.
  be_.gemm_ex(false, true, int(N), V, D, 1.0f, head_in_.data(), head_in_.dtype(), D, 0, W.data,
              W.dtype, D, 0, 0.0f, logits_.data(), DType::kF32, V, 0, 1);
  be_.cross_entropy_forward(token_loss_.data(), token_lse_.data(), logits_.data(), in_.labels.data(),
                            N, V);
  be_.accumulate_loss_statistics(stats + kCeSum, token_loss_.data(), token_lse_.data(),
                                 in_.labels.data(), N);
}

double SwitchT5Model::objective(const ForwardStats& st, const LossWeights& w) const {
  double j = w.ce_scale * (st.ce_sum + w.logit_z_loss * st.logit_lse_sq_sum);
  for (const auto* layers : {&st.encoder_router, &st.decoder_router})
    for (const RouterStats& r : *layers)
      j += (cfg_.router_aux_loss_coef * r.balance_loss + cfg_.router_z_loss_coef * r.z_loss) /
           w.microbatches;
  return j;
}

void SwitchT5Model::backward(const LossWeights& w, GradientReadyListener* ready) {
  const int B = shape_.batch, Tt = shape_.targets_length;
  const int D = cfg_.d_model, V = cfg_.vocab_size;
  const int64_t N = int64_t(B) * Tt;
  // Head: logits = head_in W^T, dlogits in place of the logits.
  be_.cross_entropy_backward(logits_.data(), logits_.data(), token_lse_.data(), in_.labels.data(), N,
                             V, w.ce_scale_device ? 1.0f : float(w.ce_scale), w.ce_scale_device,
                             float(w.logit_z_loss));
  const bool tied = cfg_.tie_word_embeddings;
  store_activation(be_, params_, logits_.data(), logits_.size());  // dlogits feed bf16 GEMMs
  linear_backward_weight(be_, params_, *head_, logits_.data(), head_in_.view(), int(N), D, V);
  if (!tied) Stack::report(ready, params_, head_);  // tied: shared.weight also gets the embeddings
  // dJ/d(decoder output): in head_in_ (fp32), dead once dW is formed; bf16: in the decoder's
  // sub_out, which its backward consumes as dout before any sublayer writes there.
  float* d_dec_out = head_in_.f32_or(decoder_->sub_out.data());
  linear_backward_input(be_, d_dec_out, logits_.data(), params_.weight(*head_), int(N), D, V,
                        false);
  if (tied) be_.scale(d_dec_out, float(1.0 / std::sqrt(double(D))), head_in_.size());
  store_activation(be_, params_, d_dec_out, head_in_.size());

  // Router loss weights: lb is a mean over a stack's groups and z a mean over its tokens, both
  // summed over the micro-batches of the global batch.
  auto router_scales = [&](const Stack& s, float& lb_scale, float& z_scale) {
    const double groups = double(s.N) / s.S, tokens = s.N;
    lb_scale = float(cfg_.router_aux_loss_coef / (groups * w.microbatches));
    z_scale = float(cfg_.router_z_loss_coef / (tokens * w.microbatches));
  };
  float lb, z;
  DeviceArray<float>& d_enc = encoder_->sub_out;  // encoder's sub_out is free during backward
  be_.fill(d_enc.data(), 0.0f, d_enc.size());
  router_scales(*decoder_, lb, z);
  decoder_->backward(d_dec_out, in_.dec_ids.data(), d_enc.data(), lb, z, scratch_.data(), ready);
  // The encoder output feeds every decoder block's column-parallel k/v projections: f's backward.
  TensorParallel(parallel_.model_group).f_backward(d_enc.data(), d_enc.size());
  router_scales(*encoder_, lb, z);
  encoder_->backward(d_enc.data(), in_.enc_ids.data(), nullptr, lb, z, scratch_.data(), ready);
  Stack::report(ready, params_, &params_.info("shared.weight"));
  params_.finish_grads();  // any parameter this pass did not write (none in these models) is 0
}

}  // namespace switcht5
