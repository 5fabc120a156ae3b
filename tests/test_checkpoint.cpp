// HDF5 checkpoints on one process: the layout-independent checksum, save -> load -> save
// round trips, bitwise resume (losses and every parameter and optimizer tensor), params-only
// checkpoints, and corrupt or mismatching inputs (each a clear UserError, nothing overwritten,
// and `switcht5 inspect` failing them with the very message a resume gives); non-finite values
// never saved nor loaded; pruning that keeps the newest checkpoint that verifies.
// Multi-process layouts, crashes during a save, a full disk and signals are tested in
// tests/mpi/.
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/checkpoint.h"
#include "checkpoint/h5_file.h"
#include "comm/communicator.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "core/check.h"
#include "test_util.h"
#include "train/trainer.h"

namespace switcht5 {
namespace {

namespace fs = std::filesystem;
const std::string kTiny = std::string(SWITCHT5_SOURCE_DIR) + "/configs/tiny-synthetic.yaml";
const std::string kBin = std::string(SWITCHT5_BINARY_DIR) + "/switcht5";

std::string temp_dir(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("switcht5_ckpt_" + name);
  fs::remove_all(dir);
  return dir.string();
}

RunConfig tiny(std::vector<std::string> sets) {
  // Dropout and jitter on: resume must reproduce the seeded randomness too.
  std::vector<std::string> all = {"log.every=1", "model.dropout_rate=0.1",
                                  "model.expert_dropout=0.2", "model.router_jitter_noise=0.01"};
  all.insert(all.end(), sets.begin(), sets.end());
  return load_config(kTiny, all);
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << bytes;
}

std::vector<float> read_dataset(const std::string& file, const std::string& dataset) {
  auto self = make_self_communicator();
  H5CheckpointReader r(file, *self);
  std::vector<int64_t> shape = r.shape(dataset);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> v(static_cast<size_t>(n));
  r.read({whole_tensor(dataset, shape, v.data())});
  return v;
}

// Every dataset of two checkpoint files is bitwise equal (and they hold the same datasets).
void expect_same_datasets(const std::string& a, const std::string& b) {
  auto self = make_self_communicator();
  std::vector<std::string> da, db;
  {
    H5CheckpointReader ra(a, *self), rb(b, *self);
    da = ra.datasets();
    db = rb.datasets();
  }
  ASSERT_EQ(da, db);
  ASSERT_GT(da.size(), 50u);
  for (const std::string& d : da) {
    const std::vector<float> x = read_dataset(a, d), y = read_dataset(b, d);
    ASSERT_EQ(x.size(), y.size()) << d;
    EXPECT_EQ(std::memcmp(x.data(), y.data(), 4 * x.size()), 0) << d << " differs";
  }
}

std::string user_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("not a UserError: ") + e.what();
  }
  return "no error";
}

ProcessGrid self_grid() { return ProcessGrid::create(make_self_communicator(), 1, 1, 1); }

// A checkpoint's tensors: dataset -> (shape, values).
using Tensors = std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>;

// Checkpoint `from` copied to `to` by the project's own writer, every attribute kept, after
// `edit` changed its tensors: every checksum in `to` is that of what it holds, so that only
// the other checks can catch the edit.
void rewrite_checkpoint(const std::string& from, const std::string& to,
                        const std::function<void(Tensors&)>& edit) {
  auto self = make_self_communicator();
  H5Attributes a;
  Tensors t;
  {
    H5CheckpointReader r(from, *self);
    for (const std::string& name : r.attribute_names()) {
      if (name == "data_loader_states") {
        a.string_lists[name] = r.string_list_attribute(name);
        continue;
      }
      try {
        a.ints[name] = r.int_attribute(name);
      } catch (const UserError&) {
        a.strings[name] = r.string_attribute(name);
      }
    }
    for (const std::string& d : r.datasets()) t[d] = {r.shape(d), read_dataset(from, d)};
  }
  edit(t);
  std::vector<TensorSlot> slots;
  for (auto& [name, tensor] : t) slots.push_back(whole_tensor(name, tensor.first, tensor.second.data()));
  write_h5_checkpoint(to, *self, a, slots);
}

// The "switcht5: error: ..." line of a command's output ("" when there is none).
std::string error_line(const std::string& output) {
  const size_t at = output.rfind("switcht5: error: ");
  return at == std::string::npos ? "" : output.substr(at, output.find('\n', at) - at);
}

