// End to end on real data: real C4 documents tokenized with the real T5 vocabulary by
// switcht5-data, then `switcht5 train --config configs/tiny.yaml` on those shards, with
// validation. Needs ../shared/data; skips with the reason when it is absent.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "test_util.h"

namespace {

namespace fs = std::filesystem;
const std::string kBin = std::string(SWITCHT5_BINARY_DIR);
const std::string kSrc = std::string(SWITCHT5_SOURCE_DIR);

int run(const std::string& cmd, std::string& output) {
  const switcht5::testing::CommandResult r = switcht5::testing::run_command(cmd);
  output = r.output;
  return r.code;
}

TEST(TrainOnShards, TinyConfigTrainsOnRealC4WithValidation) {
  const std::string data = switcht5::testing::shared_data_dir();
  if (data.empty()) GTEST_SKIP() << "../shared/data (T5 vocabulary and C4 sample) is absent";
  const fs::path dir = fs::temp_directory_path() / "switcht5_train_shards";
  fs::remove_all(dir);
  std::string out;
  // Train on documents 0-19 of the OLMo C4 sample, validate on 20-29.
  ASSERT_EQ(run(kBin + "/switcht5-data tokenize --quiet --spm " + data + "/spiece.model --output " +
                    (dir / "train").string() + " --input '" + data + "/c4/olmo/c4-sample.0[12].json.gz'",
                out), 0) << out;
  ASSERT_EQ(run(kBin + "/switcht5-data tokenize --quiet --spm " + data + "/spiece.model --output " +
                    (dir / "val").string() + " --input " + data + "/c4/olmo/c4-sample.03.json.gz",
                out), 0) << out;
  const fs::path run_dir = dir / "run";
  ASSERT_EQ(run(kBin + "/switcht5 train --config " + kSrc + "/configs/tiny.yaml --run-dir " +
                    run_dir.string() + " --set data.train_glob=" + (dir / "train").string() +
                    "/'*.shard' --set data.val_glob=" + (dir / "val").string() +
                    "/'*.shard' --set train.steps=40 --set train.batch_size=8 "
                    "--set train.eval_every=20 --set log.every=1",
                out), 0) << out;
  std::ifstream metrics(run_dir / "metrics.jsonl");
  std::string line, first, last;
  int val_lines = 0;
  while (std::getline(metrics, line)) {
    if (first.empty()) first = line;
    last = line;
    val_lines += line.find("\"val_loss\"") != std::string::npos;
  }
  EXPECT_EQ(val_lines, 2) << last;
  auto loss_of = [](const std::string& l) {
    return std::stod(l.substr(l.find("\"loss\": ") + 8));
  };
  // log(32128) = 10.4 at the start; the unigram statistics alone take it well below.
  EXPECT_GT(loss_of(first), 9.0) << first;
  EXPECT_LT(loss_of(last), loss_of(first) - 2.0) << first << "\n" << last;
}

}  // namespace
