// End-to-end training on one process: the same seed gives bitwise the same loss curve, a
// different seed a different one, and the synthetic task is learned (the loss falls far below
// its start). Uses configs/tiny-synthetic.yaml as a user would.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include <gtest/gtest.h>

#include "comm/communicator.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "train/metrics.h"
#include "train/progress.h"
#include "train/telemetry.h"
#include "train/trainer.h"

namespace switcht5 {
namespace {

const std::string kTiny = std::string(SWITCHT5_SOURCE_DIR) + "/configs/tiny-synthetic.yaml";

std::string temp_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() / ("switcht5_test_" + name);
  std::filesystem::remove_all(dir);
  return dir.string();
}

// JSON output (metrics.jsonl, eval's line, plan --json) writes non-finite numbers as null.
TEST(Training, JsonNumbersAreNullWhenNotFinite) {
  EXPECT_EQ(json_number(std::numeric_limits<double>::quiet_NaN()), "null");
  EXPECT_EQ(json_number(std::numeric_limits<double>::infinity()), "null");
  EXPECT_EQ(json_number(-std::numeric_limits<double>::infinity()), "null");
  EXPECT_EQ(json_number(1.5), "1.5");
  EXPECT_EQ(json_number(2.0 / 3.0, "{:.3g}"), "0.667");
}

TEST(Training, SameSeedGivesBitwiseSameLossCurve) {
  // Dropout and jitter on, so the seeded randomness is exercised too.
  const std::vector<std::string> sets = {"train.steps=30", "log.every=1", "model.dropout_rate=0.1",
                                         "model.expert_dropout=0.2", "model.router_jitter_noise=0.01"};
  RunConfig cfg = load_config(kTiny, sets);
  TrainResult a = train(cfg, temp_dir("seed_a"));
  TrainResult b = train(cfg, temp_dir("seed_b"));
  ASSERT_EQ(a.logged.size(), 30u);
  ASSERT_EQ(a.logged.size(), b.logged.size());
  for (size_t i = 0; i < a.logged.size(); ++i) {
    EXPECT_EQ(a.logged[i].loss, b.logged[i].loss) << "step " << a.logged[i].step;
    EXPECT_EQ(a.logged[i].grad_norm, b.logged[i].grad_norm) << "step " << a.logged[i].step;
    EXPECT_EQ(a.logged[i].aux_loss, b.logged[i].aux_loss) << "step " << a.logged[i].step;
  }
  auto sets_c = sets;
  sets_c.push_back("train.seed=1");
  TrainResult c = train(load_config(kTiny, sets_c), temp_dir("seed_c"));
  EXPECT_NE(a.logged.back().loss, c.logged.back().loss);
}

// A training step hands data to the host once (the statistics array: losses, router
// statistics, non-finite check, gradient-norm partials), however many micro-batches and Switch
// layers it has; a non-finite step may read more to name the bad tensor. Evaluation likewise
// reads once per evaluate() call.
TEST(Training, OneHostSynchronisationPerStep) {
  for (const char* accum : {"train.grad_accum_steps=1", "train.grad_accum_steps=4"}) {
    RunConfig cfg = load_config(kTiny, {"train.steps=4", accum, "train.optimizer=adafactor",
                                        "train.max_grad_norm=0.5"});
    ProcessGrid grid = ProcessGrid::create(make_self_communicator(), 1, 1, 1);
    Trainer trainer(cfg, grid);
    ASSERT_GE(trainer.model().switch_layer_names().size(), 2u);
    for (int64_t step = 1; step <= 4; ++step) {
      const int64_t before = trainer.backend().host_syncs();
      const StepMetrics m = trainer.train_step(step);
      EXPECT_FALSE(m.skipped);
      EXPECT_EQ(trainer.backend().host_syncs() - before, 1) << accum << " step " << step;
    }
    const int64_t before = trainer.backend().host_syncs();
    trainer.evaluate();
    EXPECT_EQ(trainer.backend().host_syncs() - before, 1) << accum << " evaluate";
  }
}

// One process reduces nothing, so its non-finite check reads the sums of squares of the final
// gradients (GradientReducer::begin_step): a NaN put into this rank's gradients, in the dense
// region or in the expert region, skips the step, is named as that tensor's gradient on this
// rank, and the next step trains again.
TEST(Training, OneProcessNamesItsOwnNonFiniteGradient) {
  for (const bool experts : {false, true}) {
    RunConfig cfg = load_config(kTiny, {"train.steps=3", "train.cuda_graphs=false"});
    ProcessGrid grid = ProcessGrid::create(make_self_communicator(), 1, 1, 1);
    Trainer trainer(cfg, grid);
    const ParamStore& ps = trainer.model().params();
    const int64_t offset = experts ? ps.expert_region_begin() : 0;
    ASSERT_LT(offset, ps.total_numel());
    std::string name;
    for (const ParamInfo& p : ps.infos())
      if (p.offset == offset) name = p.name;
    ASSERT_FALSE(name.empty());
    EXPECT_EQ(name.find("experts") != std::string::npos, experts) << name;
    trainer.inject_nan(/*step=*/2, /*rank=*/0, offset);
    EXPECT_FALSE(trainer.train_step(1).skipped);
    const StepMetrics bad = trainer.train_step(2);
    EXPECT_TRUE(bad.skipped) << name;
    EXPECT_EQ(bad.nonfinite, name + " gradient (rank 0)");
    EXPECT_FALSE(trainer.train_step(3).skipped) << name;
  }
}

// The logged grad_norm (before clipping) is the L2 norm of the gradients the step ends with. On
// one process the experts' squares are taken by their weight-gradient GEMMs as they make the
// gradients final (ParamStore::square_final_writes), the rest by a pass after the backward:
// every expert tensor must have been squared that way, and the total must still be the norm
// of the whole buffer, with gradient accumulation (the last of two writes squares), in bf16
// (the bf16-activation GEMM), with gated-GELU experts (three tensors a layer), and on the
// reference backend (Backend's default composition).
TEST(Training, GradNormIsTheNormOfTheFinalGradients) {
  const std::vector<std::vector<std::string>> variants = {
      {},
      {"train.grad_accum_steps=2"},
      {"train.precision=bf16"},
      {"model.feed_forward_proj=gated-gelu"},
      {"train.backend=reference"}};
  for (const auto& variant : variants) {
    std::vector<std::string> sets = {"train.steps=2", "train.max_grad_norm=0"};
    sets.insert(sets.end(), variant.begin(), variant.end());
    const std::string what = variant.empty() ? "default" : variant[0];
    RunConfig cfg = load_config(kTiny, sets);
    ProcessGrid grid = ProcessGrid::create(make_self_communicator(), 1, 1, 1);
    Trainer trainer(cfg, grid);
    for (int64_t step = 1; step <= 2; ++step) {
      const StepMetrics m = trainer.train_step(step);
      ASSERT_FALSE(m.skipped) << what;
      ParamStore& ps = trainer.model().params();
      std::vector<float> grads(size_t(ps.total_numel()));
      trainer.backend().copy_to_host(grads.data(), ps.grads(), sizeof(float) * grads.size());
      double sq = 0.0, expert_sq = 0.0;
      for (size_t i = 0; i < grads.size(); ++i) {
        const double g2 = double(grads[i]) * grads[i];
        sq += g2;
        if (int64_t(i) >= ps.expert_region_begin()) expert_sq += g2;
      }
      EXPECT_GT(expert_sq, 0.0) << what;
      EXPECT_NEAR(m.grad_norm, std::sqrt(sq), 1e-12 * std::sqrt(sq)) << what << " step " << step;
      int expert_tensors = 0;
      for (const ParamInfo& p : ps.infos()) {
        if (p.offset < ps.expert_region_begin()) continue;
        ++expert_tensors;
        EXPECT_TRUE(ps.squared(p)) << what << ": " << p.name;
      }
      EXPECT_EQ(expert_tensors, variant.size() == 1 && variant[0].find("gated") != std::string::npos
                                    ? 6 : 4) << what;
    }
  }
}

// Telemetry: at a logged step every Switch layer reports the L2 norm of each expert's gradient
// (before clipping), equal to the norm of that expert's slices of the gradient buffer.
TEST(Training, ExpertGradientNormsAreEachExpertsGradient) {
  RunConfig cfg = load_config(kTiny, {"train.steps=2", "train.max_grad_norm=0"});
  ProcessGrid grid = ProcessGrid::create(make_self_communicator(), 1, 1, 1);
  Trainer trainer(cfg, grid);
  EXPECT_TRUE(trainer.train_step(1).routing.at(0).expert_grad_norm.empty()) << "only when asked";
  const StepMetrics m = trainer.train_step(2, /*expert_norms=*/true);
  ASSERT_FALSE(m.skipped);
  ParamStore& ps = trainer.model().params();
  std::vector<float> grads(size_t(ps.total_numel()));
  trainer.backend().copy_to_host(grads.data(), ps.grads(), sizeof(float) * grads.size());
  const int E = cfg.model.num_experts;
  for (const LayerRouting& r : m.routing) {
    std::vector<double> sq(size_t(E), 0.0);
    int tensors = 0;
    for (const ParamInfo& p : ps.infos()) {
      if (p.kind != ParamKind::kStacked || p.name.rfind(r.layer + ".", 0) != 0) continue;
      ++tensors;
      const int64_t per = p.numel / E;
      for (int64_t i = 0; i < p.numel; ++i)
        sq[size_t(i / per)] += double(grads[size_t(p.offset + i)]) * grads[size_t(p.offset + i)];
    }
    EXPECT_EQ(tensors, 2) << r.layer << ": wi and wo";
    ASSERT_EQ(r.expert_grad_norm.size(), size_t(E)) << r.layer;
    for (int e = 0; e < E; ++e) {
      EXPECT_NEAR(r.expert_grad_norm[size_t(e)], std::sqrt(sq[size_t(e)]), 1e-9 + 1e-9 * std::sqrt(sq[size_t(e)]))
          << r.layer << " expert " << e;
    }
    EXPECT_GT(std::sqrt(sq[0] + sq[1] + sq[2] + sq[3]), 0.0) << r.layer;
    // The other telemetry of the step: probabilities of 4 experts.
    EXPECT_GT(r.entropy, 0.0);
    EXPECT_LE(r.entropy, std::log(double(E)) + 1e-6);
    EXPECT_GE(r.top1_prob, 1.0 / E - 1e-6);
    EXPECT_GE(r.top1_margin, 0.0);
    EXPECT_GE(r.load_cv, 0.0);
  }
}

// One logged step of one Switch layer for the routing monitor: its per-expert token counts and
// the fractions they make.
StepMetrics routing_step(int64_t s, const std::string& layer, std::vector<int64_t> tokens) {
  StepMetrics m;
  m.step = s;
  LayerRouting r;
  r.layer = layer;
  int64_t total = 0;
  for (int64_t t : tokens) total += t;
  for (int64_t t : tokens) r.expert_fraction.push_back(double(t) / double(total));
  r.expert_tokens = std::move(tokens);
  m.routing.push_back(r);
  return m;
}

// The routing monitor: dead experts over the interval since the previous log (not the logged
// step alone), and one collapse warning naming the layer when a layer enters collapse, one when
// it recovers. An empty expert warns only after dead_steps steps in a row, counted in steps and
// not in logs, and only when those steps routed at least 16 tokens per expert.
TEST(Training, RoutingMonitorCountsDeadExpertsAndWarnsOnCollapse) {
  auto step = [](int64_t s, std::vector<int64_t> tokens) {
    return routing_step(s, "decoder.block.1", std::move(tokens));
  };
  RoutingMonitor monitor(/*collapse_share=*/0.8, /*collapse_logs=*/2, /*dead_steps=*/3);
  // Interval 1: expert 3 gets a token at step 1 only; the logged step 2 alone would call it dead.
  StepMetrics m = step(1, {50, 50, 50, 1});
  monitor.add_step(m);
  m = step(2, {50, 50, 60, 0});
  monitor.add_step(m);
  EXPECT_TRUE(monitor.at_log(m).empty());
  EXPECT_EQ(m.routing[0].dead_experts, 0);
  // Logged every step (log.every 1): expert 3 is empty at each log, counted, but 2 steps in a
  // row are under dead_steps: no warning.
  m = step(3, {90, 20, 50, 0});
  monitor.add_step(m);
  EXPECT_TRUE(monitor.at_log(m).empty());
  EXPECT_EQ(m.routing[0].dead_experts, 1);
  // The third empty step in a row (480 tokens): dead, and that is a collapse at once.
  m = step(4, {90, 20, 50, 0});
  monitor.add_step(m);
  std::vector<std::string> w = monitor.at_log(m);
  EXPECT_EQ(m.routing[0].dead_experts, 1);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_NE(w[0].find("routing collapse in decoder.block.1 at step 4"), std::string::npos) << w[0];
  EXPECT_NE(w[0].find("1 of 4 experts got no token in the last 3 steps"), std::string::npos)
      << w[0];
  // Recovers: balanced again.
  m = step(5, {40, 40, 40, 40});
  monitor.add_step(m);
  w = monitor.at_log(m);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_NE(w[0].find("routing in decoder.block.1 recovered at step 5"), std::string::npos) << w[0];
  // One expert over 80% at one log: not yet; at the second in a row: one warning; a third: no
  // repeat.
  for (int64_t s = 6; s <= 8; ++s) {
    m = step(s, {170, 10, 10, 10});
    monitor.add_step(m);
    w = monitor.at_log(m);
    EXPECT_EQ(w.size(), s == 7 ? 1u : 0u) << "step " << s;
    if (s == 7) {
      EXPECT_NE(w[0].find("expert 0 takes 85% of the tokens (over 80% at 2 logged steps in a row)"),
                std::string::npos)
          << w[0];
    }
  }
}

// Dead experts are judged over steps, whatever the logging interval: a monitor logged every 4
// steps warns as soon as an expert has been empty for dead_steps steps; and steps that routed
// under 16 tokens per expert never make an expert dead.
TEST(Training, RoutingMonitorDeadExpertsCountStepsAndTokens) {
  auto step = [](int64_t s, std::vector<int64_t> tokens) {
    return routing_step(s, "encoder.block.1", std::move(tokens));
  };
  RoutingMonitor few(/*collapse_share=*/0.8, /*collapse_logs=*/3, /*dead_steps=*/2);
  StepMetrics m;
  // 4 steps empty, 15 tokens each: 60 < 64 = 16 x 4 experts.
  for (int64_t s = 1; s <= 4; ++s) {
    m = step(s, {5, 5, 5, 0});
    few.add_step(m);
  }
  EXPECT_TRUE(few.at_log(m).empty());
  EXPECT_EQ(m.routing[0].dead_experts, 1);
  // One more step of 60 tokens: 120 tokens over the empty run, enough.
  m = step(5, {20, 20, 20, 0});
  few.add_step(m);
  std::vector<std::string> w = few.at_log(m);
  ASSERT_EQ(w.size(), 1u);
  EXPECT_NE(w[0].find("1 of 4 experts got no token in the last 2 steps"), std::string::npos)
      << w[0];

  // Logged every 4 steps, dead_steps 6: empty in steps 3-8 (6 in a row) warns at the log of
  // step 8; a token at step 9 recovers at the log of step 12.
  RoutingMonitor sparse_logs(0.8, 3, /*dead_steps=*/6);
  int warnings = 0;
  for (int64_t s = 1; s <= 12; ++s) {
    m = step(s, {40, 40, 40, s >= 3 && s <= 8 ? 0 : 40});
    sparse_logs.add_step(m);
    if (s % 4 != 0) continue;
    w = sparse_logs.at_log(m);
    warnings += int(w.size());
    if (s == 4) {
      EXPECT_TRUE(w.empty());
    }
    if (s == 8) {
      ASSERT_EQ(w.size(), 1u);
      EXPECT_NE(w[0].find("routing collapse in encoder.block.1 at step 8"), std::string::npos)
          << w[0];
    }
    if (s == 12) {
      ASSERT_EQ(w.size(), 1u);
      EXPECT_NE(w[0].find("recovered at step 12"), std::string::npos) << w[0];
    }
  }
  EXPECT_EQ(warnings, 2);
}

// The progress facts of a log line: step of total, elapsed and ETA as clock durations, MFU
// only when the peak is known.
TEST(Training, ProgressSuffix) {
  EXPECT_EQ(clock_duration(0), "0:00");
  EXPECT_EQ(clock_duration(59.6), "1:00");
  EXPECT_EQ(clock_duration(727), "12:07");
  EXPECT_EQ(clock_duration(3 * 3600 + 2 * 60 + 17), "3:02:17");
  EXPECT_EQ(clock_duration(std::numeric_limits<double>::quiet_NaN()), "0:00");
  StepMetrics m;
  m.step_ms = 100.0;
  Progress unknown(/*live=*/false, /*start_step=*/10, /*total_steps=*/1000, 1e9, 0.0);
  m.step = 11;
  unknown.update(m);
  const std::string s = unknown.suffix(11);
  EXPECT_EQ(s.rfind(" | 11/1000 | 0:00 elapsed, ETA ", 0), 0u) << s;
  EXPECT_EQ(s.find("MFU"), std::string::npos) << s;
  // 1e9 FLOP in 0.1 s against a 2e10 FLOP/s peak: 50%.
  Progress known(false, 0, 100, 1e9, 2e10);
  m.step = 1;
  known.update(m);
  EXPECT_NE(known.suffix(1).find(" | MFU 50%"), std::string::npos) << known.suffix(1);
}

TEST(Training, SyntheticTaskIsLearned) {
  RunConfig cfg = load_config(kTiny, {"train.steps=1000", "train.eval_every=1000"});
  const std::string dir = temp_dir("learn");
  TrainResult r = train(cfg, dir);
  ASSERT_FALSE(r.logged.empty());
  const double first = r.logged.front().loss, last = r.logged.back().loss;
  // Uniform over the 13 content tokens + EOS would be log(14) = 2.64; the start is ~7.4.
  EXPECT_GT(first, 6.0);
  EXPECT_LT(last, 1.0) << "loss went from " << first << " to " << last;
  EXPECT_TRUE(r.logged.back().has_val);
  EXPECT_LT(r.logged.back().val_loss, 1.2);

  // The run directory holds the resolved config, the log and the metrics.
  EXPECT_TRUE(std::filesystem::exists(dir + "/config.yaml"));
  EXPECT_TRUE(std::filesystem::exists(dir + "/train.log"));
  std::ifstream metrics(dir + "/metrics.jsonl");
  std::string line, last_line;
  int lines = 0;
  while (std::getline(metrics, line)) { ++lines; last_line = line; }
  EXPECT_EQ(lines, int(r.logged.size()));
  for (const char* key : {"\"step\": 1000", "\"loss\"", "\"aux_loss\"", "\"z_loss\"", "\"lr\"",
                          "\"grad_norm\"", "\"tokens_per_s\"", "\"dropped_fraction\"", "\"val_loss\""})
    EXPECT_NE(last_line.find(key), std::string::npos) << key << " missing in " << last_line;
  // The saved config reads back to the config that ran.
  std::ifstream f(dir + "/config.yaml");
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  RunConfig back = parse_config(text, "config.yaml", {});
  back.source_path = cfg.source_path;
  EXPECT_TRUE(back == cfg);
}

}  // namespace
}  // namespace switcht5