// `switcht5 inspect FILE` and `switcht5 train --resume FILE` (into a fresh run directory under
// `dir`) both exit with 2 and the same one-line error, which contains `fragment`: inspect is
// exactly as strict as loading.
void expect_inspect_and_resume_fail(const std::string& file, const std::string& dir,
                                    const std::string& fragment) {
  const testing::CommandResult inspect = testing::run_command(kBin + " inspect " + file);
  const std::string run = dir + "/resume-" + fs::path(file).stem().string();
  fs::remove_all(run);
  const testing::CommandResult resume = testing::run_command(
      kBin + " train --config " + kTiny + " --run-dir " + run + " --set train.steps=3 --resume " +
      file);
  EXPECT_EQ(inspect.code, 2) << inspect.output;
  EXPECT_EQ(resume.code, 2) << resume.output;
  const std::string a = error_line(inspect.output), b = error_line(resume.output);
  EXPECT_NE(a.find(fragment), std::string::npos) << "inspect: " << inspect.output;
  EXPECT_EQ(a, b) << "inspect and --resume give different reasons";
}

TEST(Checksum, SumOverAnyBlocksIsTheWholeTensorsChecksum) {
  const std::vector<int64_t> shape{6, 5, 4};
  std::vector<float> x = testing::random_vector(120, 7);
  const uint64_t whole = block_checksum(whole_tensor("t", shape, x.data()));
  // Blocks along dimension 0 and along dimension 1 (strided in memory order).
  for (int dim : {0, 1}) {
    uint64_t sum = 0;
    const int64_t parts = dim == 0 ? 3 : 5;
    for (int64_t p = 0; p < parts; ++p) {
      TensorSlot s;
      s.path = "t";
      s.full_shape = shape;
      s.start = {0, 0, 0};
      s.count = shape;
      s.start[size_t(dim)] = p * shape[size_t(dim)] / parts;
      s.count[size_t(dim)] = shape[size_t(dim)] / parts;
      std::vector<float> block;
      for (int64_t i = 0; i < s.count[0]; ++i)
        for (int64_t j = 0; j < s.count[1]; ++j)
          for (int64_t k = 0; k < 4; ++k)
            block.push_back(x[size_t(((s.start[0] + i) * 5 + s.start[1] + j) * 4 + k)]);
      s.data = block.data();
      sum += block_checksum(s);
    }
    EXPECT_EQ(sum, whole) << "blocks along dimension " << dim;
  }
  // One flipped bit, or two swapped elements, change it.
  std::vector<float> y = x;
  uint32_t bits;
  std::memcpy(&bits, &y[17], 4);
  bits ^= 1u;
  std::memcpy(&y[17], &bits, 4);
  EXPECT_NE(block_checksum(whole_tensor("t", shape, y.data())), whole);
  y = x;
  std::swap(y[3], y[4]);
  EXPECT_NE(block_checksum(whole_tensor("t", shape, y.data())), whole);
}

