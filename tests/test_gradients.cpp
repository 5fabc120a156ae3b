// Finite-difference checks of every hand-written backward, on the reference backend (plain loops,
// double accumulation). Each layer test builds a scalar L = sum(out * R) (+ the layer's own loss
// terms) for a fixed random R, runs backward with dout = R, and compares every analytic gradient
// entry it samples with the central difference (L(x + h) - L(x - h)) / 2h.
//
// Dropout masks and router jitter are counter-based functions of a seed (core/rng.h), so a layer
// with dropout or jitter on is a deterministic function of its inputs for a fixed seed, and can be
// differentiated numerically too: the Switch checks run with jitter on, so the router-input
// gradient through the jitter (the same multiplicative noise applied to dxr) is checked.
#include <algorithm>
#include <cmath>
#include <limits>
#include <functional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/backend.h"
#include "config/config.h"
#include "core/rng.h"
#include "model/attention.h"
#include "model/feed_forward.h"
#include "model/model.h"
#include "model/switch_ffn.h"
#include "test_util.h"

namespace switcht5 {
namespace {

using testing::download;
using testing::random_vector;
using testing::upload;

// Step and tolerance for an fp32 forward with double accumulation: |fd - an| must be below
// kAtol + kRtol * max(|fd|, |an|).
//
// ReLU and top-1 routing make the objective piecewise smooth: a step can cross a kink (ReLU) or
// a jump (a token changing expert or losing its capacity slot). On a kink or jump inside
// [x-h, x+h] the central difference is meaningless, but the analytic gradient still equals the
// one-sided difference on the side that stays within one smooth piece. So an entry passes when
// the central difference or either one-sided difference matches; a wrong gradient cannot match
// by accident.
constexpr double kStep = 1e-3;
constexpr double kRtol = 2e-2;
constexpr double kAtol = 3e-4;
// Router jitter eps in the Switch checks. Larger than the configs' 0.01 on purpose: a backward
// that forgets the jitter on the router-input gradient is off by a factor within 1 +- eps on the
// router's share of dx only, which must stand out against kRtol. Measured with that mutation:
// eps = 0.1 fails 270 sampled entries over the 5 jittered checks, eps = 0.01 only 4.
constexpr float kJitterEps = 0.1f;

double dot(Backend& be, const float* a, const std::vector<float>& r) {
  auto h = download(be, a, int64_t(r.size()));
  double s = 0;
  for (size_t i = 0; i < r.size(); ++i) s += double(h[i]) * r[i];
  return s;
}

struct Differences {
  double central, forward, backward;
};

// Differences of `loss` w.r.t. entry i of the backend array `x`.
Differences numeric_grad(Backend& be, float* x, int64_t i, const std::function<double()>& loss) {
  float v;
  be.copy_to_host(&v, x + i, sizeof(float));
  const float plus = v + float(kStep), minus = v - float(kStep);
  const double l0 = loss();
  be.copy_to_device(x + i, &plus, sizeof(float));
  const double lp = loss();
  be.copy_to_device(x + i, &minus, sizeof(float));
  const double lm = loss();
  be.copy_to_device(x + i, &v, sizeof(float));
  return {(lp - lm) / (double(plus) - double(minus)), (lp - l0) / (double(plus) - double(v)),
          (l0 - lm) / (double(v) - double(minus))};
}

bool close(double fd, double an) {
  return std::fabs(fd - an) <= kAtol + kRtol * std::max(std::fabs(fd), std::fabs(an));
}

// Compares analytic gradient `an` (host copy) of array `x` with finite differences at up to
// `samples` entries (all when n <= samples). Returns the number of entries checked.
int check_entries(Backend& be, const std::string& what, float* x, const std::vector<float>& an,
                  const std::function<double()>& loss, int samples = 24) {
  const int64_t n = int64_t(an.size());
  CounterRng rng(n * 7919 + what.size());
  int checked = 0;
  double max_an = 0;
  for (float g : an) max_an = std::max(max_an, double(std::fabs(g)));
  EXPECT_GT(max_an, 0.0) << what << ": the analytic gradient is identically zero";
  for (int s = 0; s < std::min<int64_t>(n, samples); ++s) {
    const int64_t i = n <= samples ? s : int64_t(rng.next_below(uint64_t(n)));
    const Differences fd = numeric_grad(be, x, i, loss);
    const double a = an[i];
    EXPECT_TRUE(close(fd.central, a) || close(fd.forward, a) || close(fd.backward, a))
        << what << "[" << i << "]: analytic " << a << " vs numeric " << fd.central
        << " (one-sided " << fd.forward << ", " << fd.backward << ")";
    ++checked;
  }
  return checked;
}

// Gradient of a whole ParamStore: samples entries of every parameter tensor.
void check_params(Backend& be, ParamStore& ps, const std::function<double()>& loss,
                  int samples_per_param = 8) {
  const auto grads = download(be, ps.grads(), ps.total_numel());
  for (const ParamInfo& p : ps.infos()) {
    std::vector<float> an(grads.begin() + p.offset, grads.begin() + p.offset + p.numel);
    check_entries(be, p.name, ps.values() + p.offset, an, loss, samples_per_param);
  }
}

std::unique_ptr<Backend> reference() { return make_backend("reference"); }

// ---- RMSNorm -------------------------------------------------------------------------------------

TEST(Gradients, RmsNorm) {
  auto be = reference();
  const int N = 5, D = 7;
  auto x = upload(*be, random_vector(N * D, 1, -2, 2));
  auto w = upload(*be, random_vector(D, 2, 0.5, 1.5));
  const auto R = random_vector(N * D, 3);
  DeviceArray<float> out(*be, N * D), rstd(*be, N), dx(*be, N * D), dw(*be, D);
  auto loss = [&] {
    be->rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, D, 1e-6f);
    return dot(*be, out.data(), R);
  };
  loss();
  auto dout = upload(*be, R);
  be->rmsnorm_backward(dx.data(), dw.data(), dout.data(), x.data(), w.data(), rstd.data(), N, D);
  check_entries(*be, "dx", x.data(), download(*be, dx.data(), N * D), loss, 100);
  check_entries(*be, "dw", w.data(), download(*be, dw.data(), D), loss, 100);
}

// ---- attention -------------------------------------------------------------------------------------

struct AttentionCase {
  const char* name;
  bool causal, self, with_bias, with_mask;
  float dropout;
};

class AttentionGrad : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(AttentionGrad, MatchesFiniteDifferences) {
  const AttentionCase c = GetParam();
  auto be = reference();
  const int B = 2, H = 2, K = 3, D = 5;
  const int Tq = 4, Tk = c.self ? 4 : 6;
  ParamStore ps;
  Attention::register_params(ps, "attn", D, H, K, /*init_scale=*/1.0);
  ps.allocate(*be);
  ps.initialize(*be, 11);
  Attention attn(*be, ps, "attn", {B, Tq, Tk, D, H, K, c.causal});
  auto xq = upload(*be, random_vector(B * Tq * D, 4));
  auto xkv_store = upload(*be, random_vector(B * Tk * D, 5));
  float* xkv = c.self ? xq.data() : xkv_store.data();
  auto bias = upload(*be, random_vector(H * Tq * Tk, 6));
  std::vector<float> mask_h(B * Tk, 1.0f);
  mask_h[Tk - 1] = 0.0f;             // batch 0: last key is padding
  mask_h[Tk + 1] = 0.0f;             // batch 1: second key is padding
  auto mask = upload(*be, mask_h);
  const float* bias_p = c.with_bias ? bias.data() : nullptr;
  const float* mask_p = c.with_mask ? mask.data() : nullptr;
  const auto R = random_vector(B * Tq * D, 7);
  DeviceArray<float> out(*be, B * Tq * D);
  auto loss = [&] {
    attn.forward(out.data(), xq.data(), xkv, bias_p, mask_p, c.dropout, 99);
    return dot(*be, out.data(), R);
  };
  loss();
  DeviceArray<float> dxq(*be, B * Tq * D), dxkv(*be, B * Tk * D), dbias(*be, H * Tq * Tk);
  DeviceArray<float> scratch(*be, attn.scratch_floats());
  auto dout = upload(*be, R);
  attn.backward(dxq.data(), c.self ? dxq.data() : dxkv.data(), c.with_bias ? dbias.data() : nullptr,
                dout.data(), scratch.data());
  check_params(*be, ps, loss);
  check_entries(*be, "dxq", xq.data(), download(*be, dxq.data(), B * Tq * D), loss);
  if (!c.self)
    check_entries(*be, "dxkv", xkv, download(*be, dxkv.data(), B * Tk * D), loss);
  if (c.with_bias)
    check_entries(*be, "dbias", bias.data(), download(*be, dbias.data(), H * Tq * Tk), loss);
}

INSTANTIATE_TEST_SUITE_P(
    Layers, AttentionGrad,
    ::testing::Values(AttentionCase{"bidirectional_self_bias_mask", false, true, true, true, 0.0f},
                      AttentionCase{"causal_self_bias", true, true, true, false, 0.0f},
                      AttentionCase{"causal_self_bias_mask_dropout", true, true, true, true, 0.3f},
                      AttentionCase{"cross_mask", false, false, false, true, 0.0f}),
    [](const auto& info) { return std::string(info.param.name); });

// Relative position bias gather: bias = table[buckets]; the backward scatters back.
TEST(Gradients, RelativePositionBias) {
  auto be = reference();
  const int H = 3, Tq = 5, Tk = 5, NB = 6;
  auto table = upload(*be, random_vector(NB * H, 8));
  std::vector<int32_t> b(Tq * Tk);
  for (int i = 0; i < Tq; ++i)
    for (int j = 0; j < Tk; ++j) b[i * Tk + j] = (j - i + Tq) % NB;
  auto buckets = upload(*be, b);
  const auto R = random_vector(H * Tq * Tk, 9);
  DeviceArray<float> bias(*be, H * Tq * Tk), dtable(*be, NB * H);
  auto loss = [&] {
    be->relpos_bias_forward(bias.data(), table.data(), buckets.data(), H, Tq, Tk);
    return dot(*be, bias.data(), R);
  };
  loss();
  auto dbias = upload(*be, R);
  be->relpos_bias_backward(dtable.data(), dbias.data(), buckets.data(), H, Tq, Tk, NB);
  check_entries(*be, "dtable", table.data(), download(*be, dtable.data(), NB * H), loss, 100);
}

// ---- feed-forward ----------------------------------------------------------------------------------

struct FfnCase {
  const char* name;
  bool gated;
  int count;
  float dropout;
};

class FeedForwardGrad : public ::testing::TestWithParam<FfnCase> {};

TEST_P(FeedForwardGrad, MatchesFiniteDifferences) {
  const FfnCase c = GetParam();
  auto be = reference();
  const int N = 6, D = 5, F = 7;
  ParamStore ps;
  FeedForward::register_params(ps, "mlp", c.count, c.count > 1, D, F, c.gated, 1.0);
  ps.allocate(*be);
  ps.initialize(*be, 12);
  FeedForward ffn(*be, ps, "mlp", c.count, N, D, F, c.gated);
  auto x = upload(*be, random_vector(c.count * N * D, 13, -2, 2));
  const auto R = random_vector(c.count * N * D, 14);
  DeviceArray<float> out(*be, c.count * N * D), dx(*be, c.count * N * D);
  DeviceArray<float> scratch(*be, ffn.scratch_floats());
  auto loss = [&] {
    ffn.forward(out.data(), x.data(), N, c.dropout, 5);
    return dot(*be, out.data(), R);
  };
  loss();
  auto dout = upload(*be, R);
  ffn.backward(dx.data(), dout.data(), scratch.data());
  check_params(*be, ps, loss, 16);
  check_entries(*be, "dx", x.data(), download(*be, dx.data(), c.count * N * D), loss, 40);
}

INSTANTIATE_TEST_SUITE_P(Layers, FeedForwardGrad,
                         ::testing::Values(FfnCase{"relu", false, 1, 0.0f},
                                           FfnCase{"gated_gelu", true, 1, 0.0f},
                                           FfnCase{"relu_stacked3_dropout", false, 3, 0.25f},
                                           FfnCase{"gated_gelu_stacked3", true, 3, 0.0f}),
                         [](const auto& info) { return std::string(info.param.name); });

// ---- Switch layer: router (with capacity drops), both auxiliary losses, experts ---------------------

class SwitchGrad : public ::testing::TestWithParam<bool> {};

TEST_P(SwitchGrad, MatchesFiniteDifferences) {
  const bool gated = GetParam();
  auto be = reference();
  // 2 groups of 8 tokens, 4 experts, capacity 1: several tokens are dropped per group.
  const int T = 16, S = 8, D = 5, F = 6, E = 4;
  ParamStore ps;
  SwitchFFN::register_params(ps, "mlp", D, F, E, gated, 1.0);
  ps.allocate(*be);
  ps.initialize(*be, 21);
  SwitchFFN sw(*be, ps, "mlp", {T, S, D, F, E, /*capacity_train=*/2, /*capacity_eval=*/2, gated});
  auto x = upload(*be, random_vector(T * D, 22, -2, 2));
  const auto R = random_vector(T * D, 23);
  const float lb_scale = 0.7f, z_scale = 0.05f;
  DeviceArray<float> out(*be, T * D), dx(*be, T * D);
  DeviceArray<float> scratch(*be, sw.scratch_floats());
  RouterStats st;
  // Router jitter xr = x * U(1-eps, 1+eps), keyed by a fixed seed and placed at a nonzero offset
  // in the global router input (kJitterEps explains the size of eps).
  float jitter_eps = kJitterEps;
  const uint64_t jitter_offset = 1000;
  auto loss = [&] {
    st = sw.forward(out.data(), x.data(), /*training=*/true, jitter_eps, /*expert_dropout=*/0.0f,
                    3, jitter_offset);
    // sum_g lb[g] = G * mean;  sum_t lse^2 = T * mean.
    return dot(*be, out.data(), R) + lb_scale * (T / S) * st.balance_loss +
           z_scale * T * st.z_loss;
  };
  // The jitter reaches the forward: the objective differs from the one without it.
  jitter_eps = 0.0f;
  const double without_jitter = loss();
  jitter_eps = kJitterEps;
  ASSERT_NE(loss(), without_jitter) << "router jitter has no effect on the forward";
  ASSERT_GT(st.dropped, 0) << "the test must exercise capacity drops";
  ASSERT_LT(st.dropped, T);
  auto dout = upload(*be, R);
  sw.backward(dx.data(), dout.data(), lb_scale, z_scale, scratch.data());
  check_params(*be, ps, loss, 20);
  check_entries(*be, "dx", x.data(), download(*be, dx.data(), T * D), loss, 80);
}

INSTANTIATE_TEST_SUITE_P(Layers, SwitchGrad, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "gated_gelu" : "relu"; });

