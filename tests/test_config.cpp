// Run configuration: defaults, the shipped configs/*.yaml, to_yaml round trips, --set overrides,
// and one test per kind of bad input, each checking that the message is one line naming where
// (file:line or the --set argument), the full key, the value and what is allowed.
#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "config/config.h"
#include "config/config_docs.h"
#include "core/check.h"
#include "model/model.h"
#include "model/router.h"

namespace switcht5 {
namespace {

const std::string kConfigDir = std::string(SWITCHT5_SOURCE_DIR) + "/configs";

// The UserError message of parse_config(text, "x.yaml", overrides); fails the test if none.
std::string error_of(const std::string& text, const std::vector<std::string>& overrides = {}) {
  try {
    parse_config(text, "x.yaml", overrides);
  } catch (const UserError& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected UserError, got another exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected UserError for:\n" << text;
  return "";
}

// Passes when `message` is a single line containing every part.
::testing::AssertionResult has_parts(const std::string& message, const std::vector<std::string>& parts) {
  if (message.find('\n') != std::string::npos)
    return ::testing::AssertionFailure() << "message spans lines: " << message;
  for (const auto& part : parts) {
    if (message.find(part) == std::string::npos)
      return ::testing::AssertionFailure() << "missing \"" << part << "\" in: " << message;
  }
  return ::testing::AssertionSuccess();
}

// ---- defaults and helpers -----------------------------------------------------------------

TEST(Config, EmptyTextGivesDefaults) {
  RunConfig c = parse_config("", "empty.yaml", {});
  RunConfig d;
  d.model.num_decoder_layers = d.model.num_layers;
  d.source_path = "empty.yaml";
  EXPECT_EQ(c, d);
  EXPECT_EQ(c.model.vocab_size, 32128);
  EXPECT_EQ(c.model.num_decoder_layers, 12);
  EXPECT_EQ(c.model.feed_forward_proj, "relu");
  EXPECT_DOUBLE_EQ(c.model.layer_norm_epsilon, 1e-6);
  EXPECT_EQ(c.data.source, "synthetic");
  EXPECT_EQ(c.data.targets_length, 114);
  EXPECT_EQ(c.train.optimizer, "adafactor");
  EXPECT_EQ(c.train.schedule, "rsqrt");
  EXPECT_EQ(c.train.backend, "cpu");
  EXPECT_EQ(c.parallel.expert, 1);
  EXPECT_EQ(c.parallel.data_plane, "mpi");
  EXPECT_DOUBLE_EQ(c.parallel.timeout_s, 600.0);
  EXPECT_EQ(c.checkpoint.every, 0);
  EXPECT_EQ(c.log.level, "info");
}

TEST(Config, MissingKeysKeepDefaultsAndSectionsMayBeEmpty) {
  RunConfig c = parse_config("model:\n  d_model: 32\ndata:\ntrain: {}\n", "x.yaml", {});
  EXPECT_EQ(c.model.d_model, 32);
  EXPECT_EQ(c.model.d_ff, 2048);
  EXPECT_EQ(c.train.batch_size, 8);
  EXPECT_EQ(c.source_path, "x.yaml");
}

TEST(Config, NumDecoderLayersFollowsNumLayersWhenAbsent) {
  EXPECT_EQ(parse_config("model: {num_layers: 3}", "x.yaml", {}).model.num_decoder_layers, 3);
  EXPECT_EQ(parse_config("model: {num_layers: 3, num_decoder_layers: 5}", "x.yaml", {})
                .model.num_decoder_layers, 5);
  // The resolution happens after --set, so an override of num_layers carries over.
  EXPECT_EQ(parse_config("", "x.yaml", {"model.num_layers=4"}).model.num_decoder_layers, 4);
}

TEST(Config, ValueSyntax) {
  RunConfig c = parse_config(
      "model:\n  layer_norm_epsilon: 1e-5\n  init_scale: 1\n  d_model: +16\n  tie_word_embeddings: False\n"
      "train:\n  seed: 18446744073709551615\n  steps: 10000000000\nlog:\n  run_dir: 'runs/a b'\n",
      "x.yaml", {});
  EXPECT_DOUBLE_EQ(c.model.layer_norm_epsilon, 1e-5);
  EXPECT_DOUBLE_EQ(c.model.init_scale, 1.0);
  EXPECT_EQ(c.model.d_model, 16);
  EXPECT_FALSE(c.model.tie_word_embeddings);
  EXPECT_EQ(c.train.seed, std::numeric_limits<uint64_t>::max());
  EXPECT_EQ(c.train.steps, int64_t{10000000000});
  EXPECT_EQ(c.log.run_dir, "runs/a b");
}

TEST(Config, Capacity) {
  ModelConfig m;
  m.num_experts = 8;
  m.capacity_factor = 1.25;
  m.eval_capacity_factor = 2.0;
  EXPECT_EQ(expert_capacity(m, 512, true), 80);    // 1.25 * 512 / 8
  EXPECT_EQ(expert_capacity(m, 512, false), 128);  // 2.0 * 512 / 8
  EXPECT_EQ(expert_capacity(m, 100, true), 16);    // ceil(15.625)
  EXPECT_EQ(expert_capacity(m, 2, true), 1);       // ceil(0.3125)
  m.num_experts = 10;
  m.capacity_factor = 1.1;
  EXPECT_EQ(expert_capacity(m, 100, true), 11);    // 1.1 * 100 / 10 is 11.000000000000002 in doubles
  m.expert_capacity = 7;
  EXPECT_EQ(expert_capacity(m, 100, true), 7);
  EXPECT_EQ(expert_capacity(m, 100, false), 7);
}

TEST(Config, SparseLayerRule) {
  // step 2: blocks 1, 3, 5 ...; step 1: every block; step 0: none (HF SwitchTransformers).
  std::vector<bool> step2, step1, step0, step3;
  for (int i = 0; i < 6; ++i) {
    step2.push_back(is_sparse_layer(2, i));
    step1.push_back(is_sparse_layer(1, i));
    step0.push_back(is_sparse_layer(0, i));
    step3.push_back(is_sparse_layer(3, i));
  }
  EXPECT_EQ(step2, (std::vector<bool>{false, true, false, true, false, true}));
  EXPECT_EQ(step1, (std::vector<bool>(6, true)));
  EXPECT_EQ(step0, (std::vector<bool>(6, false)));
  EXPECT_EQ(step3, (std::vector<bool>{false, true, false, false, true, false}));
}

// ---- the shipped config files -------------------------------------------------------------

std::vector<std::string> config_files() {
  std::vector<std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(kConfigDir)) {
    if (entry.path().extension() == ".yaml") files.push_back(entry.path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

TEST(Config, EveryConfigFileParsesAndRoundTrips) {
  std::vector<std::string> files = config_files();
  for (const char* name : {"tiny", "bench-small", "switch-base-8", "switch-base-128", "switch-large-128",
                           "t5-base"}) {
    EXPECT_NE(std::find(files.begin(), files.end(), kConfigDir + "/" + name + ".yaml"), files.end())
        << "configs/" << name << ".yaml is missing";
  }
  for (const auto& path : files) {
    SCOPED_TRACE(path);
    RunConfig c;
    ASSERT_NO_THROW(c = load_config(path, {}));
    EXPECT_EQ(c.source_path, path);
    RunConfig again = parse_config(to_yaml(c), path, {});
    EXPECT_EQ(again, c);
  }
}

TEST(Config, TinyConfig) {
  RunConfig c = load_config(kConfigDir + "/tiny-synthetic.yaml", {});
  EXPECT_EQ(c.model.vocab_size, 128);
  EXPECT_EQ(c.model.d_model, 64);
  EXPECT_EQ(c.model.num_heads * c.model.d_kv, 64);
  EXPECT_EQ(c.model.num_layers, 2);
  EXPECT_EQ(c.model.num_decoder_layers, 2);
  EXPECT_EQ(c.model.num_experts, 4);
  EXPECT_FALSE(is_sparse_layer(c.model.encoder_sparse_step, 0));
  EXPECT_TRUE(is_sparse_layer(c.model.encoder_sparse_step, 1));
  EXPECT_TRUE(is_sparse_layer(c.model.decoder_sparse_step, 1));
  EXPECT_EQ(c.data.task, "reverse");
  EXPECT_EQ(c.data.inputs_length, 12);
  EXPECT_EQ(c.train.batch_size, 16);
  EXPECT_EQ(c.train.backend, "cpu");
}

TEST(Config, PaperScaleConfigs) {
  RunConfig base8 = load_config(kConfigDir + "/switch-base-8.yaml", {});
  EXPECT_EQ(base8.model.d_model, 768);
  EXPECT_EQ(base8.model.d_ff, 3072);
  EXPECT_EQ(base8.model.num_experts, 8);
  EXPECT_EQ(base8.train.batch_size, 256);
  EXPECT_EQ(base8.train.warmup_steps, 10000);
  EXPECT_DOUBLE_EQ(base8.model.capacity_factor, 1.25);
  // T5X's recipe: C4 shards, Adafactor with the parameter scale under lr = 1/sqrt(step).
  EXPECT_EQ(base8.data.source, "shards");
  EXPECT_EQ(base8.data.train_glob, "data/c4/train/*.shard");
  EXPECT_EQ(base8.data.val_glob, "data/c4/validation/*.shard");
  EXPECT_TRUE(base8.train.adafactor_scale_parameter);
  EXPECT_EQ(base8.train.schedule, "rsqrt");

  RunConfig base128 = load_config(kConfigDir + "/switch-base-128.yaml", {});
  EXPECT_EQ(base128.model.num_experts, 128);
  RunConfig expect128 = base8;
  expect128.model.num_experts = 128;
  expect128.source_path = base128.source_path;
  EXPECT_EQ(base128, expect128);  // the two differ only in the number of experts

  RunConfig large = load_config(kConfigDir + "/switch-large-128.yaml", {});
  EXPECT_EQ(large.model.d_model, 1024);
  EXPECT_EQ(large.model.num_layers, 24);
  EXPECT_EQ(large.model.num_heads, 16);

  RunConfig t5 = load_config(kConfigDir + "/t5-base.yaml", {});
  EXPECT_EQ(t5.model.encoder_sparse_step, 0);
  EXPECT_EQ(t5.model.decoder_sparse_step, 0);
  EXPECT_EQ(t5.model.d_ff, 3072);
  EXPECT_EQ(t5.data.source, "shards");
  EXPECT_TRUE(t5.train.adafactor_scale_parameter);
  EXPECT_TRUE(large.train.adafactor_scale_parameter);
  EXPECT_EQ(large.data.source, "shards");
  for (int i = 0; i < t5.model.num_layers; ++i) EXPECT_FALSE(is_sparse_layer(t5.model.encoder_sparse_step, i));
}

// ---- to_yaml ------------------------------------------------------------------------------

TEST(Config, ToYamlWritesEveryKeyAndRoundTripsOddValues) {
  RunConfig c = parse_config(
      "model: {layer_norm_epsilon: 1.0e-30, init_scale: 0.30000000000000004, dropout_rate: 0.1}\n",
      "odd.yaml",
      {"log.run_dir=\"quote \\\" back\\\\slash \\t tab\"", "train.seed=18446744073709551615",
       "checkpoint.dir=123", "train.steps=9007199254740993", "model.tie_word_embeddings=false"});
  EXPECT_EQ(c.log.run_dir, "quote \" back\\slash \t tab");
  EXPECT_EQ(c.checkpoint.dir, "123");
  std::string text = to_yaml(c);
  for (const char* key : {"vocab_size:", "expert_dropout:", "synthetic_vocab:", "adafactor_epsilon1:",
                          "backend:", "expert:", "keep:", "run_dir:"}) {
    EXPECT_NE(text.find(key), std::string::npos) << key << " missing from\n" << text;
  }
  EXPECT_NE(text.find("  dir: \"123\"\n"), std::string::npos) << text;  // a string stays a string
  EXPECT_NE(text.find("  layer_norm_epsilon: 1.0e-30\n"), std::string::npos) << text;
  EXPECT_NE(text.find("  learning_rate: 0.01\n"), std::string::npos) << text;
  EXPECT_NE(text.find("  capacity_factor: 1.0\n"), std::string::npos) << text;
  RunConfig again = parse_config(text, "odd.yaml", {});
  EXPECT_EQ(again, c) << text;
  EXPECT_EQ(to_yaml(again), text);
}

TEST(Config, ToYamlResolvesNumDecoderLayers) {
  RunConfig c;  // num_decoder_layers = -1: "same as num_layers"
  c.model.num_layers = 5;
  RunConfig again = parse_config(to_yaml(c), "", {});
  EXPECT_EQ(again.model.num_decoder_layers, 5);
}

// ---- overrides ----------------------------------------------------------------------------

TEST(Config, OverridesReplaceAndAddKeys) {
  RunConfig c = parse_config("model:\n  d_model: 64\n", "x.yaml",
                             {"model.d_model=128", "train.optimizer=adamw", "model.feed_forward_proj=gated-gelu",
                              "data.task=copy", "train.learning_rate=3e-4", "train.batch_size=32",
                              "train.grad_accum_steps=4", "log.level=debug", "model.d_model=256"});
  EXPECT_EQ(c.model.d_model, 256);  // the later --set wins
  EXPECT_EQ(c.train.optimizer, "adamw");
  EXPECT_EQ(c.model.feed_forward_proj, "gated-gelu");
  EXPECT_EQ(c.data.task, "copy");
  EXPECT_DOUBLE_EQ(c.train.learning_rate, 3e-4);
  EXPECT_EQ(c.train.batch_size, 32);
  EXPECT_EQ(c.train.grad_accum_steps, 4);
  EXPECT_EQ(c.log.level, "debug");
}

TEST(Config, OverrideRepairsABadFileValue) {
  RunConfig c = parse_config("model:\n  d_model: abc\n", "x.yaml", {"model.d_model=8"});
  EXPECT_EQ(c.model.d_model, 8);
}

TEST(Config, LoadConfigAppliesOverrides) {
  RunConfig c = load_config(kConfigDir + "/tiny-synthetic.yaml", {"train.steps=3", "parallel.data=2"});
  EXPECT_EQ(c.train.steps, 3);
  EXPECT_EQ(c.parallel.data, 2);
  EXPECT_EQ(c.model.d_model, 64);
}

// ---- bad input: one line, where, key, value, what is allowed -------------------------------

TEST(ConfigErrors, NotAnInteger) {
  EXPECT_TRUE(has_parts(error_of("# c\nmodel:\n  vocab_size: 100\n  d_model: abc\n"),
                        {"x.yaml:4: ", "model.d_model: got \"abc\", expected an integer >= 1"}));
}

TEST(ConfigErrors, FractionForInteger) {
  EXPECT_TRUE(has_parts(error_of("train:\n  batch_size: 1.5\n"),
                        {"x.yaml:2: ", "train.batch_size: got 1.5, expected an integer >= 1"}));
  EXPECT_TRUE(has_parts(error_of("train:\n  steps: 1e3\n"), {"x.yaml:2: ", "train.steps: got 1e3"}));
}

TEST(ConfigErrors, IntegerBelowMinimum) {
  EXPECT_TRUE(has_parts(error_of("model:\n  d_model: 64\n  num_heads: 0\n"),
                        {"x.yaml:3: ", "model.num_heads: got 0, expected an integer >= 1"}));
  EXPECT_TRUE(has_parts(error_of("data:\n  targets_length: 1\n"),
                        {"x.yaml:2: ", "data.targets_length: got 1, expected an integer >= 2"}));
  EXPECT_TRUE(has_parts(error_of("model:\n  group_size: -4\n"),
                        {"x.yaml:2: ", "model.group_size: got -4, expected an integer >= 0"}));
  EXPECT_TRUE(has_parts(error_of("log:\n  dead_expert_steps: 0\n"),
                        {"x.yaml:2: ", "log.dead_expert_steps: got 0, expected an integer >= 1"}));
}

TEST(ConfigErrors, IntegerOutOfTypeRange) {
  EXPECT_TRUE(has_parts(error_of("model:\n  d_ff: 3000000000\n"),
                        {"x.yaml:2: ", "model.d_ff: got 3000000000, expected an integer in [1, 2147483647]"}));
  EXPECT_TRUE(has_parts(error_of("train:\n  seed: -1\n"),
                        {"x.yaml:2: ", "train.seed: got -1, expected an integer >= 0"}));
}

TEST(ConfigErrors, NotANumber) {
  EXPECT_TRUE(has_parts(error_of("train:\n  learning_rate: fast\n"),
                        {"x.yaml:2: ", "train.learning_rate: got \"fast\", expected a number > 0"}));
  EXPECT_TRUE(has_parts(error_of("train:\n  learning_rate: .inf\n"),
                        {"x.yaml:2: ", "train.learning_rate: got \".inf\", expected a number > 0"}));
}

TEST(ConfigErrors, RateOutOfRange) {
  EXPECT_TRUE(has_parts(error_of("model:\n  dropout_rate: 1.0\n"),
                        {"x.yaml:2: ", "model.dropout_rate: got 1.0, expected a number in [0, 1)"}));
  EXPECT_TRUE(has_parts(error_of("train:\n  adam_beta2: -0.1\n"),
                        {"x.yaml:2: ", "train.adam_beta2: got -0.1, expected a number in [0, 1)"}));
}

TEST(ConfigErrors, CoefficientAndFactorRanges) {
  EXPECT_TRUE(has_parts(error_of("model:\n  router_aux_loss_coef: -0.01\n"),
                        {"x.yaml:2: ", "model.router_aux_loss_coef: got -0.01, expected a number >= 0"}));
  EXPECT_TRUE(has_parts(error_of("model:\n  capacity_factor: 0\n"),
                        {"x.yaml:2: ", "model.capacity_factor: got 0, expected a number > 0"}));
  EXPECT_TRUE(has_parts(error_of("model:\n  layer_norm_epsilon: 0.0\n"),
                        {"x.yaml:2: ", "model.layer_norm_epsilon: got 0.0, expected a number > 0"}));
  // HF writes Adafactor's decay rate as -0.8; ours is the t5x exponent 0.8.
  EXPECT_TRUE(has_parts(error_of("train:\n  adafactor_decay_rate: -0.8\n"),
                        {"x.yaml:2: ", "train.adafactor_decay_rate: got -0.8, expected a number > 0"}));
}

TEST(ConfigErrors, NotABool) {
  EXPECT_TRUE(has_parts(error_of("model:\n  tie_word_embeddings: yes\n"),
                        {"x.yaml:2: ", "model.tie_word_embeddings: got \"yes\", expected true or false"}));
}

TEST(ConfigErrors, EnumValues) {
  EXPECT_TRUE(has_parts(error_of("model:\n  feed_forward_proj: gelu\n"),
                        {"x.yaml:2: ", "model.feed_forward_proj: got \"gelu\", expected one of: relu, gated-gelu"}));
  EXPECT_TRUE(has_parts(error_of("train:\n  schedule: cosin\n"),
                        {"x.yaml:2: ", "train.schedule: got \"cosin\"", "rsqrt, cosine, linear, constant",
                         "did you mean \"cosine\"?"}));
  EXPECT_TRUE(has_parts(error_of("log:\n  level: verbose\n"),
                        {"x.yaml:2: ", "log.level: got \"verbose\", expected one of: trace, debug, info, warn, error"}));
  EXPECT_TRUE(has_parts(error_of("train:\n  backend: gpu\n"),
                        {"x.yaml:2: ", "train.backend: got \"gpu\", expected one of: cpu, reference, cuda"}));
}

TEST(ConfigErrors, NullListAndMapValues) {
  EXPECT_TRUE(has_parts(error_of("model:\n  d_model:\n  d_ff: 8\n"),
                        {"x.yaml:2: ", "model.d_model: got null, expected an integer >= 1"}));
  EXPECT_TRUE(has_parts(error_of("model:\n  d_model: [1, 2]\n"),
                        {"x.yaml:2: ", "model.d_model: got a list, expected an integer >= 1"}));
  EXPECT_TRUE(has_parts(error_of("log:\n  run_dir: {a: 1}\n"),
                        {"x.yaml:2: ", "log.run_dir: got a map, expected a string"}));
}

TEST(ConfigErrors, UnknownKeyWithSuggestion) {
  EXPECT_TRUE(has_parts(error_of("model:\n  vocab_size: 128\n  d_modle: 64\n"),
                        {"x.yaml:3: ", "unknown key \"model.d_modle\"",
                         "(known keys in model: vocab_size, d_model, d_ff,", "did you mean \"model.d_model\"?"}));
  // A key of another section is pointed to there.
  EXPECT_TRUE(has_parts(error_of("model:\n  batch_size: 8\n"),
                        {"x.yaml:2: ", "unknown key \"model.batch_size\"", "did you mean \"train.batch_size\"?"}));
  EXPECT_TRUE(has_parts(error_of("train:\n  every: 8\n"),
                        {"x.yaml:2: ", "did you mean \"checkpoint.every\" or \"log.every\"?"}));
}

TEST(ConfigErrors, UnknownSection) {
  EXPECT_TRUE(has_parts(error_of("# c\nmodle:\n  d_model: 64\n"),
                        {"x.yaml:2: ", "unknown section \"modle\"",
                         "(expected one of: model, data, train, parallel, checkpoint, log)",
                         "did you mean \"model\"?"}));
  EXPECT_TRUE(has_parts(error_of("d_model: 64\n"),
                        {"x.yaml:1: ", "unknown section \"d_model\"", "did you mean \"model.d_model\"?"}));
}

TEST(ConfigErrors, SectionsAndTopLevelMustBeMaps) {
  EXPECT_TRUE(has_parts(error_of("model: 5\n"), {"x.yaml:1: ", "section \"model\" must be a map", "got 5"}));
  EXPECT_TRUE(has_parts(error_of("train:\n  - steps\n"), {"x.yaml:1: ", "section \"train\"", "got a list"}));
  EXPECT_TRUE(has_parts(error_of("- model\n- train\n"),
                        {"x.yaml:1: ", "expected a map of sections (model, data, train, parallel, checkpoint, log)",
                         "got a list"}));
}

TEST(ConfigErrors, DuplicateKeys) {
  EXPECT_TRUE(has_parts(error_of("model:\n  d_model: 64\n  d_ff: 8\n  d_model: 32\n"),
                        {"x.yaml:4: ", "duplicate key \"model.d_model\" (first on line 2)"}));
  EXPECT_TRUE(has_parts(error_of("model: {}\ntrain: {}\nmodel: {}\n"),
                        {"x.yaml:3: ", "duplicate section \"model\" (first on line 1)"}));
}

TEST(ConfigErrors, YamlSyntaxError) {
  EXPECT_TRUE(has_parts(error_of("model:\n  d_model: 64\n  d_ff: [1, 2\n"), {"x.yaml:", "invalid YAML"}));
  std::string message = error_of("model:\n  d_model: 64\n d_ff: 3\n");
  EXPECT_TRUE(has_parts(message, {"x.yaml:3: ", "invalid YAML"}));
}

TEST(ConfigErrors, OneDocumentPerFile) {
  EXPECT_TRUE(has_parts(error_of("model: {}\n---\ntrain: {}\n"), {"x.yaml:3: ", "a second YAML document"}));
}

TEST(ConfigErrors, MissingFile) {
  try {
    load_config(kConfigDir + "/missing.yaml", {});
    FAIL() << "expected UserError";
  } catch (const UserError& e) {
    EXPECT_TRUE(has_parts(e.what(), {"config ", "configs/missing.yaml: cannot open (No such file or directory)"}));
  }
  try {
    load_config(kConfigDir, {});
    FAIL() << "expected UserError";
  } catch (const UserError& e) {
    EXPECT_TRUE(has_parts(e.what(), {"configs: expected a regular file, got a directory"}));
  }
}

// A config is a regular file of at most kMaxConfigBytes: a FIFO or a device is refused without
// being read (it would block or never end), a larger file before it is read.
TEST(ConfigErrors, OnlyARegularFileOfBoundedSize) {
  const auto dir = std::filesystem::temp_directory_path() / "switcht5_config_files";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const auto fifo = dir / "fifo.yaml";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  for (const auto& [path, part] : std::vector<std::pair<std::string, std::string>>{
           {fifo.string(), "config " + fifo.string() + ": expected a regular file, got a FIFO"},
           {"/dev/zero", "config /dev/zero: expected a regular file, got a character device"}}) {
    try {
      load_config(path, {});
      ADD_FAILURE() << "expected UserError for " << path;
    } catch (const UserError& e) {
      EXPECT_TRUE(has_parts(e.what(), {part}));
    }
  }
  // Exactly the limit reads; one byte more is refused.
  std::string text = "model:\n  d_model: 64\n";
  text += std::string(kMaxConfigBytes - text.size() - 1, '#') + "\n";
  ASSERT_EQ(text.size(), kMaxConfigBytes);
  std::ofstream(dir / "limit.yaml", std::ios::binary) << text;
  EXPECT_EQ(load_config((dir / "limit.yaml").string(), {}).model.d_model, 64);
  std::ofstream(dir / "over.yaml", std::ios::binary) << text << "\n";
  try {
    load_config((dir / "over.yaml").string(), {});
    ADD_FAILURE() << "expected UserError";
  } catch (const UserError& e) {
    EXPECT_TRUE(has_parts(e.what(), {"over.yaml: 1048577 bytes, more than the 1048576 bytes a config may have"}));
  }
}

TEST(ConfigErrors, OverrideFormat) {
  EXPECT_TRUE(has_parts(error_of("", {"foo"}), {"--set foo: expected section.key=value"}));
  EXPECT_TRUE(has_parts(error_of("", {"model=3"}), {"--set model=3: expected section.key=value"}));
  EXPECT_TRUE(has_parts(error_of("", {"a.b.c=3"}), {"--set a.b.c=3: expected section.key=value"}));
  EXPECT_TRUE(has_parts(error_of("", {".d_model=3"}), {"--set .d_model=3: expected section.key=value"}));
}

TEST(ConfigErrors, OverrideValueIsValidatedLikeAFileValue) {
  EXPECT_TRUE(has_parts(error_of("", {"model.num_heads=0"}),
                        {"--set model.num_heads=0: model.num_heads: got 0, expected an integer >= 1"}));
  EXPECT_TRUE(has_parts(error_of("", {"model.d_model=abc"}),
                        {"--set model.d_model=abc: model.d_model: got \"abc\", expected an integer >= 1"}));
  EXPECT_TRUE(has_parts(error_of("", {"model.d_model="}),
                        {"--set model.d_model=: model.d_model: got null, expected an integer >= 1"}));
  EXPECT_TRUE(has_parts(error_of("", {"model.d_model=[1"}),
                        {"--set model.d_model=[1: model.d_model: cannot read the value \"[1\" as YAML"}));
}

TEST(ConfigErrors, OverrideOfUnknownKeyOrSection) {
  EXPECT_TRUE(has_parts(error_of("", {"model.d_modle=3"}),
                        {"--set model.d_modle=3: unknown key \"model.d_modle\"", "did you mean \"model.d_model\"?"}));
  EXPECT_TRUE(has_parts(error_of("", {"trian.steps=3"}),
                        {"--set trian.steps=3: unknown section \"trian\"", "did you mean \"train\"?"}));
}

// ---- rules across keys --------------------------------------------------------------------

TEST(ConfigErrors, BatchNotDivisibleByGradAccum) {
  EXPECT_TRUE(has_parts(error_of("train:\n  batch_size: 10\n  grad_accum_steps: 4\n"),
                        {"x.yaml:3: ", "train.grad_accum_steps: got 4, expected a divisor of train.batch_size = 10"}));
  // A cross-key error points at the --set that introduced the conflict.
  EXPECT_TRUE(has_parts(error_of("train:\n  batch_size: 10\n", {"train.grad_accum_steps=3"}),
                        {"--set train.grad_accum_steps=3: ", "train.grad_accum_steps: got 3"}));
}

TEST(ConfigErrors, SparseLayersNeedExperts) {
  EXPECT_TRUE(has_parts(error_of("model:\n  num_experts: 0\n"),
                        {"x.yaml:2: ", "model.num_experts: got 0, expected an integer >= 1",
                         "model.encoder_sparse_step = 2"}));
  // A dense model may have none.
  EXPECT_NO_THROW(parse_config("model: {num_experts: 0, encoder_sparse_step: 0, decoder_sparse_step: 0}",
                               "x.yaml", {}));
}

TEST(ConfigErrors, RelativeAttentionDistance) {
  EXPECT_TRUE(has_parts(error_of("model:\n  relative_attention_num_buckets: 32\n  relative_attention_max_distance: 16\n"),
                        {"x.yaml:3: ", "model.relative_attention_max_distance: got 16, expected an integer > 16",
                         "model.relative_attention_num_buckets / 2 = 32 / 2"}));
  EXPECT_TRUE(has_parts(error_of("model:\n  relative_attention_num_buckets: 2\n"),
                        {"x.yaml:2: ", "model.relative_attention_num_buckets: got 2, expected an integer >= 4"}));
}

TEST(ConfigErrors, GroupSizeMustTileMicrobatch) {
  std::string message = error_of(
      "model:\n  group_size: 100\ndata:\n  inputs_length: 512\n  targets_length: 114\n"
      "train:\n  batch_size: 8\n");
  EXPECT_TRUE(has_parts(message, {"x.yaml:2: ", "model.group_size: got 100", "encoder 8 x 512 = 4096",
                                  "decoder 8 x 114 = 912", "8 / 1 = 8 sequences"}));
  EXPECT_NO_THROW(parse_config("model: {group_size: 304}\ntrain: {batch_size: 8}\ndata: {inputs_length: 38, targets_length: 38}",
                               "x.yaml", {}));
}

TEST(ConfigErrors, DataSourceMustBeSynthetic) {
  EXPECT_TRUE(has_parts(error_of("data:\n  source: c4\n"),
                        {"x.yaml:2: ", "data.source: got \"c4\"", "shards", "synthetic"}));
  EXPECT_TRUE(has_parts(error_of("data:\n  source: shards\n"),
                        {"x.yaml:2: ", "data.train_glob", "switcht5-data tokenize"}));
  EXPECT_TRUE(has_parts(error_of("data:\n  source: shards\n  train_glob: a/*.shard\ntrain:\n  eval_every: 5\n"),
                        {"x.yaml:5: ", "data.val_glob", "train.eval_every = 5"}));
}

TEST(ConfigErrors, CheckpointKeys) {
  EXPECT_TRUE(has_parts(error_of("checkpoint:\n  every: -1\n"),
                        {"x.yaml:2: ", "checkpoint.every: got -1", "0: only at the end"}));
  EXPECT_TRUE(has_parts(error_of("checkpoint:\n  keep: 0\n"),
                        {"x.yaml:2: ", "checkpoint.keep: got 0, expected an integer >= 1"}));
}

TEST(ConfigErrors, ParallelDegrees) {
  EXPECT_TRUE(has_parts(error_of("parallel:\n  expert: 3\n"),
                        {"x.yaml:2: ", "parallel.expert: got 3, expected a divisor of model.num_experts = 8"}));
  EXPECT_TRUE(has_parts(error_of("parallel:\n  data: 0\n"),
                        {"x.yaml:2: ", "parallel.data: got 0, expected an integer >= 1"}));
  EXPECT_TRUE(has_parts(error_of("train:\n  batch_size: 8\nparallel:\n  data: 3\n"),
                        {"x.yaml:4: ", "parallel.data: got 3, expected a divisor of the microbatch",
                         "8 / 1 = 8 sequences"}));
  EXPECT_TRUE(has_parts(error_of("parallel:\n  model: 5\n"),
                        {"x.yaml:2: ", "parallel.model: got 5, expected a divisor of model.num_heads = 12"}));
  EXPECT_TRUE(has_parts(
      error_of("model: {num_experts: 0, encoder_sparse_step: 0, decoder_sparse_step: 0}\nparallel:\n  expert: 2\n"),
      {"x.yaml:3: ", "parallel.expert: got 2, expected 1"}));
}

// parallel.data_plane: one of mpi, nccl; nccl only over CUDA memory (where the build has NCCL
// is make_data_plane's check: test_nccl_data_plane.cpp).
TEST(ConfigErrors, DataPlane) {
  EXPECT_EQ(parse_config("train: {backend: cuda}\nparallel: {data_plane: nccl}\n", "x.yaml", {})
                .parallel.data_plane,
            "nccl");
  EXPECT_TRUE(has_parts(error_of("parallel:\n  data_plane: gloo\n"),
                        {"x.yaml:2: ", "parallel.data_plane: got \"gloo\", expected one of: mpi, nccl"}));
  EXPECT_TRUE(has_parts(error_of("train:\n  backend: cpu\nparallel:\n  data_plane: nccl\n"),
                        {"x.yaml:4: ", "parallel.data_plane: got \"nccl\", expected mpi with "
                         "train.backend = cpu", "set train.backend: cuda"}));
  EXPECT_TRUE(has_parts(error_of("train:\n  backend: cuda\nparallel:\n  data_plane: nccl\n",
                                 {"train.backend=reference"}),
                        {"--set train.backend=reference: ", "parallel.data_plane: got \"nccl\""}));
}

// The collective deadline (comm/watchdog.h): positive seconds, fractions allowed.
TEST(ConfigErrors, ParallelTimeout) {
  EXPECT_DOUBLE_EQ(parse_config("parallel:\n  timeout_s: 2.5\n", "x.yaml", {}).parallel.timeout_s,
                   2.5);
  for (const char* bad : {"0", "-5", "\"ten\"", "1e8"})
    EXPECT_TRUE(has_parts(error_of(fmt::format("parallel:\n  timeout_s: {}\n", bad)),
                          {"x.yaml:2: ", fmt::format("parallel.timeout_s: got {}", bad),
                           "expected a number in (0, 10000000]"}))
        << bad;
}

TEST(ConfigErrors, TokenIds) {
  EXPECT_TRUE(has_parts(error_of("model:\n  vocab_size: 128\n  eos_token_id: 200\n"),
                        {"x.yaml:3: ", "model.eos_token_id: got 200, expected an integer in [0, 127]",
                         "model.vocab_size = 128"}));
  EXPECT_TRUE(has_parts(error_of("model:\n  eos_token_id: 0\n"),
                        {"x.yaml:2: ", "model.eos_token_id: got 0, expected an id other than model.pad_token_id = 0"}));
}

TEST(ConfigErrors, SyntheticVocabAndMinLearningRate) {
  EXPECT_TRUE(has_parts(error_of("model:\n  vocab_size: 128\ndata:\n  synthetic_vocab: 500\n"),
                        {"x.yaml:4: ", "data.synthetic_vocab: got 500", "[3, 128]"}));
  EXPECT_TRUE(has_parts(error_of("train:\n  learning_rate: 0.01\n  min_learning_rate: 0.1\n"),
                        {"x.yaml:3: ", "train.min_learning_rate: got 0.1, expected a number in [0, 0.01]"}));
}

// The README's config reference is the code's: the table between its markers equals
// config_reference_markdown() (regenerate with build/switcht5 config-reference), every key has a
// meaning in config/config_docs.h (the generator refuses one without), and every meaning names a
// key (no line left behind when a key goes).
TEST(ConfigReference, ReadmeMatchesTheCode) {
  std::ifstream f(std::string(SWITCHT5_SOURCE_DIR) + "/README.md");
  ASSERT_TRUE(f.good());
  const std::string readme((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const std::string begin = "<!-- config-reference begin -->\n", end = "<!-- config-reference end -->";
  const size_t b = readme.find(begin), e = readme.find(end);
  ASSERT_NE(b, std::string::npos);
  ASSERT_NE(e, std::string::npos);
  const std::string table = readme.substr(b + begin.size(), e - b - begin.size());
  EXPECT_EQ(table, config_reference_markdown())
      << "README.md's config reference is stale: paste the output of build/switcht5 config-reference";
  const std::string yaml = to_yaml(RunConfig{});
  size_t keys = 0;
  for (size_t at = 0; (at = yaml.find("\n  ", at)) != std::string::npos; ++at) ++keys;
  EXPECT_EQ(std::size(kConfigKeyDocs), keys) << "config_docs.h has a line for a key that is gone";
  for (const ConfigKeyDoc& d : kConfigKeyDocs)
    EXPECT_NE(table.find("| `" + std::string(d.key) + "` |"), std::string::npos) << d.key;
}

}  // namespace
}  // namespace switcht5
