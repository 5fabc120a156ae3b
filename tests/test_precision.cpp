// train.precision: bf16 end to end, as a user runs it (build/switcht5):
//  1. 300 steps of configs/tiny.yaml on the real C4 sample in fp32 and in bf16 (cpu backend):
//     no skipped (non-finite) step, final training loss and validation loss within 2%, and the
//     two runs do differ (the bf16 path is really taken);
//  2. resume in bf16 is bitwise: 4 steps + resume + 4 steps equals 8 straight steps (every
//     logged number, and every dataset checksum of the final checkpoint), with dropout, expert
//     dropout and router jitter on.
// Needs ../shared/data for (1); skips it with the reason when it is absent.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "test_util.h"

namespace {

namespace fs = std::filesystem;
const std::string kBin = std::string(SWITCHT5_BINARY_DIR);
const std::string kSrc = std::string(SWITCHT5_SOURCE_DIR);

switcht5::testing::CommandResult run(const std::string& cmd) {
  return switcht5::testing::run_command(cmd);
}

std::vector<std::string> lines_of(const fs::path& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

double number_after(const std::string& line, const std::string& key) {
  const size_t at = line.find("\"" + key + "\": ");
  if (at == std::string::npos) return std::nan("");
  return std::stod(line.substr(at + key.size() + 4));
}

// A metrics.jsonl line without its timing fields (step_ms, tokens_per_s), which differ run to run.
std::string without_timing(std::string line) {
  for (const char* key : {"\"tokens_per_s\": ", "\"step_ms\": "}) {
    const size_t at = line.find(key);
    if (at == std::string::npos) continue;
    const size_t end = line.find(", ", at);
    line.erase(at, end == std::string::npos ? std::string::npos : end + 2 - at);
  }
  return line;
}

TEST(Precision, Bf16TrainsLikeFp32OnC4) {
  const std::string data = switcht5::testing::shared_data_dir();
  if (data.empty()) GTEST_SKIP() << "../shared/data (T5 vocabulary and C4 sample) is absent";
  const fs::path dir = fs::temp_directory_path() / "switcht5_test_precision_c4";
  fs::remove_all(dir);
  for (const auto& [name, input] :
       {std::pair{"train", "c4/c4-en-train-00000-first1000.json.gz"},
        std::pair{"val", "c4/olmo/c4-sample.00000-of-00001.json.gz"}}) {
    auto r = run(kBin + "/switcht5-data tokenize --quiet --spm " + data + "/spiece.model --output " +
                 (dir / name).string() + " --input " + data + "/" + input);
    ASSERT_EQ(r.code, 0) << r.output;
  }
  double final_loss[2], final_val[2];
  for (int p = 0; p < 2; ++p) {
    const std::string precision = p == 0 ? "fp32" : "bf16";
    const fs::path run_dir = dir / precision;
    auto r = run(kBin + "/switcht5 train --config " + kSrc + "/configs/tiny.yaml --run-dir " +
                 run_dir.string() + " --set data.train_glob=" + (dir / "train").string() +
                 "/'*.shard' --set data.val_glob=" + (dir / "val").string() +
                 "/'*.shard' --set train.steps=300 --set train.eval_every=300 --set log.every=10"
                 " --set train.precision=" + precision);
    ASSERT_EQ(r.code, 0) << r.output;
    const auto lines = lines_of(run_dir / "metrics.jsonl");
    ASSERT_EQ(lines.size(), 31u) << precision;  // steps 1, 10, 20, ..., 300
    for (const std::string& l : lines) {
      EXPECT_EQ(l.find("\"skipped\": true"), std::string::npos) << precision << ": " << l;
      EXPECT_TRUE(std::isfinite(number_after(l, "loss"))) << precision << ": " << l;
    }
    final_loss[p] = number_after(lines.back(), "loss");
    final_val[p] = number_after(lines.back(), "val_loss");
    ASSERT_TRUE(std::isfinite(final_val[p])) << lines.back();
  }
  std::printf("final loss fp32 %.6f bf16 %.6f; val_loss fp32 %.6f bf16 %.6f\n", final_loss[0],
              final_loss[1], final_val[0], final_val[1]);
  EXPECT_LT(final_loss[0], 7.0) << "fp32 did not learn (log(32128) = 10.4 at the start)";
  EXPECT_NEAR(final_loss[1], final_loss[0], 0.02 * final_loss[0]);
  EXPECT_NEAR(final_val[1], final_val[0], 0.02 * final_val[0]);
  EXPECT_NE(final_loss[1], final_loss[0]) << "bf16 gave fp32's numbers: is the bf16 path taken?";
}

TEST(Precision, Bf16ResumeIsBitwise) {
  const fs::path dir = fs::temp_directory_path() / "switcht5_test_precision_resume";
  fs::remove_all(dir);
  const std::string common = kBin + "/switcht5 train --config " + kSrc +
                             "/configs/tiny-synthetic.yaml --set train.precision=bf16"
                             " --set log.every=1 --set model.dropout_rate=0.1"
                             " --set model.expert_dropout=0.2 --set model.router_jitter_noise=0.01"
                             " --set train.eval_every=4 --set checkpoint.every=4";
  auto r = run(common + " --run-dir " + (dir / "straight").string() + " --set train.steps=8");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run(common + " --run-dir " + (dir / "resumed").string() + " --set train.steps=4");
  ASSERT_EQ(r.code, 0) << r.output;
  r = run(common + " --run-dir " + (dir / "resumed").string() + " --set train.steps=8 --resume auto");
  ASSERT_EQ(r.code, 0) << r.output;
  const auto a = lines_of(dir / "straight" / "metrics.jsonl");
  const auto b = lines_of(dir / "resumed" / "metrics.jsonl");
  ASSERT_EQ(a.size(), 8u);
  ASSERT_EQ(b.size(), 8u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(without_timing(a[i]), without_timing(b[i]));
  // Every dataset of the final checkpoint (parameters and optimizer state) has the same checksum.
  auto checksums = [&](const fs::path& ckpt) {
    auto out = run(kBin + "/switcht5 inspect " + ckpt.string());
    EXPECT_EQ(out.code, 0) << out.output;
    std::istringstream in(out.output);
    std::vector<std::string> sums;
    for (std::string l; std::getline(in, l);)
      if (l.find("checksum 0x") != std::string::npos) sums.push_back(l);
    return sums;
  };
  const auto sa = checksums(dir / "straight" / "checkpoints" / "ckpt-00000008.h5");
  const auto sb = checksums(dir / "resumed" / "checkpoints" / "ckpt-00000008.h5");
  EXPECT_GT(sa.size(), 20u);
  EXPECT_EQ(sa, sb);
}

}  // namespace