// The router's loss terms alone (no expert output): isolates the load-balancing and z-loss
// gradients from the gate path.
TEST(Gradients, RouterAuxLossesOnly) {
  auto be = reference();
  const int G = 3, S = 5, E = 4, T = G * S;
  auto logits = upload(*be, random_vector(T * E, 31, -2, 2));
  DeviceArray<float> probs(*be, T * E), lse(*be, T), gate(*be, T), counts(*be, G * E), lb(*be, G);
  DeviceArray<int32_t> expert(*be, T), slot(*be, T), rows(*be, E);
  DeviceArray<float> dgate(*be, T), dlogits(*be, T * E);
  const float lb_scale = 1.3f, z_scale = 0.2f;
  auto loss = [&] {
    be->router_forward(probs.data(), lse.data(), expert.data(), slot.data(), rows.data(),
                       gate.data(), counts.data(), logits.data(), G, S, E, 2);
    be->router_balance_loss(lb.data(), probs.data(), counts.data(), G, S, E);
    return lb_scale * be->sum(lb.data(), G) + z_scale * be->sum_squares(lse.data(), T);
  };
  loss();
  be->router_backward(dlogits.data(), probs.data(), lse.data(), expert.data(), dgate.data(),
                      counts.data(), G, S, E, lb_scale, z_scale);
  check_entries(*be, "dlogits", logits.data(), download(*be, dlogits.data(), T * E), loss, 100);
}

