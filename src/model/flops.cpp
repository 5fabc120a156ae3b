#include "model/flops.h"

#include <algorithm>

#include "model/model.h"
#include "model/params.h"
#include "model/router.h"

namespace switcht5 {

double forward_matmul_flops(const ModelConfig& cfg, int batch, int inputs_length,
                            int targets_length, bool training, bool executed) {
  const double D = cfg.d_model, F = cfg.d_ff, HK = double(cfg.num_heads) * cfg.d_kv;
  const double E = cfg.num_experts, V = cfg.vocab_size;
  const double ff_mats = cfg.feed_forward_proj == "gated-gelu" ? 3.0 : 2.0;
  auto attention = [&](double Nq, double Nk, double Tk) {
    // q,o over query tokens; k,v over key tokens; scores and context: 2 * Nq * Tk * HK each.
    return 2.0 * (2.0 * Nq * D * HK + 2.0 * Nk * D * HK) + 2.0 * 2.0 * Nq * Tk * HK;
  };
  auto stack = [&](bool decoder, int T, int layers, int step) {
    const double N = double(batch) * T, Nenc = double(batch) * inputs_length;
    double f = 0.0;
    for (int i = 0; i < layers; ++i) {
      f += attention(N, N, T);
      if (decoder) f += attention(N, Nenc, inputs_length);
      if (is_sparse_layer(step, i)) {
        const int S = cfg.group_size > 0 ? cfg.group_size : T;
        const double rows = executed ? (N / S) * expert_capacity(cfg, S, training) * E : N;
        f += 2.0 * N * D * E + 2.0 * ff_mats * rows * D * F;
      } else {
        f += 2.0 * ff_mats * N * D * F;
      }
    }
    return f;
  };
  return stack(false, inputs_length, cfg.num_layers, cfg.encoder_sparse_step) +
         stack(true, targets_length, cfg.num_decoder_layers, cfg.decoder_sparse_step) +
         2.0 * double(batch) * targets_length * D * V;
}

int64_t active_parameters(const ModelConfig& cfg) {
  ParamStore ps;
  register_model_params(ps, cfg);
  int64_t active = 0;
  for (const ParamInfo& p : ps.infos())
    active += p.kind == ParamKind::kStacked ? p.numel / std::max<int64_t>(1, p.shape[0]) : p.numel;
  return active;
}

}  // namespace switcht5
