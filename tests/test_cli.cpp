// The switcht5 binary as a user runs it: bad configs and command lines end with exit code 2 and
// one line naming the file:line, key, value and what is allowed; plan and a short train work.
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include <unistd.h>

#include <gtest/gtest.h>

#include "core/check.h"
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
        BadCase{"missing_file", "", "--config /nonexistent/x.yaml", {"/nonexistent/x.yaml"}},
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

}  // namespace