TEST(H5File, WritesAndReadsTensorsAndAttributes) {
  const std::string dir = temp_dir("h5file");
  fs::create_directories(dir);
  const std::string path = dir + "/f.h5";
  auto self = make_self_communicator();
  std::vector<float> a = testing::random_vector(12, 1), b = testing::random_vector(5, 2);
  H5Attributes attrs;
  attrs.ints["step"] = 42;
  attrs.strings["config"] = "model:\n  d_model: 8\n";
  attrs.string_lists["states"] = {"x=1", "x=2"};
  write_h5_checkpoint(path, *self, attrs,
                      {whole_tensor("params/a.weight", {3, 4}, a.data()),
                       whole_tensor("optimizer/b", {5}, b.data())});
  H5CheckpointReader r(path, *self);
  EXPECT_EQ(r.int_attribute("step"), 42);
  EXPECT_EQ(r.string_attribute("config"), attrs.strings["config"]);
  EXPECT_EQ(r.string_list_attribute("states"), attrs.string_lists["states"]);
  EXPECT_EQ(r.datasets(), (std::vector<std::string>{"optimizer/b", "params/a.weight"}));
  EXPECT_EQ(r.shape("params/a.weight"), (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(r.dtype("params/a.weight"), "float32");
  std::vector<float> a2(12), b2(5);
  r.read({whole_tensor("params/a.weight", {3, 4}, a2.data()), whole_tensor("optimizer/b", {5}, b2.data())});
  EXPECT_EQ(a2, a);
  EXPECT_EQ(b2, b);
  EXPECT_EQ(r.compute_checksum("params/a.weight"), r.stored_checksum("params/a.weight"));
  // A block of a tensor: rows 1..2.
  std::vector<float> rows(8);
  TensorSlot s = whole_tensor("params/a.weight", {3, 4}, rows.data());
  s.start = {1, 0};
  s.count = {2, 4};
  s.owner = false;  // verified only where every element has an owner: read it whole too
  std::vector<float> all(12);
  r.read({s, whole_tensor("params/a.weight", {3, 4}, all.data())});
  EXPECT_EQ(rows, std::vector<float>(a.begin() + 4, a.end()));

  EXPECT_NE(user_error([&] { r.read({whole_tensor("params/missing", {3}, b2.data())}); })
                .find(path + ": missing dataset \"params/missing\""),
            std::string::npos);
  EXPECT_NE(user_error([&] { r.read({whole_tensor("params/a.weight", {4, 3}, a2.data())}); })
                .find("has shape [3, 4], expected [4, 3]"),
            std::string::npos);
  EXPECT_NE(user_error([&] { (void)r.int_attribute("nope"); }).find("missing attribute \"nope\""),
            std::string::npos);
}

TEST(Checkpoint, SaveLoadSaveGivesIdenticalDatasets) {
  for (const char* opt : {"adafactor", "adamw"}) {
    SCOPED_TRACE(opt);
    const std::string dir = temp_dir(std::string("roundtrip_") + opt);
    const RunConfig cfg = tiny({"train.steps=3", std::string("train.optimizer=") + opt});
    TrainResult r = train(cfg, dir + "/run");
    ASSERT_EQ(r.checkpoints.size(), 1u);
    const std::string first = r.checkpoints[0];
    EXPECT_EQ(fs::path(first).filename(), "ckpt-00000003.h5");
    EXPECT_EQ(read_bytes(dir + "/run/checkpoints/latest"), "ckpt-00000003.h5\n");

    ProcessGrid grid = self_grid();
    Trainer t(cfg, grid);
    TrainingState state = t.checkpoint_state();
    const LoadResult lr = load_checkpoint(state, first, true);
    EXPECT_EQ(lr.step, 3);
    EXPECT_TRUE(lr.training_state);
    t.restore(state);
    EXPECT_EQ(t.optimizer().steps_taken(), 3);
    EXPECT_EQ(t.train_source().state(), "synthetic_batch=3");
    const SaveResult s = save_checkpoint(t.checkpoint_state(3), dir + "/again");
    expect_same_datasets(first, s.path);
    auto self = make_self_communicator();
    H5CheckpointReader a(first, *self), b(s.path, *self);
    for (const char* attr : {"config", "optimizer", "layout"})
      EXPECT_EQ(a.string_attribute(attr), b.string_attribute(attr)) << attr;
    for (const char* attr : {"step", "optimizer_steps", "consecutive_skips", "layout_data"})
      EXPECT_EQ(a.int_attribute(attr), b.int_attribute(attr)) << attr;
    EXPECT_EQ(a.string_list_attribute("data_loader_states"),
              b.string_list_attribute("data_loader_states"));
    EXPECT_EQ(inspect_checkpoint(s.path), 0);
  }
}

TEST(Checkpoint, H5dumpReadsTheFileAsItIs) {
  // hdf5-tools is one of scripts/setup.sh's packages.
  const std::string dir = temp_dir("h5dump");
  TrainResult r = train(tiny({"train.steps=1"}), dir);
  ASSERT_EQ(r.checkpoints.size(), 1u);
  const testing::CommandResult out = testing::run_command(
      "h5dump -a /step -d /params/encoder.final_layer_norm.weight " + r.checkpoints[0]);
  ASSERT_EQ(out.code, 0) << out.output;
  EXPECT_NE(out.output.find("H5T_IEEE_F32LE"), std::string::npos) << out.output;
  EXPECT_NE(out.output.find("SIMPLE { ( 64 ) / ( 64 ) }"), std::string::npos) << out.output;
  EXPECT_NE(out.output.find("(0): 1\n"), std::string::npos) << out.output;  // the step attribute
}

TEST(Checkpoint, ResumeIsBitwiseIdenticalToARunThatNeverStopped) {
  for (const char* opt : {"adafactor", "adamw"}) {
    SCOPED_TRACE(opt);
    const std::string o = std::string("train.optimizer=") + opt;
    const std::string straight = temp_dir(std::string("straight_") + opt);
    const std::string split = temp_dir(std::string("split_") + opt);
    TrainResult full = train(tiny({"train.steps=8", "checkpoint.every=4", o}), straight);
    TrainResult first = train(tiny({"train.steps=4", o}), split);
    TrainOptions resume;
    resume.resume = "auto";
    TrainResult second = train(tiny({"train.steps=8", o}), split, resume);
    EXPECT_EQ(first.last_step, 4);
    EXPECT_EQ(second.start_step, 4);
    ASSERT_EQ(full.logged.size(), 8u);
    ASSERT_EQ(second.logged.size(), 4u);
    for (size_t i = 0; i < 4; ++i) {
      EXPECT_EQ(second.logged[i].step, full.logged[4 + i].step);
      // Bit for bit: the same doubles, not merely close.
      EXPECT_EQ(second.logged[i].loss, full.logged[4 + i].loss) << "step " << second.logged[i].step;
      EXPECT_EQ(second.logged[i].grad_norm, full.logged[4 + i].grad_norm);
    }
    // The step-4 checkpoints of both runs are identical, and so are the final ones: every
    // parameter and every optimizer tensor.
    expect_same_datasets(straight + "/checkpoints/ckpt-00000004.h5", split + "/checkpoints/ckpt-00000004.h5");
    expect_same_datasets(straight + "/checkpoints/ckpt-00000008.h5", split + "/checkpoints/ckpt-00000008.h5");
    // metrics.jsonl was appended to: steps 1..8 once each.
    std::ifstream m(split + "/metrics.jsonl");
    int lines = 0;
    for (std::string l; std::getline(m, l);) ++lines;
    EXPECT_EQ(lines, 8);
  }
}

TEST(Checkpoint, ResumeAutoWithoutCheckpointsStartsFresh) {
  const std::string dir = temp_dir("auto_fresh");
  TrainOptions resume;
  resume.resume = "auto";
  TrainResult r = train(tiny({"train.steps=2"}), dir, resume);
  EXPECT_EQ(r.start_step, 0);
  EXPECT_EQ(r.last_step, 2);
  // A finished run resumed again has nothing left to do and writes nothing new.
  TrainResult again = train(tiny({"train.steps=2"}), dir, resume);
  EXPECT_EQ(again.start_step, 2);
  EXPECT_EQ(again.last_step, 0);
  EXPECT_TRUE(again.checkpoints.empty());
}

TEST(Checkpoint, ResolvesWhatResumeNames) {
  const std::string dir = temp_dir("resolve");
  train(tiny({"train.steps=4", "checkpoint.every=2"}), dir);
  const std::string ck = dir + "/checkpoints";
  EXPECT_EQ(resolve_resume("auto", ck), ck + "/ckpt-00000004.h5");
  EXPECT_EQ(resolve_resume(ck, ""), ck + "/ckpt-00000004.h5");
  EXPECT_EQ(resolve_resume(ck + "/latest", ""), ck + "/ckpt-00000004.h5");
  EXPECT_EQ(resolve_resume(ck + "/ckpt-00000002.h5", ""), ck + "/ckpt-00000002.h5");
  // Without `latest` (a crash before the first pointer was written): the newest complete file;
  // a leftover temporary is never taken.
  fs::remove(ck + "/latest");
  write_bytes(ck + "/ckpt-00000006.h5.tmp", "partial");
  EXPECT_EQ(resolve_resume("auto", ck), ck + "/ckpt-00000004.h5");
  EXPECT_EQ(resolve_resume("auto", dir + "/nothing-here"), "");
  EXPECT_NE(user_error([&] { resolve_resume(dir + "/nope.h5", ""); }).find("no such file or directory"),
            std::string::npos);
  fs::create_directories(dir + "/empty");
  EXPECT_NE(user_error([&] { resolve_resume(dir + "/empty", ""); }).find("holds no checkpoint"),
            std::string::npos);
}

TEST(Checkpoint, KeepsTheNewestCheckpointsOnly) {
  const std::string dir = temp_dir("keep");
  train(tiny({"train.steps=7", "checkpoint.every=2", "checkpoint.keep=2"}), dir);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir + "/checkpoints"))
    names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"ckpt-00000006.h5", "ckpt-00000007.h5", "latest",
                                              "verified"}));
  // Read back once: when the save of step 6 pruned step 2 (no record yet); the save of step 7
  // pruned step 4 while step 6, known to verify, stayed.
  EXPECT_EQ(read_bytes(dir + "/checkpoints/verified"), "ckpt-00000006.h5\n");
}