// ---- cross-entropy with ignored labels and logit z-loss ----------------------------------------------

TEST(Gradients, CrossEntropyIgnoredLabelsAndZLoss) {
  auto be = reference();
  const int N = 6, V = 9;
  auto logits = upload(*be, random_vector(N * V, 41, -3, 3));
  std::vector<int32_t> labels_h = {3, -100, 0, 8, -100, 5};
  auto labels = upload(*be, labels_h);
  DeviceArray<float> loss_t(*be, N), lse(*be, N), dlogits(*be, N * V);
  const float scale = 0.25f, z = 0.1f;
  auto loss = [&] {
    be->cross_entropy_forward(loss_t.data(), lse.data(), logits.data(), labels.data(), N, V);
    auto l = download(*be, loss_t.data(), N);
    auto s = download(*be, lse.data(), N);
    double j = 0;
    for (int r = 0; r < N; ++r)
      if (labels_h[r] != -100) j += l[r] + z * double(s[r]) * s[r];
    return scale * j;
  };
  loss();
  be->cross_entropy_backward(dlogits.data(), logits.data(), lse.data(), labels.data(), N, V, scale,
                             nullptr, z);
  const auto an = download(*be, dlogits.data(), N * V);
  for (int v = 0; v < V; ++v) {  // ignored rows get exactly zero gradient
    EXPECT_EQ(an[1 * V + v], 0.0f);
    EXPECT_EQ(an[4 * V + v], 0.0f);
  }
  check_entries(*be, "dlogits", logits.data(), an, loss, 100);
}

