// The switcht5 binary as a user runs it: bad configs and command lines end with exit code 2 and
// one line naming the file:line, key, value and what is allowed; plan and a short train work.
// Also switcht5-data where both share a contract: bad inputs of either program, and a shard
// `switcht5-data inspect` must judge as training does.
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <regex>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "core/check.h"
#include "core/rng.h"
#include "data/shard.h"
#include "test_util.h"
#include "train/run_lock.h"

namespace {

const std::string kBin = std::string(SWITCHT5_BINARY_DIR) + "/switcht5";
const std::string kTiny = std::string(SWITCHT5_SOURCE_DIR) + "/configs/tiny-synthetic.yaml";

using Result = switcht5::testing::CommandResult;

Result run(const std::string& args) { return switcht5::testing::run_command(kBin + " " + args); }
// The same with environment assignments ("NAME=value ...") for the command only.
Result run_with_env(const std::string& env, const std::string& args) {
  return switcht5::testing::run_command("env " + env + " " + kBin + " " + args);
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string write_config(const std::string& name, const std::string& text) {
  auto path = std::filesystem::temp_directory_path() / ("switcht5_cli_" + name + ".yaml");
  std::ofstream(path) << text;
  return path.string();
}

struct BadCase {
  const char* name;
  const char* yaml;        // config text ("" = use tiny-synthetic.yaml)
  std::string extra_args;  // appended to "train --config FILE"
  std::vector<std::string> expect;  // substrings of the message
};

class BadInput : public ::testing::TestWithParam<BadCase> {};

TEST_P(BadInput, ExitsWithCode2AndOneClearLine) {
  const BadCase& c = GetParam();
  const std::string cfg = *c.yaml ? write_config(c.name, c.yaml) : kTiny;
  Result r = run("train --config " + cfg + " --run-dir " +
                 (std::filesystem::temp_directory_path() / "switcht5_cli_run").string() + " " +
                 c.extra_args);
  EXPECT_EQ(r.code, 2) << r.output;
  for (const std::string& s : c.expect) EXPECT_NE(r.output.find(s), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("| loss"), std::string::npos) << "training must not start: " << r.output;
}

INSTANTIATE_TEST_SUITE_P(
    Cli, BadInput,
    ::testing::Values(
        BadCase{"unknown_key", "model:\n  d_model: 64\n  d_modle: 3\n", "",
                {"switcht5_cli_unknown_key.yaml:3", "model.d_modle", "d_model"}},
        BadCase{"bad_type", "model:\n  d_model: abc\n", "",
                {"switcht5_cli_bad_type.yaml:2", "model.d_model", "abc", "integer"}},
        BadCase{"bad_value", "train:\n  optimizer: sgd\n", "",
                {"switcht5_cli_bad_value.yaml:2", "train.optimizer", "sgd", "adafactor"}},
        BadCase{"impossible", "train:\n  batch_size: 10\n  grad_accum_steps: 3\n", "",
                {"train.grad_accum_steps", "3", "10"}},
        BadCase{"unknown_section", "modle:\n  d_model: 3\n", "", {"unknown section", "modle"}},
        BadCase{"bad_set", "", "--set model.num_heads=0", {"--set model.num_heads=0", "num_heads"}},
        BadCase{"bad_set_form", "", "--set foo", {"--set foo", "section.key=value"}},
        BadCase{"set_unknown", "", "--set train.stepz=3", {"train.stepz"}},
        BadCase{"unknown_flag", "", "--frobnicate", {"--frobnicate"}},
        // A second --config no longer replaces the first (a missing config file is in
        // EveryBadInputIsExit2AndOneLine).
        BadCase{"config_twice", "", "--config /nonexistent/x.yaml", {"--config is given twice"}},
        BadCase{"bad_backend", "", "--set train.backend=tpu", {"train.backend", "tpu"}},
        BadCase{"bad_precision", "train:\n  precision: fp16\n", "",
                {"switcht5_cli_bad_precision.yaml:2", "train.precision", "fp16", "bf16"}},
        BadCase{"graphs_on_cpu", "", "--set train.cuda_graphs=true",
                {"train.cuda_graphs: true", "train.backend: cuda", "'cpu'"}},
        BadCase{"bad_graphs", "train:\n  cuda_graphs: sometimes\n", "",
                {"switcht5_cli_bad_graphs.yaml:2", "train.cuda_graphs", "sometimes"}},
        BadCase{"resume_missing", "", "--resume /nonexistent/ckpt.h5",
                {"/nonexistent/ckpt.h5", "no such file or directory"}},
        BadCase{"resume_not_hdf5", "", std::string("--resume ") + kTiny,
                {"tiny-synthetic.yaml", "not a readable HDF5 checkpoint"}}),
    [](const auto& info) { return std::string(info.param.name); });

// train.backend: cuda where it cannot run is one line and exit 2: in a build without the CUDA
// backend, and (CUDA_VISIBLE_DEVICES empty hides every GPU, on any machine) with no GPU visible.
TEST(Cli, CudaBackendUnavailableIsOneClearLine) {
  Result r = run_with_env("CUDA_VISIBLE_DEVICES=", "train --config " + kTiny + " --run-dir " +
                          (std::filesystem::temp_directory_path() / "switcht5_cli_cuda").string() +
                          " --set train.backend=cuda");
  EXPECT_EQ(r.code, 2) << r.output;
#if SWITCHT5_HAVE_CUDA
  const std::vector<std::string> parts = {"train.backend 'cuda'", "no CUDA GPU is visible",
                                          "CUDA_VISIBLE_DEVICES="};
#else
  const std::vector<std::string> parts = {"train.backend 'cuda'", "no CUDA backend",
                                          "-DSWITCHT5_CUDA=ON"};
#endif
  for (const std::string& p : parts) EXPECT_NE(r.output.find(p), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("| loss"), std::string::npos) << "training must not start: " << r.output;
}

// One run per directory (train/run_lock.h): while a trainer holds a run directory, a second
// `switcht5 train` on it stops with one line naming the holder, exit 2, and writes nothing
// there; once the holder is gone the directory is free again.
TEST(Cli, SecondTrainerOnARunDirectoryStops) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / "switcht5_cli_locked_run";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string log_text = "the first run's log\n";
  std::ofstream(dir / "train.log") << log_text;
  {
    switcht5::RunDirLock held(dir.string());  // as the first trainer's rank 0 holds it
    EXPECT_THROW(switcht5::RunDirLock again(dir.string()), switcht5::UserError);
    Result r = run("train --config " + kTiny + " --run-dir " + dir.string() +
                   " --set train.steps=2");
    EXPECT_EQ(r.code, 2) << r.output;
    for (const std::string& p :
         {std::string("is in use by another switcht5 train"), "pid " + std::to_string(getpid()),
          dir.string()})
      EXPECT_NE(r.output.find(p), std::string::npos) << r.output;
    EXPECT_EQ(r.output.find("| loss"), std::string::npos) << "training must not start";
    std::ifstream f(dir / "train.log");
    EXPECT_EQ(std::string(std::istreambuf_iterator<char>(f), {}), log_text);
    EXPECT_FALSE(std::filesystem::exists(dir / "config.yaml"));
    EXPECT_FALSE(std::filesystem::exists(dir / "metrics.jsonl"));
  }
  Result r = run("train --config " + kTiny + " --run-dir " + dir.string() +
                 " --set train.steps=2");
  EXPECT_EQ(r.code, 0) << r.output;
}

// eval --dump-batch never overwrites a file (here the checkpoint itself) without --force.
TEST(Cli, DumpBatchRefusesToOverwrite) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / "switcht5_cli_dump_run").string();
  std::filesystem::remove_all(dir);
  Result t = run("train --config " + kTiny + " --run-dir " + dir + " --set train.steps=1");
  ASSERT_EQ(t.code, 0) << t.output;
  const std::string ckpt = dir + "/checkpoints/ckpt-00000001.h5";
  ASSERT_TRUE(std::filesystem::exists(ckpt));
  const auto size = std::filesystem::file_size(ckpt);
  Result r = run("eval --checkpoint " + ckpt + " --dump-batch " + ckpt);
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--dump-batch " + ckpt + ": the file exists; pass --force"),
            std::string::npos)
      << r.output;
  EXPECT_EQ(std::filesystem::file_size(ckpt), size);
  const std::string out = dir + "/dump.h5";
  EXPECT_EQ(run("eval --checkpoint " + ckpt + " --dump-batch " + out).code, 0);
  EXPECT_EQ(run("eval --checkpoint " + ckpt + " --dump-batch " + out).code, 2);
  EXPECT_EQ(run("eval --checkpoint " + ckpt + " --dump-batch " + out + " --force").code, 0);
}

