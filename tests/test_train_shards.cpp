// End to end on real data: real C4 documents tokenized with the real T5 vocabulary by
// switcht5-data, then `switcht5 train --config configs/tiny.yaml` on those shards, with
// validation. Needs ../shared/data; skips with the reason when it is absent.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
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

// metrics.jsonl lines by step (a resumed run appends; the last line of a step wins).
std::map<int, std::string> metrics_by_step(const fs::path& file) {
  std::ifstream in(file);
  std::map<int, std::string> out;
  for (std::string line; std::getline(in, line);)
    out[std::stoi(line.substr(line.find("\"step\": ") + 8))] = line;
  return out;
}

std::string field(const std::string& line, const std::string& key) {
  const size_t at = line.find("\"" + key + "\": ");
  if (at == std::string::npos) return "";
  const size_t begin = at + key.size() + 4;
  return line.substr(begin, line.find_first_of(",}", begin) - begin);
}

TEST(TrainOnShards, ResumeContinuesTheDataStreamBitwise) {
  // The C4 loader's position (shuffled pieces, span corruption) is restored from the
  // checkpoint: 10 steps + resume + 10 steps logs exactly what 20 straight steps log.
  const std::string data = switcht5::testing::shared_data_dir();
  if (data.empty()) GTEST_SKIP() << "../shared/data (T5 vocabulary and C4 sample) is absent";
  const fs::path dir = fs::temp_directory_path() / "switcht5_resume_shards";
  fs::remove_all(dir);
  std::string out;
  for (const char* part : {"train", "val"})
    ASSERT_EQ(run(kBin + "/switcht5-data tokenize --quiet --spm " + data + "/spiece.model --output " +
                      (dir / part).string() + " --input " + data + "/c4/olmo/c4-sample.0" +
                      (part[0] == 't' ? "1" : "3") + ".json.gz",
                  out), 0) << out;
  const std::string common = " --config " + kSrc + "/configs/tiny.yaml --set data.train_glob=" +
                             (dir / "train").string() + "/'*.shard' --set data.val_glob=" +
                             (dir / "val").string() +
                             "/'*.shard' --set train.batch_size=4 --set train.eval_every=10 "
                             "--set log.every=1 --set data.shuffle_window=16";
  ASSERT_EQ(run(kBin + "/switcht5 train" + common + " --run-dir " + (dir / "straight").string() +
                    " --set train.steps=20",
                out), 0) << out;
  ASSERT_EQ(run(kBin + "/switcht5 train" + common + " --run-dir " + (dir / "split").string() +
                    " --set train.steps=10",
                out), 0) << out;
  ASSERT_EQ(run(kBin + "/switcht5 train" + common + " --run-dir " + (dir / "split").string() +
                    " --set train.steps=20 --resume auto",
                out), 0) << out;
  EXPECT_NE(out.find("resumed from"), std::string::npos) << out;
  const auto straight = metrics_by_step(dir / "straight" / "metrics.jsonl");
  const auto split = metrics_by_step(dir / "split" / "metrics.jsonl");
  ASSERT_EQ(straight.size(), 20u);
  ASSERT_EQ(split.size(), 20u);
  for (int step = 11; step <= 20; ++step) {
    EXPECT_EQ(field(split.at(step), "loss"), field(straight.at(step), "loss")) << "step " << step;
    EXPECT_EQ(field(split.at(step), "grad_norm"), field(straight.at(step), "grad_norm"));
  }
  EXPECT_EQ(field(split.at(20), "val_loss"), field(straight.at(20), "val_loss"));
  // eval on the final checkpoint reports the validation loss the run logged at that step.
  ASSERT_EQ(run(kBin + "/switcht5 eval --checkpoint " +
                    (dir / "split" / "checkpoints" / "ckpt-00000020.h5").string(),
                out), 0) << out;
  EXPECT_EQ(field(out, "val_loss"), field(straight.at(20), "val_loss")) << out;
  EXPECT_EQ(field(out, "step"), "20") << out;
}

}  // namespace
