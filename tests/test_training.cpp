// End-to-end training on one process: the same seed gives bitwise the same loss curve, a
// different seed a different one, and the synthetic task is learned (the loss falls far below
// its start). Uses configs/tiny-synthetic.yaml as a user would.
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include <gtest/gtest.h>

#include "comm/communicator.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "train/metrics.h"
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