// ---- the whole model -----------------------------------------------------------------------------------

struct ModelCase {
  const char* name;
  int sparse_step;
  const char* ffn;
  bool tied;
  float dropout;
  float jitter;  // router jitter eps (Switch cases)
};

class ModelGrad : public ::testing::TestWithParam<ModelCase> {};

ModelConfig tiny_model(const ModelCase& c) {
  ModelConfig m;
  m.vocab_size = 24;
  m.d_model = 8;
  m.d_ff = 12;
  m.d_kv = 3;
  m.num_heads = 2;
  m.num_layers = 2;
  m.num_decoder_layers = 2;
  m.num_experts = 3;
  m.encoder_sparse_step = c.sparse_step;
  m.decoder_sparse_step = c.sparse_step;
  m.relative_attention_num_buckets = 8;
  m.relative_attention_max_distance = 16;
  m.feed_forward_proj = c.ffn;
  m.tie_word_embeddings = c.tied;
  m.dropout_rate = c.dropout;
  m.expert_dropout = c.dropout;
  m.router_jitter_noise = c.jitter;  // counter-based noise: fixed by the forward's seed
  m.capacity_factor = 1.0;        // 6 tokens / 3 experts: capacity 2, some tokens dropped
  m.router_aux_loss_coef = 0.5;   // large coefficients so the router terms matter in J
  m.router_z_loss_coef = 0.05;
  m.init_scale = 1.0;
  return m;
}