// --help after a command prints the usage and exits 0 (it was an unknown option, exit 2).
TEST(Cli, HelpOnASubcommand) {
  for (const char* args : {"--help", "train --help", "plan -h", "eval --checkpoint x --help",
                           "inspect --help"}) {
    Result r = run(args);
    EXPECT_EQ(r.code, 0) << args << "\n" << r.output;
    EXPECT_NE(r.output.find("usage"), std::string::npos) << args << "\n" << r.output;
  }
}

// plan's machine and layout flags: a bad value is one line naming the flag, exit 2.
TEST(Cli, PlanFlagsBadValues) {
  for (const auto& [args, part] : std::vector<std::pair<std::string, std::string>>{
           {"--world-size 0", "--world-size \"0\": expected a whole number of ranks >= 1"},
           {"--world-size 2.5", "--world-size \"2.5\""},
           {"--world-size 3 --set parallel.model=2",
            "--world-size 3: expected a multiple of parallel.model = 2"},
           {"--gpus-per-node eight", "--gpus-per-node \"eight\""},
           {"--network-gbs -1", "--network-gbs \"-1\": expected GB/s > 0"},
           {"--mfu 1.5", "--mfu"}}) {
    Result r = run("plan --config " + kTiny + " " + args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(part), std::string::npos) << args << "\n" << r.output;
  }
  Result ok = run("plan --config " + kTiny + " --world-size 4 --set parallel.expert=2");
  EXPECT_EQ(ok.code, 0) << ok.output;
  EXPECT_NE(ok.output.find("communication per rank and step (4 ranks"), std::string::npos)
      << ok.output;
}

