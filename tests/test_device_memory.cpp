// Backend memory the host cannot read (what CUDA device memory will be), modelled by
// GuardedBackend (tests/guarded_backend.h): its pointers crash the process when the host
// dereferences them. Training, statistics, logging, evaluation and checkpoints must reach
// backend memory only through copy_to_host / copy_to_device; these tests run them on the
// guarded backend and check they give bitwise what the plain cpu backend gives (the same ops
// run underneath). Checkpoint staging is also checked piece by piece with tiny PieceLimits.
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/checkpoint.h"
#include "checkpoint/h5_file.h"
#include "comm/communicator.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "core/check.h"
#include "guarded_backend.h"
#include "test_util.h"
#include "train/trainer.h"

namespace switcht5 {
namespace {

namespace fs = std::filesystem;
using testing::GuardedBackend;
using testing::guarded_backend_factory;

const std::string kTiny = std::string(SWITCHT5_SOURCE_DIR) + "/configs/tiny-synthetic.yaml";

std::string temp_dir(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("switcht5_device_" + name);
  fs::remove_all(dir);
  return dir.string();
}

// The datasets of a checkpoint file, read whole into host memory.
std::vector<std::pair<std::string, std::vector<float>>> read_all(const std::string& file) {
  auto self = make_self_communicator();
  H5CheckpointReader r(file, *self);
  std::vector<std::pair<std::string, std::vector<float>>> out;
  for (const std::string& d : r.datasets()) {
    const std::vector<int64_t> shape = r.shape(d);
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    std::vector<float> v(static_cast<size_t>(n));
    r.read({whole_tensor(d, shape, v.data())});
    EXPECT_EQ(r.stored_checksum(d), r.compute_checksum(d)) << file << ": " << d;
    out.emplace_back(d, std::move(v));
  }
  return out;
}

void expect_same_datasets(const std::string& a, const std::string& b) {
  const auto da = read_all(a), db = read_all(b);
  ASSERT_EQ(da.size(), db.size());
  ASSERT_GT(da.size(), 50u);
  for (size_t i = 0; i < da.size(); ++i) {
    ASSERT_EQ(da[i].first, db[i].first);
    ASSERT_EQ(da[i].second.size(), db[i].second.size()) << da[i].first;
    EXPECT_EQ(std::memcmp(da[i].second.data(), db[i].second.data(), 4 * da[i].second.size()), 0)
        << da[i].first << " differs";
  }
}

TEST(GuardedBackend, HostReadsOfItsMemoryCrash) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  GuardedBackend be(make_backend("cpu"));
  EXPECT_FALSE(be.host_accessible());
  const std::vector<float> x = testing::random_vector(100, 3);
  DeviceArray<float> d = testing::upload(be, x);
  // Through the backend: fine, and bitwise the cpu backend's results.
  EXPECT_EQ(testing::download(be, d.data(), 100), x);
  auto cpu = make_backend("cpu");
  DeviceArray<float> c = testing::upload(*cpu, x);
  EXPECT_EQ(be.sum_squares(d.data() + 10, 50), cpu->sum_squares(c.data() + 10, 50));
  // Directly: the process dies, as a host read of device memory would.
  EXPECT_DEATH(
      {
        volatile float v = d.data()[7];
        (void)v;
      },
      "");
  EXPECT_DEATH(std::memset(d.data(), 0, 4), "");
  // A host buffer handed to an op as device memory is refused.
  std::vector<float> h(10, 1.0f);
  EXPECT_THROW(be.sum(h.data(), 10), Error);
  EXPECT_THROW(be.copy_to_host(d.data(), d.data(), 4), Error);
}

// Tensors in guarded memory, written and read through the staging buffer in pieces smaller
// than a row (so blocks are cut along inner dimensions too), give the file that host memory
// with the default limits gives: the same bytes and the same checksums.
TEST(GuardedBackend, CheckpointStagingInPiecesMatchesHostMemory) {
  const std::string dir = temp_dir("staging");
  fs::create_directories(dir);
  auto self = make_self_communicator();
  GuardedBackend be(make_backend("cpu"));
  const std::vector<std::vector<int64_t>> shapes = {{3, 5, 7}, {11}, {4, 6}, {2, 1, 9}};
  std::vector<std::vector<float>> host;
  std::vector<DeviceArray<float>> device;
  std::vector<TensorSlot> host_slots, device_slots;
  for (size_t i = 0; i < shapes.size(); ++i) {
    int64_t n = 1;
    for (int64_t x : shapes[i]) n *= x;
    host.push_back(testing::random_vector(n, 10 + i));
    device.push_back(testing::upload(be, host.back()));
    const std::string name = "t/" + std::to_string(i);
    host_slots.push_back(whole_tensor(name, shapes[i], host.back().data()));
    device_slots.push_back(whole_tensor(name, shapes[i], device.back().data()));
    device_slots.back().backend = &be;
  }
  // A block of rows 1..2 of the first tensor, owned by nobody (read only).
  for (const PieceLimits& limits : {PieceLimits{.host_bytes = 8, .staging_bytes = 12},
                                    PieceLimits{.host_bytes = 40, .staging_bytes = 40},
                                    PieceLimits{}}) {
    SCOPED_TRACE(limits.staging_bytes);
    write_h5_checkpoint(dir + "/host.h5", *self, {}, host_slots);
    write_h5_checkpoint(dir + "/device.h5", *self, {}, device_slots, {}, limits);
    const auto a = read_all(dir + "/host.h5"), b = read_all(dir + "/device.h5");
    ASSERT_EQ(a.size(), shapes.size());
    ASSERT_EQ(b.size(), shapes.size());
    H5CheckpointReader ra(dir + "/host.h5", *self), rb(dir + "/device.h5", *self);
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_EQ(a[i].second, b[i].second) << a[i].first;
      EXPECT_EQ(ra.stored_checksum(a[i].first), rb.stored_checksum(b[i].first)) << a[i].first;
    }
    // Read back into fresh guarded memory through the staging buffer.
    std::vector<DeviceArray<float>> back;
    std::vector<TensorSlot> read_slots = device_slots;
    for (size_t i = 0; i < shapes.size(); ++i) {
      back.emplace_back(be, int64_t(host[i].size()));
      read_slots[i].data = back.back().data();
    }
    DeviceArray<float> rows(be, 2 * 5 * 7);
    TensorSlot block = read_slots[0];
    block.start = {1, 0, 0};
    block.count = {2, 5, 7};
    block.data = rows.data();
    block.owner = false;
    read_slots.push_back(block);
    rb.read(read_slots, limits);
    for (size_t i = 0; i < shapes.size(); ++i)
      EXPECT_EQ(testing::download(be, back[i].data(), back[i].size()), host[i]) << i;
    EXPECT_EQ(testing::download(be, rows.data(), rows.size()),
              std::vector<float>(host[0].begin() + 35, host[0].begin() + 105));
  }
}