Batch tiny_batch() {
  // 2 sequences; encoder 6 tokens (second sequence padded), decoder 5 (one ignored label).
  Batch b;
  b.resize(2, 6, 5);
  b.encoder_input_tokens = {5, 9, 3, 17, 4, 1, 7, 7, 12, 1, 0, 0};
  b.encoder_mask = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0};
  b.decoder_input_tokens = {0, 4, 17, 3, 9, 0, 12, 7, 7, 1};
  b.decoder_mask = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  b.labels = {4, 17, 3, 9, 5, 12, 7, 7, 1, -100};
  return b;
}

TEST_P(ModelGrad, MatchesFiniteDifferences) {
  const ModelCase c = GetParam();
  auto be = reference();
  const ModelConfig cfg = tiny_model(c);
  const Batch batch = tiny_batch();
  SwitchT5Model model(*be, cfg, {2, 6, 5});
  model.params().initialize(*be, 5);
  LossWeights w;
  w.ce_scale = 1.0 / double(batch.target_tokens());
  w.logit_z_loss = 0.01;
  w.microbatches = 1.0;
  // A training forward: backward needs one (an evaluation forward keeps nothing for the Switch
  // layers' backward). Without dropout and jitter the objective is deterministic anyway.
  const bool training = true;
  // first_row 3: the batch sits at rows 3.. of a global batch, so the router jitter is read at a
  // nonzero offset, which the backward must reuse.
  const uint64_t first_row = 3;
  auto loss = [&] { return model.objective(model.forward(batch, training, 77, first_row), w); };
  if (c.jitter > 0.0f) {  // the jitter reaches the forward
    ModelConfig off = cfg;
    off.router_jitter_noise = 0.0;
    SwitchT5Model plain(*be, off, {2, 6, 5});
    plain.params().initialize(*be, 5);
    ASSERT_NE(plain.objective(plain.forward(batch, training, 77, first_row), w), loss())
        << "router jitter has no effect on the model's objective";
  }
  const ForwardStats st = model.forward(batch, training, 77, first_row);
  if (c.sparse_step > 0) {
    ASSERT_FALSE(st.encoder_router.empty());
    ASSERT_FALSE(st.decoder_router.empty());
  }
  model.params().zero_grads(*be);
  model.backward(w);
  check_params(*be, model.params(), loss, 6);
}