TEST(Cli, EvalAndInspectBadInput) {
  const std::string not_ckpt = write_config("not_a_checkpoint", "model:\n  d_model: 8\n");
  for (const auto& [args, parts] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"eval", {"eval: --checkpoint CKPT is required"}},
           {"eval --checkpoint /nonexistent/c.h5", {"/nonexistent/c.h5", "no such file"}},
           {"eval --checkpoint " + not_ckpt, {not_ckpt, "not a readable HDF5 checkpoint"}},
           {"inspect", {"inspect: expected one checkpoint file"}},
           {"inspect a.h5 b.h5", {"inspect: expected one checkpoint file"}},
           {"inspect " + not_ckpt, {not_ckpt, "not a readable HDF5 checkpoint"}},
           {"train --config " + kTiny + " stray", {"unexpected argument \"stray\""}}}) {
    Result r = run(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.output;
    for (const std::string& p : parts) EXPECT_NE(r.output.find(p), std::string::npos) << args << "\n" << r.output;
  }
}

// inspect --hf-names: ParamStore::hf_names() as the JSON scripts/export_hf.py and import_hf.py
// read (tests/hf checks the tables work end to end); a config and its checkpoint agree.
TEST(Cli, InspectHfNamesPrintsTheNameTable) {
  Result r = run("inspect --hf-names --config " + kTiny);
  ASSERT_EQ(r.code, 0) << r.output;
  // Stacked experts [4, 128, 64] split into HF's per-expert tensors, expert j at j * 128 * 64.
  for (const char* line :
       {"\"encoder.block.1.layer.1.mlp.experts.wi.weight\": [4, 128, 64],",
        "\"encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight\": {\"name\": "
        "\"encoder.block.1.layer.1.mlp.experts.wi.weight\", \"offset\": 24576, \"shape\": [128, "
        "64]},",
        "\"decoder.block.1.layer.2.mlp.experts.expert_0.wo.weight\": {\"name\": "
        "\"decoder.block.1.layer.2.mlp.experts.wo.weight\", \"offset\": 0, \"shape\": [64, 128]},",
        "\"shared.weight\": {\"name\": \"shared.weight\", \"offset\": 0, \"shape\": [128, 64]},"})
    EXPECT_NE(r.output.find(line), std::string::npos) << line << "\n" << r.output;
  EXPECT_EQ(r.output.find("expert_4"), std::string::npos) << r.output;
  Result gated =
      run("inspect --hf-names --config " + kTiny + " --set model.feed_forward_proj=gated-gelu");
  ASSERT_EQ(gated.code, 0) << gated.output;
  EXPECT_NE(gated.output.find("\"encoder.block.1.layer.1.mlp.experts.expert_2.wi_1.weight\": "
                              "{\"name\": \"encoder.block.1.layer.1.mlp.experts.wi_1.weight\", "
                              "\"offset\": 16384"),
            std::string::npos)
      << gated.output;

  // The checkpoint of a run of that config gives the same table.
  const auto dir = std::filesystem::temp_directory_path() / "switcht5_cli_hf_names";
  std::filesystem::remove_all(dir);
  ASSERT_EQ(run("train --config " + kTiny + " --run-dir " + dir.string() + " --set train.steps=1").code, 0);
  Result from_ckpt = run("inspect --hf-names " + (dir / "checkpoints").string());
  ASSERT_EQ(from_ckpt.code, 0) << from_ckpt.output;
  auto after_source = [](const std::string& s) { return s.substr(s.find("\"params\"")); };
  EXPECT_EQ(after_source(from_ckpt.output), after_source(r.output));
  EXPECT_NE(from_ckpt.output.find("ckpt-00000001.h5"), std::string::npos) << from_ckpt.output;

  // Misuse: exit code 2 and one line naming what is wrong.
  const std::string not_ckpt = write_config("hf_names_not_ckpt", "model:\n  d_model: 8\n");
  for (const auto& [args, part] : std::vector<std::pair<std::string, std::string>>{
           {"inspect --hf-names", "inspect --hf-names: expected one checkpoint or --config FILE, got 0"},
           {"inspect --hf-names a.h5 --config " + kTiny, "expected one checkpoint or --config FILE, got 2"},
           {"inspect --hf-names " + not_ckpt, not_ckpt + ": not a readable HDF5 checkpoint"},
           {"inspect --hf-names --config /nonexistent/c.yaml", "/nonexistent/c.yaml"},
           {"plan --hf-names --config " + kTiny, "unknown option \"--hf-names\" for \"plan\""}}) {
    Result bad = run(args);
    EXPECT_EQ(bad.code, 2) << args << "\n" << bad.output;
    EXPECT_NE(bad.output.find(part), std::string::npos) << args << "\n" << bad.output;
    if (args.rfind("inspect", 0) == 0) {
      EXPECT_EQ(bad.output.find('\n'), bad.output.size() - 1) << "one line: " << bad.output;
    }
  }
}