TEST(Checkpoint, ParamsOnlyCheckpointStartsAFreshOptimizer) {
  // What scripts/import_hf.py writes: parameters, config and step 0, no optimizer state. Here
  // the parameters are the seed's initial ones, so training from it equals a fresh run.
  const std::string dir = temp_dir("params_only");
  fs::create_directories(dir);
  const RunConfig cfg = tiny({"train.steps=3"});
  ProcessGrid grid = self_grid();
  Trainer t(cfg, grid, TrainerUse::kEvaluate);
  std::vector<TensorSlot> slots;
  ParamStore& ps = t.model().params();
  for (const ParamInfo& p : ps.infos())
    slots.push_back(whole_tensor("params/" + p.name, p.shape, ps.values() + p.offset));
  H5Attributes a;
  a.strings["format"] = "switcht5-checkpoint";
  a.ints["format_version"] = 1;
  a.ints["step"] = 0;
  a.strings["config"] = to_yaml(cfg);
  a.strings["optimizer"] = "none";
  auto self = make_self_communicator();
  write_h5_checkpoint(dir + "/imported.h5", *self, a, slots);

  TrainOptions from;
  from.resume = dir + "/imported.h5";
  TrainResult r = train(cfg, dir + "/run", from);
  TrainResult fresh = train(cfg, dir + "/fresh");
  ASSERT_EQ(r.logged.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(r.logged[i].loss, fresh.logged[i].loss);
}

class CorruptCheckpoint : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = temp_dir("corrupt");
    cfg_ = tiny({"train.steps=2"});
    train(cfg_, dir_ + "/run");
    good_ = dir_ + "/run/checkpoints/ckpt-00000002.h5";
    bytes_ = read_bytes(good_);
    ASSERT_GT(bytes_.size(), 100000u);
  }
  // Loading `path` into a trainer for `cfg` must fail with a UserError containing `what`.
  void expect_load_error(const std::string& path, const RunConfig& cfg,
                         const std::vector<std::string>& parts) {
    ProcessGrid grid = self_grid();
    Trainer t(cfg, grid);
    TrainingState state = t.checkpoint_state();
    const std::string e = user_error([&] { load_checkpoint(state, path, true); });
    for (const std::string& p : parts) EXPECT_NE(e.find(p), std::string::npos) << e;
    EXPECT_EQ(e.find('\n'), std::string::npos) << "one line: " << e;
  }
  std::string dir_, good_, bytes_;
  RunConfig cfg_;
};

