// The whole model on the CPU backend against the reference backend: the same parameters and
// batch give the same loss, logits and gradients (fp32 tolerances), for dense and Switch, relu
// and gated-gelu, tied and untied, with dropout and jitter on.
#include <algorithm>
#include <cmath>
#include <string>

#include <gtest/gtest.h>

#include "backend/backend.h"
#include "model/model.h"
#include "model_test_util.h"
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
  const ModelConfig m = testing::tiny_model_config(c.sparse_step, c.ffn, c.tied);
  const int B = 3, Ti = 9, Tt = 7;
  const Batch batch = testing::padded_batch(B, Ti, Tt, /*pad_per_row=*/1);
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