// parallel.bucket_mb: a size in MiB in (0, 1048576]; anything else is one line and exit 2,
// whether it comes from the file or from --set.
TEST(Cli, BadBucketSizeIsOneLineAndExit2) {
  const std::string run_dir =
      (std::filesystem::temp_directory_path() / "switcht5_cli_bucket").string();
  const std::string file = write_config("bad_bucket_mb", "parallel:\n  bucket_mb: 0\n");
  for (const auto& [args, parts] : std::vector<std::pair<std::string, std::vector<std::string>>>{
           {"--config " + kTiny + " --set parallel.bucket_mb=0",
            {"--set parallel.bucket_mb=0", "parallel.bucket_mb: got 0",
             "expected a number in (0, 1048576]"}},
           {"--config " + kTiny + " --set parallel.bucket_mb=-2.5", {"got -2.5", "(0, 1048576]"}},
           {"--config " + kTiny + " --set parallel.bucket_mb=lots", {"got \"lots\""}},
           {"--config " + kTiny + " --set parallel.bucket_mb=2e6", {"got 2e6", "(0, 1048576]"}},
           {"--config " + file, {"switcht5_cli_bad_bucket_mb.yaml:2", "parallel.bucket_mb"}}}) {
    Result r = run("train " + args + " --run-dir " + run_dir);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.output;
    EXPECT_EQ(r.output.find('\n'), r.output.size() - 1) << "one line: " << r.output;
    for (const std::string& p : parts)
      EXPECT_NE(r.output.find(p), std::string::npos) << args << "\n" << r.output;
  }
  // A good value trains (and is written to the resolved config).
  std::filesystem::remove_all(run_dir);
  Result ok = run("train --config " + kTiny + " --run-dir " + run_dir +
                  " --set train.steps=1 --set parallel.bucket_mb=0.5");
  EXPECT_EQ(ok.code, 0) << ok.output;
  EXPECT_NE(read_file(std::filesystem::path(run_dir) / "config.yaml").find("bucket_mb: 0.5"),
            std::string::npos);
}

TEST(Cli, UnknownCommandAndMissingConfig) {
  Result r = run("frobnicate");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.output.find("unknown command"), std::string::npos) << r.output;
  r = run("train");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.output.find("--config"), std::string::npos) << r.output;
}

TEST(Cli, PlanPrintsTheModel) {
  Result r = run("plan --config " + std::string(SWITCHT5_SOURCE_DIR) + "/configs/switch-base-8.yaml");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("parameters:"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("Switch blocks [1,3,5,7,9,11]"), std::string::npos) << r.output;
  // switch-base-8: 166,354,176 parameters outside the experts, 8 x 56,623,104 in them.
  EXPECT_NE(r.output.find("parameters: 619339008 (166354176 outside experts, 452984832 in experts)"),
            std::string::npos) << r.output;
  EXPECT_NE(r.output.find("per rank (data 1 x model 1, experts over 1): parameters 2477.4 MB"),
            std::string::npos) << r.output;
  // Experts over 8 ranks: each holds 1/8 of the expert parameters (452984832 / 8 + 166354176).
  r = run("plan --config " + std::string(SWITCHT5_SOURCE_DIR) +
          "/configs/switch-base-8.yaml --set parallel.data=8 --set parallel.expert=8");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("per rank (data 8 x model 1, experts over 8): parameters 891.9 MB"),
            std::string::npos) << r.output;
}

TEST(Cli, ShortTrainWritesTheRunDirectory) {
  const auto dir = std::filesystem::temp_directory_path() / "switcht5_cli_train";
  std::filesystem::remove_all(dir);
  Result r = run("train --config " + kTiny + " --run-dir " + dir.string() +
                 " --set train.steps=3 --set log.every=1");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("step      3"), std::string::npos) << r.output;
  for (const char* f : {"config.yaml", "train.log", "metrics.jsonl"})
    EXPECT_TRUE(std::filesystem::exists(dir / f)) << f;
  // Piped output and the log file are plain text: no ANSI escape sequences.
  EXPECT_EQ(r.output.find('\x1b'), std::string::npos) << r.output;
  EXPECT_EQ(read_file(dir / "train.log").find('\x1b'), std::string::npos);
}