TEST_F(CorruptCheckpoint, TruncatedFile) {
  const std::string bad = dir_ + "/truncated.h5";
  write_bytes(bad, bytes_.substr(0, bytes_.size() / 2));
  expect_load_error(bad, cfg_, {bad, "not a readable HDF5 checkpoint", "truncated"});
  EXPECT_EQ(inspect_checkpoint(good_), 0);
  expect_inspect_and_resume_fail(bad, dir_, "not a readable HDF5 checkpoint (truncated");
}

TEST_F(CorruptCheckpoint, FlippedBytesFailTheChecksum) {
  // Find the stored bytes of a parameter and flip one bit in the middle of them.
  const std::vector<float> v = read_dataset(good_, "params/encoder.block.0.layer.0.SelfAttention.q.weight");
  const std::string needle(reinterpret_cast<const char*>(v.data()), 64);
  const size_t at = bytes_.find(needle);
  ASSERT_NE(at, std::string::npos);
  std::string flipped = bytes_;
  flipped[at + 33] = char(flipped[at + 33] ^ 0x10);
  const std::string bad = dir_ + "/flipped.h5";
  write_bytes(bad, flipped);
  expect_load_error(bad, cfg_,
                    {bad, "\"params/encoder.block.0.layer.0.SelfAttention.q.weight\"",
                     "fails its checksum", "corrupt"});
  EXPECT_NE(user_error([&] { inspect_checkpoint(bad); }).find("fails its checksum"), std::string::npos);
  expect_inspect_and_resume_fail(
      bad, dir_, "\"params/encoder.block.0.layer.0.SelfAttention.q.weight\" fails its checksum");
}