// A tiny Switch model (tied embeddings, a Switch layer in each stack) on a host backend, and
// backward(): one training forward and backward of a fixed batch, returning every gradient.
struct TinySwitchBackward {
  TinySwitchBackward(const char* backend, const char* ffn)
      : be(make_backend(backend)),
        model(*be, tiny_model({"switch_tiny", 2, ffn, true, 0.0f, 0.0f}), {2, 6, 5}),
        batch(tiny_batch()) {
    model.params().initialize(*be, 5);
    w.ce_scale = 1.0 / double(batch.target_tokens());
    w.microbatches = 1.0;
  }
  std::vector<float> backward() {
    model.forward(batch, true, 77, 0);
    model.backward(w);
    return download(*be, model.params().grads(), model.params().total_numel());
  }
  std::unique_ptr<Backend> be;
  SwitchT5Model model;
  Batch batch;
  LossWeights w;
};

// Lazily zeroed gradients (ParamStore::zero_grads marks them pending; the weight-gradient GEMMs
// overwrite with beta = 0, other writers zero first): on both host backends a backward over a
// gradient buffer full of NaN gives exactly the gradients of a backward over zeros in memory,
// and a second backward without zero_grads adds to them (beta = 1 after the first write).
TEST(LazyGradients, SameAsZerosInMemoryAndASecondBackwardAdds) {
  for (const char* backend : {"reference", "cpu"}) {
    TinySwitchBackward t(backend, "relu");
    Backend* be = t.be.get();
    ParamStore& ps = t.model.params();
    const int64_t n = ps.total_numel();
    auto backward = [&] { return t.backward(); };
    ps.zero_grads(*be);
    ps.finish_grads();  // zeros in memory: every writer adds to them
    const std::vector<float> eager = backward();
    const std::vector<float> nan(size_t(n), std::numeric_limits<float>::quiet_NaN());
    // Only the parameters: the padding between them is the store's and stays zero.
    for (const ParamInfo& p : ps.infos())
      be->copy_to_device(ps.grads() + p.offset, nan.data(), sizeof(float) * size_t(p.numel));
    ps.zero_grads(*be);
    const std::vector<float> lazy = backward();
    const std::vector<float> twice = backward();
    int64_t nonzero = 0;
    for (const ParamInfo& p : ps.infos())
      for (int64_t i = p.offset; i < p.offset + p.numel; ++i) {
        const float g = lazy[size_t(i)];
        ASSERT_EQ(g, eager[size_t(i)]) << backend << " " << p.name << " [" << i - p.offset << "]";
        // Not bitwise: where several writers add (the tied embedding), the second pass adds its
        // parts to the first's total one by one.
        ASSERT_NEAR(twice[size_t(i)], 2.0f * g, 1e-6f + 1e-5f * std::fabs(g))
            << backend << " " << p.name << " [" << i - p.offset << "]: the second backward";
        nonzero += g != 0.0f;
      }
    EXPECT_GT(nonzero, n / 2) << backend;
  }
}