// Progress: every log line carries step/total, elapsed and ETA; on a terminal (one process, no
// SLURM) a bar is redrawn in place with carriage returns; piped output has no carriage return.
TEST(Cli, ProgressBarOnlyOnATerminal) {
  if (switcht5::testing::run_command("script --version").code != 0)
    GTEST_SKIP() << "util-linux 'script' is not available to provide a pseudo-terminal";
  const auto dir = std::filesystem::temp_directory_path() / "switcht5_cli_progress";
  std::filesystem::remove_all(dir);
  const std::string train = kBin + " train --config " + kTiny + " --run-dir " + dir.string() +
                            " --set train.steps=40 --set log.every=20";
  Result r = switcht5::testing::run_command("env -u SLURM_JOB_ID TERM=xterm script -qec '" + train +
                                            "' /dev/null");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("\r[####################] 40/40 100% | loss "), std::string::npos) << r.output;
  // The elapsed time is not fixed (a loaded machine ran these 40 tiny steps in 35 s): its shape is.
  auto at_step = [](int step) {
    return std::regex(" \\| " + std::to_string(step) + R"(/40 \| \d+:\d\d elapsed, ETA \d+:\d\d)");
  };
  EXPECT_TRUE(std::regex_search(r.output, at_step(20))) << r.output;
  std::filesystem::remove_all(dir);
  r = run("train --config " + kTiny + " --run-dir " + dir.string() +
          " --set train.steps=40 --set log.every=20");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(r.output.find('\r'), std::string::npos) << "a bar in piped output";
  EXPECT_TRUE(std::regex_search(r.output, at_step(40))) << r.output;
  EXPECT_NE(r.output.find("elapsed, ETA 0:00"), std::string::npos) << r.output;
}

// On a terminal the console colours the level names (so the check above can fail), while
// train.log stays plain; NO_COLOR and TERM=dumb turn the colours off. `script` (util-linux,
// in every Debian) runs the trainer on a pseudo-terminal.
TEST(Cli, ColoursOnlyOnATerminal) {
  if (switcht5::testing::run_command("script --version").code != 0)
    GTEST_SKIP() << "util-linux 'script' is not available to provide a pseudo-terminal";
  const auto dir = std::filesystem::temp_directory_path() / "switcht5_cli_tty";
  for (const std::string env : {"TERM=xterm", "TERM=xterm NO_COLOR=1", "TERM=dumb"}) {
    std::filesystem::remove_all(dir);
    const std::string train = kBin + " train --config " + kTiny + " --run-dir " + dir.string() +
                              " --set train.steps=2 --set log.every=1";
    Result r = switcht5::testing::run_command("env " + env + " script -qec '" + train + "' /dev/null");
    EXPECT_EQ(r.code, 0) << env << "\n" << r.output;
    EXPECT_NE(r.output.find("step      2"), std::string::npos) << env << "\n" << r.output;
    const bool coloured = r.output.find("\x1b[") != std::string::npos;
    EXPECT_EQ(coloured, env == "TERM=xterm") << env << "\n" << r.output;
    EXPECT_EQ(read_file(dir / "train.log").find('\x1b'), std::string::npos) << env;
  }
}

// ---- inputs as a user gives them: one exit-code contract, one line, no hang --------------

namespace fs = std::filesystem;
const std::string kDataBin = std::string(SWITCHT5_BINARY_DIR) + "/switcht5-data";

// Token shards for tiny-synthetic.yaml's model (vocab_size 128): SentencePiece-like ids below
// `vocab`, with data.extra_ids = 20 sentinels above them (100 + 20 - 1 < 128).
constexpr uint64_t kShardVocab = 100;
const std::string kShardFlags = "--set data.source=shards --set data.extra_ids=20 --set train.eval_every=0";

// Writes a shard of `docs` random documents of 1..40 tokens, each ending with EOS = 1.
void write_shard(const fs::path& path, uint64_t vocab = kShardVocab, int docs = 200,
                 uint64_t seed = 1) {
  fs::create_directories(path.parent_path());
  switcht5::CounterRng rng(seed);
  switcht5::ShardWriter w(path.string(), vocab);
  for (int d = 0; d < docs; ++d) {
    std::vector<int32_t> doc(1 + rng.next_below(40));
    for (auto& t : doc) t = 3 + int32_t(rng.next_below(vocab - 3));
    doc.back() = 1;
    w.add_document(doc);
  }
  w.finish();
}

std::vector<char> read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(f), {});
}

void write_bytes(const fs::path& p, const std::vector<char>& b) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary | std::ios::trunc).write(b.data(), std::streamsize(b.size()));
}

// A copy of `good` at `path` with `damage` applied to its bytes; with `fix_checksum` the header's
// crc32 is made to match again, so that a later check is the one that fails.
void write_damaged(const fs::path& good, const fs::path& path,
                   const std::function<void(std::vector<char>&)>& damage, bool fix_checksum = false) {
  std::vector<char> b = read_bytes(good);
  damage(b);
  if (fix_checksum) {
    const auto* data = reinterpret_cast<const Bytef*>(b.data()) + switcht5::kShardHeaderBytes;
    const uint64_t crc = ::crc32(::crc32(0, nullptr, 0), data,
                                 static_cast<uInt>(b.size() - switcht5::kShardHeaderBytes));
    std::memcpy(b.data() + 40, &crc, 8);
  }
  write_bytes(path, b);
}

