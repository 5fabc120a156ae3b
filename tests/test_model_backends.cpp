// The whole model on the CPU backend against the reference backend: the same parameters and
// batch give the same loss, logits and gradients (fp32 tolerances), for dense and Switch, relu
// and gated-gelu, tied and untied, with dropout and jitter on.
#include <algorithm>
#include <cmath>
#include <string>

#include <gtest/gtest.h>

#include "backend/backend.h"
#include "model/model.h"
#include "test_util.h"

namespace switcht5 {
namespace {

using testing::all_close;
using testing::download;

struct Case {
  const char* name;
  int sparse_step;
  const char* ffn;
  bool tied;
};

class ModelBackends : public ::testing::TestWithParam<Case> {};

TEST_P(ModelBackends, CpuMatchesReference) {
  const Case c = GetParam();
  ModelConfig m;
  m.vocab_size = 40;
  m.d_model = 16;
  m.d_ff = 24;
  m.d_kv = 4;
  m.num_heads = 3;
  m.num_layers = 3;
  m.num_decoder_layers = 2;
  m.num_experts = 4;
  m.encoder_sparse_step = c.sparse_step;
  m.decoder_sparse_step = c.sparse_step;
  m.relative_attention_num_buckets = 8;
  m.relative_attention_max_distance = 20;
  m.feed_forward_proj = c.ffn;
  m.tie_word_embeddings = c.tied;
  m.dropout_rate = 0.1;
  m.expert_dropout = 0.2;
  m.router_jitter_noise = 0.01;
  m.group_size = 0;
  const int B = 3, Ti = 9, Tt = 7;
  Batch batch;
  batch.resize(B, Ti, Tt);
  CounterRng rng(17);
  for (int b = 0; b < B; ++b) {
    const int len = Ti - b;
    for (int i = 0; i < len; ++i) {
      batch.encoder_input_tokens[b * Ti + i] = 3 + int(rng.next_below(37));
      batch.encoder_mask[b * Ti + i] = 1;
    }
    for (int i = 0; i < Tt; ++i) {
      batch.decoder_input_tokens[b * Tt + i] = int(rng.next_below(40));
      batch.decoder_mask[b * Tt + i] = 1;
      batch.labels[b * Tt + i] = i < Tt - b ? int(rng.next_below(40)) : kIgnoreLabel;
    }
  }
  LossWeights w{1.0 / double(batch.target_tokens()), 1e-3, 1.0};

  struct Out {
    ForwardStats st;
    std::vector<float> logits, grads;
  };
  auto run = [&](const char* backend) {
    auto be = make_backend(backend);
    SwitchT5Model model(*be, m, {B, Ti, Tt});
    model.params().initialize(*be, 8);
    Out o;
    o.st = model.forward(batch, /*training=*/true, 1234);
    o.logits = download(*be, model.logits(), int64_t(B) * Tt * m.vocab_size);
    model.backward(w);
    o.grads = download(*be, model.params().grads(), model.params().total_numel());
    return o;
  };
  Out ref = run("reference"), cpu = run("cpu");
  EXPECT_NEAR(cpu.st.ce_sum, ref.st.ce_sum, 1e-4 * std::fabs(ref.st.ce_sum));
  ASSERT_EQ(cpu.st.encoder_router.size(), ref.st.encoder_router.size());
  for (size_t i = 0; i < ref.st.encoder_router.size(); ++i) {
    EXPECT_EQ(cpu.st.encoder_router[i].dropped, ref.st.encoder_router[i].dropped);
    EXPECT_NEAR(cpu.st.encoder_router[i].balance_loss, ref.st.encoder_router[i].balance_loss, 1e-5);
  }
  EXPECT_TRUE(all_close(cpu.logits, ref.logits, 1e-4, 1e-5));
  float gmax = 0;
  for (float g : ref.grads) gmax = std::max(gmax, std::fabs(g));
  EXPECT_GT(gmax, 0.0f);
  EXPECT_TRUE(all_close(cpu.grads, ref.grads, 1e-3, 1e-5 * gmax));
}

INSTANTIATE_TEST_SUITE_P(Tiny, ModelBackends,
                         ::testing::Values(Case{"dense_relu_tied", 0, "relu", true},
                                           Case{"switch_relu_tied", 2, "relu", true},
                                           Case{"switch_gated_untied", 1, "gated-gelu", false}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace switcht5