RunConfig tiny(std::vector<std::string> sets) {
  // Dropout, expert dropout and router jitter on: the seeded randomness runs on the device too.
  std::vector<std::string> all = {"log.every=1", "train.eval_every=2", "model.dropout_rate=0.1",
                                  "model.expert_dropout=0.2", "model.router_jitter_noise=0.01"};
  all.insert(all.end(), sets.begin(), sets.end());
  return load_config(kTiny, all);
}

void expect_same_steps(const std::vector<StepMetrics>& a, const std::vector<StepMetrics>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    SCOPED_TRACE(a[i].step);
    EXPECT_EQ(a[i].step, b[i].step);
    EXPECT_EQ(a[i].loss, b[i].loss);
    EXPECT_EQ(a[i].grad_norm, b[i].grad_norm);
    EXPECT_EQ(a[i].aux_loss, b[i].aux_loss);
    EXPECT_EQ(a[i].z_loss, b[i].z_loss);
    EXPECT_EQ(a[i].dropped_fraction, b[i].dropped_fraction);
    ASSERT_EQ(a[i].has_val, b[i].has_val);
    if (a[i].has_val) {
      EXPECT_EQ(a[i].val_loss, b[i].val_loss);
    }
    ASSERT_EQ(a[i].routing.size(), b[i].routing.size());
    for (size_t l = 0; l < a[i].routing.size(); ++l)
      EXPECT_EQ(a[i].routing[l].expert_fraction, b[i].routing[l].expert_fraction);
  }
}