// Runs `command` (a shell command line) under `timeout 10`, so that a regression to a hang
// fails instead of hanging the suite; keeps stderr only (stdout is dropped).
Result run_for_stderr(const std::string& command) {
  return switcht5::testing::run_command("( timeout 10 " + command + " 2>&1 >/dev/null )");
}

// The message after "<program>: error: " on the last line of `err`, or "" if none.
std::string error_message(const std::string& err) {
  const size_t at = err.rfind(": error: ");
  if (at == std::string::npos) return "";
  const size_t end = err.find('\n', at);
  return err.substr(at + 9, end == std::string::npos ? std::string::npos : end - at - 9);
}

// Every way a user can hand either program a bad input: exit code 2 (never 1, never a hang:
// `timeout` answers 124), exactly one line on stderr naming what is wrong, and no internal
// check text ("check failed", "file.cpp:line").
TEST(Cli, EveryBadInputIsExit2AndOneLine) {
  const fs::path d = fs::temp_directory_path() / "switcht5_cli_inputs";
  fs::remove_all(d);
  fs::create_directories(d / "dir.yaml");
  ASSERT_EQ(::mkfifo((d / "fifo").c_str(), 0600), 0) << std::strerror(errno);
  fs::create_symlink(d / "nowhere.yaml", d / "dangling.yaml");
  {
    std::ofstream big(d / "big.yaml");
    for (int i = 0; i < 110000; ++i) big << "# padding\n";  // 1,100,000 bytes > 1 MiB
  }
  std::ofstream(d / "bad_yaml.yaml") << "model: [1, 2\n";
  std::ofstream(d / "type.yaml") << "model:\n  d_model: abc\n";
  std::ofstream(d / "range.yaml") << "model:\n  num_heads: 0\n";
  std::ofstream(d / "unknown.yaml") << "train:\n  stepz: 3\n";
  std::ofstream(d / "not_a_model.txt") << "hello\n";
  std::ofstream(d / "doc.jsonl") << "{\"text\": \"hello\"}\n";
  const fs::path good = d / "good/part.shard";
  write_shard(good);
  write_damaged(good, d / "magic/part.shard", [](auto& b) { b[0] = 'X'; });
  write_damaged(good, d / "truncated/part.shard", [](auto& b) { b.resize(b.size() - 6); });
  write_damaged(good, d / "checksum/part.shard", [](auto& b) { b[b.size() - 3] ^= 0x01; });
  write_shard(d / "bigvocab/part.shard", 1000);
  write_shard(d / "mixed/a.shard", kShardVocab);
  write_shard(d / "mixed/b.shard", kShardVocab - 10);
  fs::create_directories(d / "dirshard/x.shard");
  fs::create_directories(d / "fifoshard");
  ASSERT_EQ(::mkfifo((d / "fifoshard/x.shard").c_str(), 0600), 0) << std::strerror(errno);

  const std::string s = (d / "").string();  // the directory, with a trailing '/'
  // {run}: a run directory of the case's own, so that a case that trained by mistake cannot
  // change what the next one meets.
  const std::string train = kBin + " train --run-dir {run} --config ";
  const std::string on_shards = kBin + " train --run-dir {run} --config " + kTiny + " " +
                                kShardFlags + " --set data.train_glob=";
  const std::string data = kDataBin + " ";
  const std::string tok = data + "tokenize --output " + s + "out ";
  const std::vector<std::pair<std::string, std::string>> cases = {
      // switcht5: the config file
      {train + s + "none.yaml", "config " + s + "none.yaml: cannot open (No such file or directory)"},
      {train + s + "dangling.yaml", "a symbolic link to a missing file"},
      {train + s + "dir.yaml", "config " + s + "dir.yaml: expected a regular file, got a directory"},
      {train + "/dev/zero", "config /dev/zero: expected a regular file, got a character device"},
      {train + s + "fifo", "config " + s + "fifo: expected a regular file, got a FIFO"},
      // a checkpoint that is a FIFO: HDF5's open would block for ever
      {train + kTiny + " --resume " + s + "fifo", "checkpoint " + s + "fifo: expected a regular file, got a FIFO"},
      {kBin + " eval --checkpoint " + s + "fifo", "checkpoint " + s + "fifo: expected a regular file, got a FIFO"},
      {kBin + " inspect " + s + "fifo", "checkpoint " + s + "fifo: expected a regular file, got a FIFO"},
      {train + s + "big.yaml", "big.yaml: 1100000 bytes, more than the 1048576 bytes a config may have"},
      {train + s + "bad_yaml.yaml", "bad_yaml.yaml:2: invalid YAML"},
      {train + s + "type.yaml", "type.yaml:2: model.d_model: got \"abc\", expected an integer"},
      {train + s + "range.yaml", "range.yaml:2: model.num_heads: got 0, expected an integer >= 1"},
      {train + s + "unknown.yaml", "unknown key \"train.stepz\""},
      // switcht5: the command line
      {train + kTiny + " --set foo", "--set foo: expected section.key=value"},
      {train + kTiny + " --set train.steps=-1", "train.steps: got -1"},
      {train + kTiny + " --frobnicate", "unknown option \"--frobnicate\" for \"train\""},
      {train + kTiny + " --config " + kTiny, "--config is given twice; give it once"},
      {train + kTiny + " --run-dir " + s + "run2", "--run-dir is given twice"},
      {kBin + " plan --json --config " + kTiny + " --json", "--json is given twice"},
      {kBin + " train --config", "--config needs a value"},
      {kBin + " trian --config " + kTiny, "unknown command \"trian\""},
      {kBin + " eval", "eval: --checkpoint CKPT is required"},
      {kBin + " plan --config " + kTiny + " --mfu 2", "--mfu \"2\": expected a fraction in (0, 1]"},
      // switcht5: token shards
      {on_shards + s + "none/'*.shard'", "data.train_glob: no files match \"" + s + "none/*.shard\""},
      {on_shards + s + "fifoshard/x.shard", "token shard " + s + "fifoshard/x.shard: expected a regular file, got a FIFO"},
      {on_shards + s + "dirshard/'*'", "token shard " + s + "dirshard/x.shard: expected a regular file, got a directory"},
      {on_shards + s + "magic/part.shard", s + "magic/part.shard: bad magic (not a switcht5 token shard)"},
      {on_shards + s + "truncated/part.shard", s + "truncated/part.shard: truncated file"},
      {on_shards + s + "checksum/part.shard", s + "checksum/part.shard: checksum mismatch"},
      {on_shards + s + "bigvocab/part.shard", "model.vocab_size: got 128, expected more than 1019"},
      {on_shards + s + "mixed/'*.shard'", "b.shard: vocabulary size 90 differs from 100"},
      // switcht5-data
      {tok + "--input " + s + "doc.jsonl --spm " + s + "fifo", "SentencePiece model " + s + "fifo: expected a regular file, got a FIFO"},
      {tok + "--input " + s + "doc.jsonl --spm " + s + "dir.yaml", "got a directory"},
      {tok + "--input " + s + "doc.jsonl --spm " + s + "none.model", "SentencePiece model " + s + "none.model: cannot open"},
      {tok + "--input " + s + "doc.jsonl --spm " + s + "not_a_model.txt", "not_a_model.txt: cannot load the SentencePiece model"},
      {tok + "--spm x.model --input " + s + "fifo", "input " + s + "fifo: expected a regular file, got a FIFO"},
      {tok + "--spm x.model --input " + s + "'nothing*.json.gz'", "--input: no files match"},
      {tok + "--spm x.model --input a --threads 2 --threads=3", "tokenize: --threads is given twice"},
      {tok + "--spm x.model --input a --threads many", "--threads: expected an integer, got \"many\""},
      {data + "inspect " + s + "fifo", "token shard " + s + "fifo: expected a regular file, got a FIFO"},
      {data + "inspect /dev/zero", "token shard /dev/zero: expected a regular file, got a character device"},
      {data + "inspect " + s + "dir.yaml", "got a directory"},
      {data + "inspect " + s + "none.shard", "token shard " + s + "none.shard: cannot open"},
      {data + "inspect " + s + "magic/part.shard", "bad magic"},
      {data + "inspect " + good.string() + " --docs 1 --docs 2", "inspect: --docs is given twice"},
      {data + "spm-train --input " + s + "doc.jsonl --model-prefix " + s + "m --vocab-size 3", "--vocab-size: must be at least 8, got 3"},
      {data + "detokenize", "unknown command \"detokenize\""},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    std::string command = cases[i].first;
    const std::string& fragment = cases[i].second;
    if (const size_t at = command.find("{run}"); at != std::string::npos)
      command.replace(at, 5, s + "run" + std::to_string(i));
    const Result r = run_for_stderr(command);
    EXPECT_EQ(r.code, 2) << command << "\n" << r.output;
    EXPECT_NE(r.output.find(fragment), std::string::npos) << command << "\nwant: " << fragment << "\n" << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << "one line: " << command << "\n" << r.output;
    EXPECT_EQ(r.output.find("check failed"), std::string::npos) << command << "\n" << r.output;
    EXPECT_EQ(r.output.find(".cpp:"), std::string::npos) << command << "\n" << r.output;
  }
  EXPECT_GE(cases.size(), 25u);
}

