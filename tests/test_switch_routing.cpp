// Routing worked by hand: top-1 choice, capacity positions and drops, the load-balancing loss
// and the router z-loss on a case small enough to check with a pencil; and what a Switch layer
// outputs for kept and dropped tokens.
#include <cmath>
#include <vector>

#include <gtest/gtest.h>

#include "backend/backend.h"
#include "config/config.h"
#include "model/switch_ffn.h"
#include "test_util.h"

namespace switcht5 {
namespace {

using testing::download;
using testing::upload;

class Routing : public ::testing::TestWithParam<const char*> {};

// router_forward's outputs for G groups of S tokens over E experts at capacity C.
struct Routed {
  Routed(Backend& be, const std::vector<float>& logits_host, int G, int S, int E, int C)
      : logits(upload(be, logits_host)), probs(be, int64_t(G) * S * E), lse(be, int64_t(G) * S),
        gate(be, int64_t(G) * S), counts(be, int64_t(G) * E), expert(be, int64_t(G) * S),
        slot(be, int64_t(G) * S), rows(be, E) {
    be.router_forward(probs.data(), lse.data(), expert.data(), slot.data(), rows.data(),
                      gate.data(), counts.data(), logits.data(), G, S, E, C);
  }
  DeviceArray<float> logits, probs, lse, gate, counts;
  DeviceArray<int32_t> expert, slot, rows;
};

// One group of S = 4 tokens, E = 2 experts, capacity C = 1:
//   t0 logits [2, 0] -> expert 0, position 0: kept (slot 0)
//   t1 logits [0, 1] -> expert 1, position 0: kept (slot 0)
//   t2 logits [1, 0] -> expert 0, position 1: dropped (1 >= C)
//   t3 logits [0, 0] -> tie, lowest index: expert 0, position 2: dropped
// counts = [3, 1] -> f = [3/4, 1/4]
// P[e] = mean_t softmax(t)[e]:  p(t0) = [s(2), s(-2)], p(t1) = [s(-1), s(1)], p(t2) = [s(1), s(-1)],
//        p(t3) = [1/2, 1/2] with s the logistic function; lb = 2 * (3/4 P0 + 1/4 P1)
//        With s(-1) + s(1) = 1 and P1 = 1 - P0: P0 = (3/2 + s(2)) / 4, lb = 1/2 + P0 = 7/8 + s(2)/4
//        = 0.875 + 0.880797078 / 4 = 1.0951993 (by hand, independent of the formula above).
// lse = [log(1+e^2), log(1+e), log(1+e), log 2];  z = mean(lse^2)
TEST_P(Routing, HandWorkedGroup) {
  auto be = make_backend(GetParam());
  const int G = 1, S = 4, E = 2, C = 1, T = 4;
  Routed r(*be, {2, 0, 0, 1, 1, 0, 0, 0}, G, S, E, C);
  auto &probs = r.probs, &lse = r.lse, &gate = r.gate, &counts = r.counts;
  auto &expert = r.expert, &slot = r.slot, &rows = r.rows;
  DeviceArray<float> lb(*be, G);
  be->router_balance_loss(lb.data(), probs.data(), counts.data(), G, S, E);

  EXPECT_EQ(download(*be, expert.data(), T), (std::vector<int32_t>{0, 1, 0, 0}));
  EXPECT_EQ(download(*be, slot.data(), T), (std::vector<int32_t>{0, 0, -1, -1}));
  EXPECT_EQ(download(*be, counts.data(), E), (std::vector<float>{3, 1}));
  EXPECT_EQ(download(*be, rows.data(), E), (std::vector<int32_t>{1, 1}));
  auto s = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  const std::vector<float> gates = download(*be, gate.data(), T);
  EXPECT_NEAR(gates[0], s(2), 1e-6);
  EXPECT_NEAR(gates[1], s(1), 1e-6);
  EXPECT_NEAR(gates[2], s(1), 1e-6);
  EXPECT_NEAR(gates[3], 0.5, 1e-6);
  const std::vector<float> p = download(*be, probs.data(), T * E);
  const std::vector<double> expected_probs = {s(2), s(-2), s(-1), s(1), s(1), s(-1), 0.5, 0.5};
  for (int i = 0; i < T * E; ++i)
    EXPECT_NEAR(p[i], expected_probs[i], 1e-6) << "probs[" << i << "]";
  const double P0 = (s(2) + s(-1) + s(1) + 0.5) / 4, P1 = (s(-2) + s(1) + s(-1) + 0.5) / 4;
  const float lb_code = download(*be, lb.data(), 1)[0];
  EXPECT_NEAR(lb_code, 2.0 * (0.75 * P0 + 0.25 * P1), 1e-6);
  EXPECT_NEAR(lb_code, 1.0951993, 1e-6);  // the pencil number itself
  const double l0 = std::log(1 + std::exp(2.0)), l1 = std::log(1 + std::exp(1.0)), l3 = std::log(2.0);
  EXPECT_TRUE(testing::all_close(download(*be, lse.data(), T),
                                 {float(l0), float(l1), float(l1), float(l3)}, 1e-6, 1e-7));
  EXPECT_NEAR(be->sum_squares(lse.data(), T) / T, (l0 * l0 + 2 * l1 * l1 + l3 * l3) / 4, 1e-5);
}

// Two groups: positions restart in every group, and each group has its own capacity; the kept
// tokens of both groups are packed at the front of the expert's buffer.
TEST_P(Routing, CapacityIsPerGroup) {
  auto be = make_backend(GetParam());
  const int G = 2, S = 3, E = 2, C = 2, T = 6;
  // Every token prefers expert 1.
  Routed r(*be, {0, 1, 0, 2, 0, 3, 0, 1, 0, 1, 0, 1}, G, S, E, C);
  // Group 0 rows 0,1 of expert 1's buffer; group 1 rows 2,3 (after group 0's two kept tokens).
  EXPECT_EQ(download(*be, r.slot.data(), T), (std::vector<int32_t>{0, 1, -1, 2, 3, -1}));
  EXPECT_EQ(download(*be, r.counts.data(), G * E), (std::vector<float>{0, 3, 0, 3}));
  EXPECT_EQ(download(*be, r.rows.data(), E), (std::vector<int32_t>{0, 4}));
}

// The packing where groups keep fewer than C: expert 0's buffer holds group 0's one token in
// row 0 and group 1's two in rows 1 and 2 (not at g*C = 3): no empty row between them.
TEST_P(Routing, KeptTokensLeadTheBuffer) {
  auto be = make_backend(GetParam());
  const int G = 2, S = 3, E = 2, C = 3, T = 6;
  // Experts by token: group 0 -> 0, 1, 1; group 1 -> 1, 0, 0.
  Routed r(*be, {1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0}, G, S, E, C);
  EXPECT_EQ(download(*be, r.expert.data(), T), (std::vector<int32_t>{0, 1, 1, 1, 0, 0}));
  EXPECT_EQ(download(*be, r.slot.data(), T), (std::vector<int32_t>{0, 0, 1, 2, 1, 2}));
  EXPECT_EQ(download(*be, r.rows.data(), E), (std::vector<int32_t>{3, 3}));
}

INSTANTIATE_TEST_SUITE_P(Backends, Routing, ::testing::Values("reference", "cpu"));

TEST(Capacity, Arithmetic) {
  ModelConfig m;
  m.num_experts = 4;
  m.capacity_factor = 1.25;
  m.eval_capacity_factor = 2.0;
  EXPECT_EQ(expert_capacity(m, 24, true), 8);    // ceil(1.25 * 24 / 4) = ceil(7.5)
  EXPECT_EQ(expert_capacity(m, 24, false), 12);  // 2.0 * 24 / 4
  EXPECT_EQ(expert_capacity(m, 3, true), 1);     // ceil(0.9375)
  m.expert_capacity = 5;                  // an explicit capacity wins, train and eval
  EXPECT_EQ(expert_capacity(m, 24, true), 5);
  EXPECT_EQ(expert_capacity(m, 24, false), 5);
}

// A relu Switch layer "mlp" of E experts in ps (seeded weights) whose router sends every positive
// input to expert 0: its weight row 0 is all ones, the others zero.
void register_expert0_layer(Backend& be, ParamStore& ps, int D, int F, int E) {
  SwitchFFN::register_params(ps, "mlp", D, F, E, false, 1.0);
  ps.allocate(be);
  ps.initialize(be, 3);
  std::vector<float> wr(size_t(E) * D, 0.0f);
  for (int d = 0; d < D; ++d) wr[d] = 1.0f;
  be.copy_to_device(ps.value("mlp.router.classifier.weight"), wr.data(), sizeof(float) * E * D);
}

// A Switch layer: kept tokens output gate * expert(x), dropped tokens output exactly zero.
TEST(SwitchLayer, DroppedTokensOutputZeroKeptTokensAreGatedExperts) {
  auto be = make_backend("reference");
  const int T = 8, S = 8, D = 3, F = 4, E = 2;
  ParamStore ps;
  register_expert0_layer(*be, ps, D, F, E);  // every token to expert 0 (inputs positive)
  SwitchFFN sw(*be, ps, "mlp", {T, S, D, F, E, /*capacity_train=*/3, /*capacity_eval=*/3, false});
  const auto xh = testing::random_vector(T * D, 9, 0.1f, 1.0f);
  auto x = upload(*be, xh);
  DeviceArray<float> out(*be, T * D);
  RouterStats st = sw.forward(out.data(), x.data(), false, 0.0f, 0.0f, 1);
  EXPECT_EQ(st.dropped, 5);
  EXPECT_DOUBLE_EQ(st.expert_fraction[0], 1.0);
  const auto o = download(*be, out.data(), T * D);
  // Expert 0 by hand: relu(x wi^T) wo^T.
  const auto wi = download(*be, ps.value("mlp.experts.wi.weight"), F * D);
  const auto wo = download(*be, ps.value("mlp.experts.wo.weight"), D * F);
  for (int t = 0; t < T; ++t) {
    double l0 = 0;
    for (int d = 0; d < D; ++d) l0 += xh[t * D + d];
    const double gate = 1.0 / (1.0 + std::exp(-l0));  // softmax([l0, 0])[0]
    for (int d = 0; d < D; ++d) {
      double y = 0;
      for (int f = 0; f < F; ++f) {
        double h = 0;
        for (int k = 0; k < D; ++k) h += xh[t * D + k] * wi[f * D + k];
        y += std::max(h, 0.0) * wo[d * F + f];
      }
      const double expect = t < 3 ? gate * y : 0.0;
      EXPECT_NEAR(o[t * D + d], expect, 1e-5) << "token " << t << " dim " << d;
    }
  }
}

// model.router_force_balance (benchmarks only): a router whose weights send every token to
// expert 0 spreads them uniformly at random once the logits are noise, with the cost kept; the
// router's weight and the input get no gradient through the router, the experts still do.
TEST(SwitchLayer, ForcedBalanceRoutesUniformlyAndSendsNoRouterGradient) {
  auto be = make_backend("reference");
  const int T = 2048, S = 512, D = 3, F = 4, E = 8;
  ParamStore ps;
  register_expert0_layer(*be, ps, D, F, E);  // expert 0 takes every positive input
  const auto xh = testing::random_vector(T * D, 9, 0.1f, 1.0f);
  auto x = upload(*be, xh);
  DeviceArray<float> out(*be, T * D), dx(*be, T * D);
  for (bool force : {false, true}) {
    SwitchShape shape{T, S, D, F, E, /*capacity_train=*/S, /*capacity_eval=*/S, false};
    shape.force_balance = force;
    SwitchFFN sw(*be, ps, "mlp", shape);
    const RouterStats st = sw.forward(out.data(), x.data(), /*training=*/true, 0.0f, 0.0f, 1);
    if (!force) {
      EXPECT_DOUBLE_EQ(st.expert_fraction[0], 1.0);  // what the weights do
      continue;
    }
    for (int e = 0; e < E; ++e)  // 256 expected each; binomial sd 15
      EXPECT_NEAR(st.expert_fraction[e], 1.0 / E, 0.2 / E) << "expert " << e;
    ps.zero_grads(*be);
    DeviceArray<float> scratch(*be, sw.scratch_floats());
    auto dout = upload(*be, testing::random_vector(T * D, 10));
    sw.backward(dx.data(), dout.data(), 0.7f, 0.05f, scratch.data());
    ps.finish_grads();
    const auto router_grad = download(*be, ps.grad("mlp.router.classifier.weight"), E * D);
    EXPECT_EQ(router_grad, std::vector<float>(E * D, 0.0f));
    EXPECT_GT(be->sum_squares(ps.grad("mlp.experts.wi.weight"), E * F * D), 0.0);
  }
}

}  // namespace
}  // namespace switcht5