TEST_F(CorruptCheckpoint, OtherModelDimensions) {
  RunConfig other = load_config(kTiny, {"model.d_model=32"});
  expect_load_error(good_, other,
                    {good_, "model.d_model is 64 in the checkpoint but 32 in the config", kTiny});
  RunConfig untied = load_config(kTiny, {"model.tie_word_embeddings=false"});
  expect_load_error(good_, untied, {"model.tie_word_embeddings is true in the checkpoint but false"});
}

TEST_F(CorruptCheckpoint, OtherOptimizer) {
  RunConfig adamw = load_config(kTiny, {"train.optimizer=adamw"});
  expect_load_error(good_, adamw, {good_, "holds adafactor state", "train.optimizer is adamw"});
}

TEST_F(CorruptCheckpoint, NotACheckpoint) {
  const std::string text = dir_ + "/config.h5";
  write_bytes(text, "model:\n  d_model: 64\n");
  expect_load_error(text, cfg_, {text, "not a readable HDF5 checkpoint"});
  expect_load_error(dir_ + "/absent.h5", cfg_, {dir_ + "/absent.h5", "cannot open the checkpoint"});
  // An HDF5 file that is not ours.
  auto self = make_self_communicator();
  std::vector<float> x(4, 1.0f);
  write_h5_checkpoint(dir_ + "/other.h5", *self, {}, {whole_tensor("x", {4}, x.data())});
  expect_load_error(dir_ + "/other.h5", cfg_, {"not a switcht5 checkpoint"});
}

TEST_F(CorruptCheckpoint, MissingDatasetAndNothingOverwritten) {
  // A checkpoint written without one parameter.
  const std::string bad = dir_ + "/missing.h5";
  {
    auto self = make_self_communicator();
    H5CheckpointReader r(good_, *self);
    H5Attributes a;
    a.strings["format"] = "switcht5-checkpoint";
    a.ints["format_version"] = 1;
    a.ints["step"] = 2;
    a.strings["config"] = r.string_attribute("config");
    a.strings["optimizer"] = "none";
    std::vector<std::vector<float>> data;
    std::vector<TensorSlot> slots;
    for (const std::string& d : r.datasets()) {
      if (d.rfind("params/", 0) != 0 || d == "params/encoder.final_layer_norm.weight") continue;
      data.push_back(read_dataset(good_, d));
      slots.push_back(whole_tensor(d, r.shape(d), data.back().data()));
    }
    write_h5_checkpoint(bad, *self, a, slots);
  }
  expect_load_error(bad, cfg_, {bad, "missing dataset \"params/encoder.final_layer_norm.weight\""});
  expect_inspect_and_resume_fail(bad, dir_, "missing dataset \"params/encoder.final_layer_norm.weight\"");

  // A failed resume leaves the run directory as it was: checkpoints, latest and metrics.
  const std::string run = dir_ + "/run";
  const std::string metrics = read_bytes(run + "/metrics.jsonl");
  const std::string latest = read_bytes(run + "/checkpoints/latest");
  TrainOptions from;
  from.resume = bad;
  const std::string e = user_error([&] { train(tiny({"train.steps=4"}), run, from); });
  EXPECT_NE(e.find("missing dataset"), std::string::npos) << e;
  EXPECT_EQ(read_bytes(good_), bytes_);
  EXPECT_EQ(read_bytes(run + "/metrics.jsonl"), metrics);
  EXPECT_EQ(read_bytes(run + "/checkpoints/latest"), latest);
}

TEST_F(CorruptCheckpoint, WrongShape) {
  // The same 64 values as [8, 8]: the checksum matches what is stored, the shape does not.
  const std::string bad = dir_ + "/wrong-shape.h5";
  rewrite_checkpoint(good_, bad, [](Tensors& t) {
    t.at("params/encoder.final_layer_norm.weight").first = {8, 8};
  });
  const std::string what =
      "dataset \"params/encoder.final_layer_norm.weight\" has shape [8, 8], expected [64]";
  expect_load_error(bad, cfg_, {bad, what});
  expect_inspect_and_resume_fail(bad, dir_, what);
}