// `switcht5-data inspect` judges a shard as training does: for each damage training refuses,
// inspect exits 2 with the very message `switcht5 train` gives (one check, in ShardReader).
TEST(Cli, InspectRefusesWhatTrainingRefusesWithTheSameMessage) {
  const fs::path d = fs::temp_directory_path() / "switcht5_cli_inspect_verdict";
  fs::remove_all(d);
  const fs::path good = d / "good/part.shard";
  write_shard(good);
  const auto set_u32 = [](std::vector<char>& b, size_t at, uint32_t v) { std::memcpy(b.data() + at, &v, 4); };
  const auto set_u64 = [](std::vector<char>& b, size_t at, uint64_t v) { std::memcpy(b.data() + at, &v, 8); };
  const size_t tokens_at = switcht5::kShardHeaderBytes + 8 * (200 + 1);
  struct Damage {
    const char* name;
    std::function<void(std::vector<char>&)> apply;
    bool fix_checksum;
    const char* reason;  // a fragment of the message both must give
  };
  const std::vector<Damage> damages = {
      {"magic", [](auto& b) { b[1] = 'x'; }, false, "bad magic"},
      {"truncated", [](auto& b) { b.resize(b.size() - 2); }, false, "truncated file"},
      {"oversized", [](auto& b) { b.push_back(0); }, false, "oversized file"},
      {"version", [&](auto& b) { set_u32(b, 8, 2); }, false, "unsupported shard version 2"},
      {"token_bytes", [&](auto& b) { set_u32(b, 12, 4); }, false, "token_bytes 4 does not fit vocab_size 100"},
      {"offsets", [&](auto& b) { set_u64(b, switcht5::kShardHeaderBytes + 8 * 5, uint64_t(1) << 40); }, true,
       "corrupt document offsets (not monotonic at document 5"},
      {"checksum", [&](auto& b) { b[tokens_at] ^= 0x02; }, false, "checksum mismatch"},
      {"token_id", [&](auto& b) { b[tokens_at] = char(0xff); b[tokens_at + 1] = 0; }, true,
       "token id 255 is outside the vocabulary (vocab_size 100)"},
  };
  for (const Damage& dmg : damages) {
    const fs::path shard = d / dmg.name / "part.shard";
    write_damaged(good, shard, dmg.apply, dmg.fix_checksum);
    const Result t = run_for_stderr(kBin + " train --config " + kTiny + " --run-dir " +
                                    (d / "run").string() + " " + kShardFlags +
                                    " --set data.train_glob=" + shard.string());
    const Result i = run_for_stderr(kDataBin + " inspect " + shard.string());
    EXPECT_EQ(t.code, 2) << dmg.name << "\n" << t.output;
    EXPECT_EQ(i.code, 2) << dmg.name << "\n" << i.output;
    EXPECT_NE(error_message(t.output).find(dmg.reason), std::string::npos) << dmg.name << "\n" << t.output;
    EXPECT_NE(error_message(t.output).find(shard.string()), std::string::npos) << dmg.name << "\n" << t.output;
    EXPECT_EQ(error_message(i.output), error_message(t.output)) << dmg.name;
  }
  // The undamaged shard passes both.
  EXPECT_EQ(run_for_stderr(kDataBin + " inspect " + good.string()).code, 0);
}