// Train 4 steps, save, resume to 6 and evaluate, all on guarded memory, for both optimizers
// and (bf16 activations and compute copies in device memory) train.precision: bf16;
// everything equals the same run on the cpu backend bit for bit, checkpoints included.
TEST(GuardedBackend, TrainSaveResumeEvaluateEqualsCpu) {
  struct Case {
    const char* optimizer;
    const char* precision;
  };
  for (const Case c : {Case{"adafactor", "fp32"}, Case{"adamw", "fp32"},
                       Case{"adafactor", "bf16"}}) {
    const std::string name = std::string(c.optimizer) + "_" + c.precision;
    SCOPED_TRACE(name);
    const std::string o = std::string("train.optimizer=") + c.optimizer;
    const std::string p = std::string("train.precision=") + c.precision;
    TrainOptions guarded;
    guarded.make_backend_named = guarded_backend_factory();
    const std::string gdir = temp_dir("guarded_" + name);
    const std::string cdir = temp_dir("cpu_" + name);
    const TrainResult g1 = train(tiny({"train.steps=4", o, p}), gdir, guarded);
    const TrainResult c1 = train(tiny({"train.steps=4", o, p}), cdir);
    ASSERT_EQ(g1.logged.size(), 4u);
    expect_same_steps(g1.logged, c1.logged);
    EXPECT_TRUE(g1.logged[1].has_val);
    expect_same_datasets(gdir + "/checkpoints/ckpt-00000004.h5",
                         cdir + "/checkpoints/ckpt-00000004.h5");

    guarded.resume = "auto";
    TrainOptions plain;
    plain.resume = "auto";
    const TrainResult g2 = train(tiny({"train.steps=6", o, p}), gdir, guarded);
    const TrainResult c2 = train(tiny({"train.steps=6", o, p}), cdir, plain);
    EXPECT_EQ(g2.start_step, 4);
    ASSERT_EQ(g2.logged.size(), 2u);
    expect_same_steps(g2.logged, c2.logged);
    expect_same_datasets(gdir + "/checkpoints/ckpt-00000006.h5",
                         cdir + "/checkpoints/ckpt-00000006.h5");

    // Evaluation of the saved checkpoint (what `switcht5 eval` runs), parameters only.
    const RunConfig cfg = tiny({"train.steps=6", o, p});
    ProcessGrid grid = ProcessGrid::create(make_self_communicator(), 1, 1, 1);
    Trainer ge(cfg, grid, TrainerUse::kEvaluate, guarded_backend_factory());
    Trainer ce(cfg, grid, TrainerUse::kEvaluate);
    EXPECT_EQ(ge.backend().name(), "guarded(cpu)");
    TrainingState gs = ge.checkpoint_state(), cs = ce.checkpoint_state();
    load_checkpoint(gs, gdir + "/checkpoints/ckpt-00000006.h5", false);
    load_checkpoint(cs, cdir + "/checkpoints/ckpt-00000006.h5", false);
    const double gv = ge.evaluate(), cv = ce.evaluate();
    EXPECT_EQ(gv, cv);
    EXPECT_EQ(gv, g2.logged.back().val_loss);
  }
}


