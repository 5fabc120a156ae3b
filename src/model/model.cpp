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
uint64_t site_seed(uint64_t seed, bool decoder, int block, int site) {
  return derive_seed(seed, (uint64_t(decoder) << 40) | (uint64_t(block + 1) << 8) | uint64_t(site));
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
  DeviceArray<float> normed;  // [N,D] rmsnorm(h_prev), the sublayer input
  DeviceArray<float> rstd;    // [N]
  DeviceArray<float> h_next;  // [N,D]
  const float* h_prev = nullptr;
  uint64_t seed = 0;
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
  DeviceArray<float> bias, dbias;        // [H,T,T]
  DeviceArray<float> h0;                 // [N,D] dropout(embed)
  DeviceArray<float> out;                // [N,D] dropout(rmsnorm_final(h_L))
  DeviceArray<float> final_rstd;         // [N]
  DeviceArray<float> sub_out;            // [N,D] sublayer output (scratch)
  DeviceArray<float> dh, dtmp, dnormed;  // [N,D] backward scratch
  uint64_t embed_seed = 0, final_seed = 0;
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
      r.normed = DeviceArray<float>(be, int64_t(N) * D);
      r.rstd = DeviceArray<float>(be, N);
      r.h_next = DeviceArray<float>(be, int64_t(N) * D);
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
                       expert_capacity(cfg, S, false), gated, mp.expert_group, tp};
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
    h0 = DeviceArray<float>(be, int64_t(N) * D);
    out = DeviceArray<float>(be, int64_t(N) * D);
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
        s = std::max(s, blk.dense->scratch_floats());
      else
        s = std::max({s, blk.sparse->scratch_floats(), blk.sparse->forward_scratch_floats()});
    }
    return s;
  }

  // r.h_next = h_prev + dropout(sub(rmsnorm(h_prev))); `sub` writes its output to sub_out.
  template <class Sub>
  void residual_forward(NormedResidual& r, const float* h_prev, uint64_t seed, Sub&& sub) {
    const int64_t n = int64_t(N) * D;
    r.h_prev = h_prev;
    r.seed = seed;
    be.rmsnorm_forward(r.normed.data(), r.rstd.data(), h_prev, ps.master(*r.ln), N, D,
                       float(cfg.layer_norm_epsilon));
    store_activation(be, ps, r.normed.data(), n);  // bf16: statistics fp32, output bf16
    sub(sub_out.data(), r.normed.data());
    be.dropout(sub_out.data(), sub_out.data(), n, dropout_p, seed);
    store_activation(be, ps, sub_out.data(), n);
    be.add(r.h_next.data(), h_prev, sub_out.data(), n);
    store_activation(be, ps, r.h_next.data(), n);  // the residual stream is bf16 too
  }

  // dh holds dJ/dh_next on entry and dJ/dh_prev on exit. `sub_backward(dnormed, dsub)`.
  template <class SubBackward>
  void residual_backward(NormedResidual& r, SubBackward&& sub_backward) {
    const int64_t n = int64_t(N) * D;
    be.dropout(dtmp.data(), dh.data(), n, dropout_p, r.seed);
    store_activation(be, ps, dtmp.data(), n);
    sub_backward(dnormed.data(), dtmp.data());
    be.rmsnorm_backward(dtmp.data(), ps.grad(*r.ln), dnormed.data(), r.h_prev,
                        ps.master(*r.ln), r.rstd.data(), N, D);
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
  void forward(const int32_t* ids, const float* mask, const float* enc, const float* enc_mask,
               bool training, uint64_t seed, uint64_t first_row, double* router_stats,
               float* scratch) {
    const int64_t n = int64_t(N) * D;
    dropout_p = training ? float(cfg.dropout_rate) : 0.0f;
    const float expert_dropout = training ? float(cfg.expert_dropout) : 0.0f;
    // Dropout masks are indexed within this batch, so each micro-batch gets its own seed; router
    // jitter is indexed by global position and keeps the step's seed.
    const uint64_t drop = derive_seed(seed, first_row + 1);
    embed_seed = site_seed(drop, decoder, -1, 0);
    final_seed = site_seed(drop, decoder, -1, 1);
    be.embedding_forward(h0.data(), ids, ps.master(*embedding), N, D);
    store_activation(be, ps, h0.data(), n);  // the rows of the bf16 compute copy
    be.dropout(h0.data(), h0.data(), n, dropout_p, embed_seed);
    store_activation(be, ps, h0.data(), n);
    be.relpos_bias_forward(bias.data(), ps.master(*relbias), buckets.data(),
                           H, T, T);
    const float* h = h0.data();
    double* layer_stats = router_stats;
    for (size_t i = 0; i < blocks.size(); ++i) {
      Block& blk = blocks[i];
      const int bi = static_cast<int>(i);
      residual_forward(blk.attn, h, site_seed(drop, decoder, bi, 0), [&](float* o, const float* x) {
        blk.self_attention->forward(o, x, x, bias.data(), mask, dropout_p,
                                    site_seed(drop, decoder, bi, 1), scratch);
        tp.g_forward(o, int64_t(N) * D);
      });
      h = blk.attn.h_next.data();
      if (decoder) {
        residual_forward(blk.cross, h, site_seed(drop, decoder, bi, 2),
                         [&](float* o, const float* x) {
                           blk.cross_attention->forward(o, x, enc, nullptr, enc_mask, dropout_p,
                                                        site_seed(drop, decoder, bi, 3), scratch);
                           tp.g_forward(o, int64_t(N) * D);
                         });
        h = blk.cross.h_next.data();
      }
      residual_forward(blk.ff, h, site_seed(drop, decoder, bi, 4), [&](float* o, const float* x) {
        if (blk.dense) {
          blk.dense->forward(o, x, N, dropout_p, site_seed(drop, decoder, bi, 5));
          tp.g_forward(o, int64_t(N) * D);
        } else {
          blk.sparse->forward_accumulate(o, x, training, float(cfg.router_jitter_noise),
                                         expert_dropout, site_seed(seed, decoder, bi, 6),
                                         first_row * T * D, first_row, layer_stats, scratch);
          layer_stats += router_stats_size(cfg.num_experts);
        }
      });
      h = blk.ff.h_next.data();
    }
    be.rmsnorm_forward(out.data(), final_rstd.data(), h, ps.master(*final_ln), N, D,
                       float(cfg.layer_norm_epsilon));
    be.dropout(out.data(), out.data(), n, dropout_p, final_seed);
    store_activation(be, ps, out.data(), n);
  }

  const float* last_hidden() const {
    const Block& last = blocks.back();
    return last.ff.h_next.data();
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

  static void report(GradientReadyListener* ready, const ParamInfo* p) {
    if (ready) ready->on_gradients_ready(p->offset, p->offset + p->numel);
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
    be.rmsnorm_backward(dh.data(), ps.grad(*final_ln), dout, last_hidden(),
                        ps.master(*final_ln), final_rstd.data(), N, D);
    report(ready, final_ln);
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
        for (const ParamInfo* p : block_params[size_t(i)]) report(ready, p);
    }
    be.relpos_bias_backward(ps.grad(*relbias), dbias.data(), buckets.data(),
                            H, T, T, cfg.relative_attention_num_buckets);
    report(ready, relbias);
    be.dropout(dh.data(), dh.data(), n, dropout_p, embed_seed);
    be.embedding_backward(ps.grad(*embedding), ids, dh.data(), N, D,
                          cfg.vocab_size);
  }

  int64_t activation_floats() const {
    int64_t s = 0;
    for (const Block& blk : blocks) {
      for (const NormedResidual* r : {&blk.attn, &blk.cross, &blk.ff})
        s += r->normed.size() + r->rstd.size() + r->h_next.size();
      s += blk.self_attention->activation_floats();
      if (blk.cross_attention) s += blk.cross_attention->activation_floats();
      s += blk.dense ? blk.dense->activation_floats() : blk.sparse->activation_floats();
    }
    return s + bias.size() * 2 + 6 * int64_t(N) * D;
  }
};