TEST_F(CorruptCheckpoint, UnknownDataset) {
  const std::string bad = dir_ + "/extra.h5";
  rewrite_checkpoint(good_, bad, [](Tensors& t) { t["params/extra.weight"] = {{2}, {1.0f, 2.0f}}; });
  expect_load_error(bad, cfg_, {bad, "dataset \"params/extra.weight\" is not a tensor of the model"});
  expect_inspect_and_resume_fail(bad, dir_, "\"params/extra.weight\" is not a tensor of the model");
}

TEST_F(CorruptCheckpoint, NonFiniteValuesAreRefusedByResumeEvalAndInspect) {
  // NaN and Inf written with matching checksums: only the finiteness check can catch them.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::string bad = dir_ + "/nan.h5";
  rewrite_checkpoint(good_, bad, [&](Tensors& t) {
    std::vector<float>& q = t.at("params/encoder.block.0.layer.0.SelfAttention.q.weight").second;
    q[5] = nan;
    q[77] = std::numeric_limits<float>::infinity();
  });
  {
    auto self = make_self_communicator();
    H5CheckpointReader r(bad, *self);
    const std::string d = "params/encoder.block.0.layer.0.SelfAttention.q.weight";
    EXPECT_EQ(r.scan_dataset(d).checksum, r.stored_checksum(d));
    EXPECT_EQ(r.scan_dataset(d).nonfinite, 2);
  }
  const std::string what =
      "dataset \"params/encoder.block.0.layer.0.SelfAttention.q.weight\" holds 2 non-finite values";
  expect_load_error(bad, cfg_, {bad, what});
  expect_inspect_and_resume_fail(bad, dir_, what);
  const testing::CommandResult eval = testing::run_command(kBin + " eval --checkpoint " + bad);
  EXPECT_EQ(eval.code, 2) << eval.output;
  EXPECT_NE(error_line(eval.output).find(what), std::string::npos) << eval.output;

  // Optimizer state too (resume reads it; evaluation does not).
  const std::string bad_state = dir_ + "/nan-state.h5";
  rewrite_checkpoint(good_, bad_state, [&](Tensors& t) {
    t.at("optimizer/shared.weight.exp_avg_sq_row").second[3] = nan;
  });
  expect_inspect_and_resume_fail(
      bad_state, dir_, "dataset \"optimizer/shared.weight.exp_avg_sq_row\" holds 1 non-finite values");
  EXPECT_EQ(testing::run_command(kBin + " eval --checkpoint " + bad_state).code, 0);
}

TEST(Checkpoint, RefusesToSaveNonFiniteValuesAndKeepsThePreviousCheckpoint) {
  const std::string dir = temp_dir("nonfinite_save");
  const RunConfig cfg = tiny({"train.steps=2"});
  train(cfg, dir);
  const std::string ck = dir + "/checkpoints";
  const std::string before = read_bytes(ck + "/ckpt-00000002.h5"), latest = read_bytes(ck + "/latest");
  ProcessGrid grid = self_grid();
  Trainer t(cfg, grid);
  TrainingState state = t.checkpoint_state();
  load_checkpoint(state, ck + "/ckpt-00000002.h5", true);
  t.restore(state);
  // The CPU backend's memory is the host's: poison values in place.
  ParamStore& ps = t.model().params();
  const ParamInfo* q = nullptr;
  for (const ParamInfo& p : ps.infos())
    if (p.name == "encoder.block.0.layer.0.SelfAttention.q.weight") q = &p;
  ASSERT_NE(q, nullptr);
  float* values = ps.values() + q->offset;
  for (int i : {1, 2, 3}) values[i] = std::numeric_limits<float>::quiet_NaN();
  std::string e = user_error([&] { save_checkpoint(t.checkpoint_state(3), ck); });
  EXPECT_NE(e.find("refusing to save checkpoint step 3: parameter "
                   "encoder.block.0.layer.0.SelfAttention.q.weight holds 3 non-finite values"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find("the previous checkpoint " + ck + "/ckpt-00000002.h5 is kept"), std::string::npos) << e;
  values[1] = values[2] = values[3] = 0.0f;
  // Optimizer state.
  std::vector<Optimizer::StateTensor> st = t.optimizer().state();
  ASSERT_FALSE(st.empty());
  st.back().data[0] = std::numeric_limits<float>::infinity();
  e = user_error([&] { save_checkpoint(t.checkpoint_state(3), ck); });
  EXPECT_NE(e.find("optimizer state " + st.back().name + " holds 1 non-finite values"), std::string::npos) << e;
  // Nothing written, nothing lost.
  std::vector<std::string> names;
  for (const auto& f : fs::directory_iterator(ck)) names.push_back(f.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"ckpt-00000002.h5", "latest"}));
  EXPECT_EQ(read_bytes(ck + "/ckpt-00000002.h5"), before);
  EXPECT_EQ(read_bytes(ck + "/latest"), latest);
}