// train.cuda_graphs on the guarded backend, whose recording has CUDA graph semantics (ops stored
// with their by-value arguments, replayed in order; host calls refused while recording). Every
// step after the first replays one recording, with dropout, expert dropout and jitter on, two
// micro-batches and a target-token count (the CE scale) that changes from step to step: the
// run equals the eager one bit for bit, checkpoints and the resumed run included. A step value
// baked into the recording (a host-derived seed or scale) would make these differ.
TEST(GuardedBackend, RecordedStepsEqualEagerSteps) {
  for (const char* precision : {"fp32", "bf16"}) {
    SCOPED_TRACE(precision);
    const std::string p = std::string("train.precision=") + precision;
    const std::vector<std::string> sets = {"train.steps=5", "train.grad_accum_steps=2", p};
    TrainOptions guarded;
    guarded.make_backend_named = guarded_backend_factory();
    const std::string rdir = temp_dir(std::string("recorded_") + precision);
    const std::string edir = temp_dir(std::string("eager_") + precision);
    std::vector<std::string> recorded_sets = sets;
    recorded_sets.push_back("train.cuda_graphs=true");
    const TrainResult r = train(tiny(recorded_sets), rdir, guarded);
    const TrainResult e = train(tiny(sets), edir, guarded);
    ASSERT_EQ(r.logged.size(), 5u);
    expect_same_steps(r.logged, e.logged);
    // The losses do change from step to step (the test is not comparing constants).
    EXPECT_NE(r.logged[3].loss, r.logged[4].loss);
    expect_same_datasets(rdir + "/checkpoints/ckpt-00000005.h5",
                         edir + "/checkpoints/ckpt-00000005.h5");
    // Resumed from the checkpoint with graphs on: records again after one eager step.
    guarded.resume = "auto";
    recorded_sets[0] = "train.steps=7";
    std::vector<std::string> eager_sets = sets;
    eager_sets[0] = "train.steps=7";
    const TrainResult r2 = train(tiny(recorded_sets), rdir, guarded);
    const TrainResult e2 = train(tiny(eager_sets), edir, guarded);
    EXPECT_EQ(r2.start_step, 5);
    expect_same_steps(r2.logged, e2.logged);
  }
}

// The trainer replays from the second step on, and the recording is one step's work.
TEST(GuardedBackend, TrainerReplaysAfterOneEagerStep) {
  RunConfig cfg = tiny({"train.cuda_graphs=true", "train.grad_accum_steps=2"});
  ProcessGrid grid = ProcessGrid::create(make_self_communicator(), 1, 1, 1);
  Trainer t(cfg, grid, TrainerUse::kTrain, guarded_backend_factory());
  auto& be = dynamic_cast<GuardedBackend&>(t.backend());
  t.train_step(1);
  EXPECT_FALSE(t.step_recorded());
  EXPECT_EQ(be.replays(), 0);
  t.train_step(2);
  t.train_step(3);
  EXPECT_TRUE(t.step_recorded());
  EXPECT_EQ(t.replayed_steps(), 2);
  EXPECT_EQ(be.replays(), 2);
  EXPECT_GT(be.recorded_ops(), 100u);
}

// The harness catches what the trainer must avoid: a dropout keyed by a plain seed replays the
// recorded mask, one keyed by the step counter in backend memory draws the current step's.
TEST(GuardedBackend, ReplayReadsStepValuesFromBackendMemory) {
  GuardedBackend be(make_backend("cpu"));
  const int64_t n = 64;
  DeviceArray<float> x(be, n), baked(be, n), keyed(be, n);
  DeviceArray<uint64_t> step(be, 1);
  const std::vector<float> ones(n, 1.0f);
  be.copy_to_device(x.data(), ones.data(), sizeof(float) * n);
  auto set_step = [&](uint64_t s) { be.copy_to_device(step.data(), &s, sizeof s); };
  auto host = [&](const DeviceArray<float>& a) {
    std::vector<float> h(size_t(a.size()));
    be.copy_to_host(h.data(), a.data(), a.bytes());
    return h;
  };
  set_step(1);
  be.begin_recording();
  be.dropout(baked.data(), x.data(), n, 0.5f, derive_seed(7, 1));  // host-derived: baked in
  be.dropout(keyed.data(), x.data(), n, 0.5f, RandomKey(7, step.data()));
  EXPECT_THROW(be.sum(x.data(), n), Error);
  EXPECT_THROW(be.copy_to_device(step.data(), &n, sizeof n), Error);
  be.end_recording();
  set_step(2);
  be.replay();
  DeviceArray<float> expect(be, n);
  be.dropout(expect.data(), x.data(), n, 0.5f, derive_seed(7, 2));
  EXPECT_EQ(host(keyed), host(expect));  // the step-2 mask
  EXPECT_NE(host(baked), host(expect));  // still the step-1 mask
  EXPECT_THROW(make_backend("cpu")->begin_recording(), Error);
}

}  // namespace
}  // namespace switcht5