// ---- model ---------------------------------------------------------------------------------------

SwitchT5Model::SwitchT5Model(Backend& be, const ModelConfig& cfg, ModelShape shape,
                             ModelParallelism parallel)
    : be_(be), cfg_(cfg), shape_(shape), parallel_(parallel) {
  SWT_CHECK(cfg_.num_decoder_layers >= 1 && cfg_.num_layers >= 1, "unresolved layer counts");
  register_model_params(params_, cfg_, parallel.sharding);
  params_.allocate(be);
  head_ = &params_.info(cfg_.tie_word_embeddings ? "shared.weight" : "lm_head.weight");
  const int B = shape.batch, Ti = shape.inputs_length, Tt = shape.targets_length;
  encoder_ = std::make_unique<Stack>(be, cfg_, params_, false, B, Ti, Ti, parallel);
  decoder_ = std::make_unique<Stack>(be, cfg_, params_, true, B, Tt, Ti, parallel);
  scratch_ = DeviceArray<float>(be, std::max(encoder_->scratch_floats(), decoder_->scratch_floats()));
  enc_ids_ = DeviceArray<int32_t>(be, int64_t(B) * Ti);
  enc_mask_ = DeviceArray<float>(be, int64_t(B) * Ti);
  dec_ids_ = DeviceArray<int32_t>(be, int64_t(B) * Tt);
  dec_mask_ = DeviceArray<float>(be, int64_t(B) * Tt);
  labels_ = DeviceArray<int32_t>(be, int64_t(B) * Tt);
  head_in_ = DeviceArray<float>(be, int64_t(B) * Tt * cfg.d_model);
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

int64_t SwitchT5Model::activation_floats() const {
  return encoder_->activation_floats() + decoder_->activation_floats() + scratch_.size() +
         head_in_.size() + logits_.size();
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

const ForwardStats& SwitchT5Model::forward(const Batch& batch, bool training, uint64_t seed,
                                           uint64_t first_row) {
  if (stats_acc_.size() == 0) stats_acc_ = DeviceArray<double>(be_, statistics_size());
  be_.zero_bytes(stats_acc_.data(), stats_acc_.bytes());
  forward_accumulate(batch, training, seed, first_row, stats_acc_.data());
  host_stats_.resize(stats_acc_.size());
  be_.copy_to_host(host_stats_.data(), stats_acc_.data(), stats_acc_.bytes());
  stats_ = decode_statistics(host_stats_.data());
  return stats_;
}

void SwitchT5Model::forward_accumulate(const Batch& batch, bool training, uint64_t seed,
                                       uint64_t first_row, double* stats) {
  const int B = shape_.batch, Ti = shape_.inputs_length, Tt = shape_.targets_length;
  const int D = cfg_.d_model, V = cfg_.vocab_size;
  SWT_CHECK(batch.batch == B && batch.inputs_length == Ti && batch.targets_length == Tt,
            "batch shape {}x{}/{} does not match the model's {}x{}/{}", batch.batch,
            batch.inputs_length, batch.targets_length, B, Ti, Tt);
  for (int32_t id : batch.encoder_input_tokens)
    SWT_CHECK(id >= 0 && id < V, "encoder token id {} outside the vocabulary [0, {})", id, V);
  for (int32_t id : batch.decoder_input_tokens)
    SWT_CHECK(id >= 0 && id < V, "decoder token id {} outside the vocabulary [0, {})", id, V);
  for (int32_t id : batch.labels)
    SWT_CHECK(id == kIgnoreLabel || (id >= 0 && id < V), "label {} outside the vocabulary", id);
  training_ = training;
  seed_ = seed;
  be_.copy_to_device(enc_ids_.data(), batch.encoder_input_tokens.data(), enc_ids_.bytes());
  be_.copy_to_device(enc_mask_.data(), batch.encoder_mask.data(), enc_mask_.bytes());
  be_.copy_to_device(dec_ids_.data(), batch.decoder_input_tokens.data(), dec_ids_.bytes());
  be_.copy_to_device(dec_mask_.data(), batch.decoder_mask.data(), dec_mask_.bytes());
  be_.copy_to_device(labels_.data(), batch.labels.data(), labels_.bytes());

  double* router_stats = stats + kModelStatsFixed;
  encoder_->forward(enc_ids_.data(), enc_mask_.data(), nullptr, nullptr, training, seed,
                    first_row, router_stats, scratch_.data());
  router_stats += int64_t(encoder_->switch_layers()) * router_stats_size(cfg_.num_experts);
  decoder_->forward(dec_ids_.data(), dec_mask_.data(), encoder_->out.data(), enc_mask_.data(),
                    training, seed, first_row, router_stats, scratch_.data());
  const int64_t N = int64_t(B) * Tt;
  be_.copy(head_in_.data(), decoder_->out.data(), head_in_.bytes());
  const ParamStore::WeightView W = params_.weight(*head_);
  if (cfg_.tie_word_embeddings)
    be_.scale(head_in_.data(), float(1.0 / std::sqrt(double(D))), head_in_.size());
  store_activation(be_, params_, head_in_.data(), head_in_.size());
  // logits = head_in W^T, kept in fp32 whatever the compute dtype: the cross-entropy and its
  // log-sum-exp run in fp32 on them.
  be_.gemm_ex(false, true, int(N), V, D, 1.0f, head_in_.data(), DType::kF32, D, 0, W.data,
              W.dtype, D, 0, 0.0f, logits_.data(), DType::kF32, V, 0, 1);
  be_.cross_entropy_forward(token_loss_.data(), token_lse_.data(), logits_.data(), labels_.data(),
                            N, V);
  be_.accumulate_loss_statistics(stats + kCeSum, token_loss_.data(), token_lse_.data(),
                                 labels_.data(), N);
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
  be_.cross_entropy_backward(logits_.data(), logits_.data(), token_lse_.data(), labels_.data(), N,
                             V, float(w.ce_scale), float(w.logit_z_loss));
  const bool tied = cfg_.tie_word_embeddings;
  float* dW = params_.grad(*head_);
  store_activation(be_, params_, logits_.data(), logits_.size());  // dlogits feed bf16 GEMMs
  linear_backward_weight(be_, dW, logits_.data(), head_in_.data(), int(N), D, V);
  if (!tied) Stack::report(ready, head_);  // tied: shared.weight also gets the embeddings
  float* d_dec_out = head_in_.data();  // head_in is dead once dW is formed
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
  decoder_->backward(d_dec_out, dec_ids_.data(), d_enc.data(), lb, z, scratch_.data(), ready);
  // The encoder output feeds every decoder block's column-parallel k/v projections: f's backward.
  TensorParallel(parallel_.model_group).f_backward(d_enc.data(), d_enc.size());
  router_scales(*encoder_, lb, z);
  encoder_->backward(d_enc.data(), enc_ids_.data(), nullptr, lb, z, scratch_.data(), ready);
  Stack::report(ready, &params_.info("shared.weight"));
}

}  // namespace switcht5