// ParamStore::square_final_writes: during a backward that makes the expert gradients final, their
// weight-gradient GEMMs add their squares to the given sum (backend memory), on both host
// backends (the CPU's own gemm_ex_sum_squares and Backend's default composition): the sum is the
// expert region's, every expert tensor is marked squared and nothing else is, the gradients are
// exactly a plain backward's, and a write after the final one is refused (its squares would be
// missing from the norm) until zero_grads() starts a new step.
TEST(LazyGradients, FinalWritesSquareTheExpertGradients) {
  for (const char* backend : {"reference", "cpu"}) {
    for (const char* ffn : {"relu", "gated-gelu"}) {
      TinySwitchBackward t(backend, ffn);
      Backend* be = t.be.get();
      ParamStore& ps = t.model.params();
      const int64_t n = ps.total_numel(), experts = ps.expert_region_begin();
      ASSERT_LT(experts, n);
      auto backward = [&] { return t.backward(); };
      ps.zero_grads(*be);
      const std::vector<float> plain = backward();
      DeviceArray<double> acc(*be, 1);
      const double start = 0.5;  // added to, not overwritten
      be->copy_to_device(acc.data(), &start, sizeof start);
      ps.zero_grads(*be);
      ps.square_final_writes(experts, n, acc.data());
      const std::vector<float> squared = backward();
      double got = 0.0;
      be->copy_to_host(&got, acc.data(), sizeof got);
      double want = start;
      for (int64_t i = experts; i < n; ++i) want += double(squared[size_t(i)]) * squared[size_t(i)];
      const std::string what = std::string(backend) + " " + ffn;
      EXPECT_GT(want, start) << what;
      EXPECT_NEAR(got, want, 1e-12 * want) << what;
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(squared[size_t(i)], plain[size_t(i)]) << what << " [" << i << "]";
      int squared_tensors = 0;
      for (const ParamInfo& p : ps.infos()) {
        EXPECT_EQ(ps.squared(p), p.offset >= experts) << what << ": " << p.name;
        squared_tensors += ps.squared(p);
      }
      EXPECT_EQ(squared_tensors, std::string(ffn) == "relu" ? 4 : 6) << what;
      EXPECT_THROW(backward(), std::exception) << what << ": a write after the final one";
      ps.zero_grads(*be);
      for (const ParamInfo& p : ps.infos()) EXPECT_FALSE(ps.squared(p)) << what << ": " << p.name;
      EXPECT_EQ(backward(), plain) << what << ": a new step";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Tiny, ModelGrad,
    ::testing::Values(ModelCase{"dense_relu_tied", 0, "relu", true, 0.0f, 0.0f},
                      ModelCase{"dense_gated_untied", 0, "gated-gelu", false, 0.0f, 0.0f},
                      ModelCase{"switch_relu_tied_jitter", 2, "relu", true, 0.0f, kJitterEps},
                      ModelCase{"switch_relu_untied_jitter", 1, "relu", false, 0.0f, kJitterEps},
                      // no jitter: the plain training path
                      ModelCase{"switch_gated_tied", 2, "gated-gelu", true, 0.0f, 0.0f},
                      ModelCase{"switch_gated_untied_dropout_jitter", 1, "gated-gelu", false, 0.2f,
                                kJitterEps}),
    [](const auto& info) { return std::string(info.param.name); });

// ---- the decoder's load-balancing loss, alone, in the whole model ------------------------------------
//
// J = router_aux_loss_coef * lb of the decoder's Switch layer and nothing else (cross-entropy scale
// 0, z-losses 0, a dense encoder), so every parameter gradient is the load-balancing gradient: the
// router weight's directly, and everything below the router (the decoder's attention, the encoder
// through cross-attention, the embeddings) through the router input. In ModelGrad the cross-entropy
// dominates these gradients, so an error in the balance term alone could hide within the tolerance.
// The routing groups are one per sequence, a group across both sequences, and groups that split
// sequences; the second sequence ends in padding, which is routed and counted like any token (as
// HF's and flaxformer's defaults do), so it is in the groups here too.
class DecoderBalanceGrad : public ::testing::TestWithParam<int> {};

TEST_P(DecoderBalanceGrad, MatchesFiniteDifferences) {
  auto be = reference();
  ModelConfig cfg = tiny_model({"decoder_balance", 2, "relu", true, 0.0f, 0.0f});
  cfg.encoder_sparse_step = 0;  // the decoder's router is the only one
  cfg.router_aux_loss_coef = 1.0;
  cfg.router_z_loss_coef = 0.0;
  cfg.group_size = GetParam();
  Batch b;
  b.resize(2, 6, 6);
  b.encoder_input_tokens = {5, 9, 3, 17, 4, 1, 7, 7, 12, 1, 0, 0};
  b.encoder_mask = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0};
  b.decoder_input_tokens = {0, 4, 17, 3, 9, 2, 0, 12, 7, 0, 0, 0};
  b.decoder_mask = {1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0};
  b.labels = {4, 17, 3, 9, 2, 1, 12, 7, 1, -100, -100, -100};
  SwitchT5Model model(*be, cfg, {2, 6, 6});
  model.params().initialize(*be, 9);
  LossWeights w;
  w.ce_scale = 0.0;
  auto loss = [&] { return model.objective(model.forward(b, true, 77, 0), w); };
  const ForwardStats st = model.forward(b, true, 77, 0);
  ASSERT_TRUE(st.encoder_router.empty());
  ASSERT_EQ(st.decoder_router.size(), 1u);
  const RouterStats& r = st.decoder_router[0];
  ASSERT_EQ(r.tokens, 12);
  ASSERT_GT(r.dropped, 0) << "the test must exercise capacity drops";
  EXPECT_NEAR(model.objective(st, w), r.balance_loss, 1e-12) << "J must be the balance loss alone";
  model.params().zero_grads(*be);
  model.backward(w);
  const auto grads = download(*be, model.params().grads(), model.params().total_numel());
  int reached = 0;
  for (const ParamInfo& p : model.params().infos()) {
    std::vector<float> an(grads.begin() + p.offset, grads.begin() + p.offset + p.numel);
    // Above the router, and the experts beside it, lb does not reach: exactly zero there.
    const bool beyond = p.name.find("mlp.experts") != std::string::npos ||
                        p.name.rfind("decoder.final_layer_norm", 0) == 0 ||
                        p.name.rfind("lm_head", 0) == 0;
    if (beyond) {
      for (float g : an) ASSERT_EQ(g, 0.0f) << p.name << " gets a gradient from lb";
      continue;
    }
    check_entries(*be, p.name, model.params().values() + p.offset, an, loss,
                  p.name.find("router") != std::string::npos ? 48 : 8);
    ++reached;
  }
  EXPECT_GE(reached, 10);
}

// 0: one group per sequence (6 tokens, capacity 2); 12: one group of both sequences (capacity 4);
// 4: three groups, the middle one across the sequence boundary (capacity 2).
INSTANTIATE_TEST_SUITE_P(Tiny, DecoderBalanceGrad, ::testing::Values(0, 12, 4),
                         [](const auto& info) { return "group_size_" + std::to_string(info.param); });

}  // namespace
}  // namespace switcht5