TEST(Checkpoint, ADivergedRunExitsWithoutSavingAndKeepsItsCheckpoints) {
  // train.learning_rate 1e308 overflows the weights at step 3: the save of step 4 is refused.
  const std::string run = temp_dir("diverged");
  const std::string base = kBin + " train --config " + kTiny + " --run-dir " + run +
                           " --set log.every=1 --set checkpoint.every=2";
  ASSERT_EQ(testing::run_command(base + " --set train.steps=2").code, 0);
  const std::string ck = run + "/checkpoints";
  const std::string before = read_bytes(ck + "/ckpt-00000002.h5"), latest = read_bytes(ck + "/latest");
  const testing::CommandResult r = testing::run_command(
      base + " --set train.steps=6 --set train.learning_rate=1e308 --resume auto");
  EXPECT_EQ(r.code, 2) << r.output;
  const std::string e = error_line(r.output);
  EXPECT_NE(e.find("refusing to save checkpoint step 4: parameter "), std::string::npos) << r.output;
  EXPECT_NE(e.find("the previous checkpoint " + ck + "/ckpt-00000002.h5 is kept"), std::string::npos) << e;
  EXPECT_FALSE(fs::exists(ck + "/ckpt-00000004.h5"));
  EXPECT_FALSE(fs::exists(ck + "/ckpt-00000004.h5.tmp"));
  EXPECT_EQ(read_bytes(ck + "/ckpt-00000002.h5"), before);
  EXPECT_EQ(read_bytes(ck + "/latest"), latest);
}

TEST(Checkpoint, PruningKeepsTheNewestCheckpointThatVerifies) {
  // keep = 1, and the checkpoint of step 4 is damaged on disk right after it is written: pruning
  // reads it back, finds it bad, and keeps step 2, the newest that verifies, recording it.
  const std::string run = temp_dir("prune_verified");
  const std::string base = kBin + " train --config " + kTiny + " --run-dir " + run +
                           " --set checkpoint.every=2 --set checkpoint.keep=1";
  const testing::CommandResult r =
      testing::run_command("SWITCHT5_CRASH_IN_SAVE=damaged:4 " + base + " --set train.steps=4");
  ASSERT_EQ(r.code, 0) << r.output;
  const std::string ck = run + "/checkpoints";
  EXPECT_TRUE(fs::exists(ck + "/ckpt-00000004.h5"));
  ASSERT_TRUE(fs::exists(ck + "/ckpt-00000002.h5")) << "pruning removed the only good checkpoint";
  EXPECT_EQ(read_bytes(ck + "/verified"), "ckpt-00000002.h5\n");
  EXPECT_EQ(inspect_checkpoint(ck + "/ckpt-00000002.h5"), 0);
  EXPECT_NE(user_error([&] { inspect_checkpoint(ck + "/ckpt-00000004.h5"); }), "no error");
  // Once a newer checkpoint verifies, the old one goes: keep = 1 again.
  ASSERT_EQ(testing::run_command(base + " --set train.steps=6 --resume " + ck + "/ckpt-00000002.h5").code, 0);
  std::vector<std::string> names;
  for (const auto& f : fs::directory_iterator(ck)) names.push_back(f.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"ckpt-00000006.h5", "latest", "verified"}));
  EXPECT_EQ(read_bytes(ck + "/verified"), "ckpt-00000006.h5\n");
}

}  // namespace
}  // namespace switcht5