// A shard truncated under a running trainer: the run ends with exit code 2 and one line naming
// the shard. When shards were memory-mapped, the next read of the cut-off part took SIGBUS and
// the process died without a word (exit 135 from the shell).
TEST(Cli, ShardTruncatedUnderARunningTrainer) {
  const fs::path d = fs::temp_directory_path() / "switcht5_cli_truncated_shard";
  fs::remove_all(d);
  const fs::path shard = d / "data/part.shard";
  write_shard(shard, kShardVocab, 2000);
  const uint64_t size = fs::file_size(shard);
  const fs::path run_dir = d / "run";
  // In the background, the exit status written to a file; `timeout` bounds a hang.
  const std::string command =
      "( timeout 120 " + kBin + " train --config " + kTiny + " --run-dir " + run_dir.string() +
      " " + kShardFlags + " --set data.train_glob=" + shard.string() +
      " --set train.steps=1000000 --set log.every=1 --set checkpoint.every=0 > " +
      (d / "out.txt").string() + " 2> " + (d / "err.txt").string() + "; echo $? > " +
      (d / "rc.txt").string() + " ) &";
  ASSERT_EQ(std::system(command.c_str()), 0);
  // Wait until it trains (a step in metrics.jsonl), then cut the shard in half.
  const auto t0 = std::chrono::steady_clock::now();
  auto waited = [&] { return std::chrono::steady_clock::now() - t0; };
  while (!(fs::exists(run_dir / "metrics.jsonl") && fs::file_size(run_dir / "metrics.jsonl") > 0) &&
         !fs::exists(d / "rc.txt") && waited() < std::chrono::seconds(60))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_FALSE(fs::exists(d / "rc.txt")) << "the run ended before the shard was cut:\n"
                                         << read_file(d / "err.txt");
  ASSERT_GT(fs::file_size(run_dir / "metrics.jsonl"), 0u) << "no training step in 60 s";
  fs::resize_file(shard, size / 2);
  while (!(fs::exists(d / "rc.txt") && fs::file_size(d / "rc.txt") > 0) && waited() < std::chrono::seconds(150))
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(fs::exists(d / "rc.txt")) << "the run did not end";
  const std::string err = read_file(d / "err.txt");
  EXPECT_EQ(std::stoi(read_file(d / "rc.txt")), 2) << err;
  EXPECT_EQ(err, "switcht5: error: " + shard.string() + ": the token shard changed while in use "
                 "(truncated to " + std::to_string(size / 2) + " bytes from " +
                 std::to_string(size) + "); a shard must stay as it is while a run reads it\n");
}

}  // namespace
