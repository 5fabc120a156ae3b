// The gradient reducer under mpirun (train/gradient_reducer.h), on layouts D2, D2xE2, D2xM2 and
// D4xE2 (each on every sub-world that fits):
//   - bucketed reduction is bitwise the unbucketed all-reduce (the old path: one all-reduce of
//     the dense region over the data group, one of the experts over their replicas), for bucket
//     sizes down to one float, and ZeRO-1's reduce-scatter gives the same bits in each shard;
//   - training with several bucket sizes gives bitwise the same losses, norms and parameters;
//   - ZeRO-1 (reduce-scatter + all-gather, sharded optimizer state) trains like the same layout
//     without it, to 1e-6, over 12 steps with clipping, for Adafactor and AdamW;
//   - on the guarded backend (memory the host cannot read: the data plane stages through the
//     host) training is bitwise the cpu backend's, model communication included.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../guarded_backend.h"
#include "backend/backend.h"
#include "comm/data_plane.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "core/rng.h"
#include "model/model.h"
#include "model/params.h"
#include "mpi_test_env.h"
#include "train/gradient_reducer.h"
#include "train/synthetic_data.h"
#include "train/trainer.h"

namespace switcht5 {
namespace {

using testing::test_world;

struct Layout {
  const char* name;
  int data, expert, model;
};
const Layout kLayouts[] = {
    {"D2", 2, 1, 1}, {"D2xE2", 2, 2, 1}, {"D2xM2", 2, 1, 2}, {"D4xE2", 4, 2, 1}};

// The grid of `l` on this rank's sub-world of data x model consecutive ranks, or null when the
// world does not divide into them (every rank decides alike).
std::unique_ptr<ProcessGrid> grid_for(const Layout& l) {
  Communicator& world = test_world();
  const int n = l.data * l.model;
  if (world.size() % n != 0) return nullptr;
  return std::make_unique<ProcessGrid>(ProcessGrid::create(
      world.split(world.rank() / n, world.rank()), l.data, l.model, l.expert));
}

RunConfig tiny_config(const Layout& l, std::vector<std::string> sets = {}) {
  sets.insert(sets.end(), {"train.batch_size=8", "model.dropout_rate=0", "model.expert_dropout=0",
                           "model.router_jitter_noise=0.01", "train.eval_every=0"});
  sets.push_back("parallel.data=" + std::to_string(l.data));
  sets.push_back("parallel.expert=" + std::to_string(l.expert));
  sets.push_back("parallel.model=" + std::to_string(l.model));
  return load_config(std::string(SWITCHT5_SOURCE_DIR) + "/configs/tiny-synthetic.yaml", sets);
}

::testing::AssertionResult same_bits(const std::vector<float>& got, const std::vector<float>& want,
                                     int64_t begin = 0, int64_t end = -1) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  if (end < 0) end = int64_t(got.size());
  for (int64_t i = begin; i < end; ++i)
    if (std::bit_cast<uint32_t>(got[size_t(i)]) != std::bit_cast<uint32_t>(want[size_t(i)]))
      return ::testing::AssertionFailure() << "element " << i << ": " << got[size_t(i)] << " vs "
                                           << want[size_t(i)] << " (rank " << test_world().rank()
                                           << ")";
  return ::testing::AssertionSuccess();
}

// Random gradients on a small model's parameters, reduced by the reducer with several bucket
// sizes and compared with whole-region all-reduces of the same values.
TEST(GradientReducer, BucketedEqualsUnbucketedBitwise) {
  for (const Layout& l : kLayouts) {
    std::unique_ptr<ProcessGrid> grid = grid_for(l);
    if (!grid) continue;
    // A narrow model, so that one-float buckets stay quick.
    RunConfig cfg = tiny_config(l, {"model.d_model=8", "model.d_ff=16", "model.d_kv=4",
                                    "model.num_heads=2", "model.vocab_size=24"});
    auto be = make_backend("cpu");
    ParamStore ps;
    register_model_params(ps, cfg.model,
                          Sharding{grid->expert, grid->expert_rank, grid->model, grid->model_rank});
    ps.allocate(*be);
    const int64_t total = ps.total_numel(), dense_end = ps.expert_region_begin();
    std::vector<float> mine(static_cast<size_t>(total));
    CounterRng rng(100 + uint64_t(grid->world_rank));
    for (float& g : mine) g = float(rng.next_double() - 0.5);
    // The old path, on the control plane over host memory.
    std::vector<float> want = mine;
    grid->data_group->all_reduce_sum(want.data(), dense_end);
    grid->expert_replica_group->all_reduce_sum(want.data() + dense_end, total - dense_end);

    auto data = make_data_plane(*grid->data_group, *be);
    auto replica = make_data_plane(*grid->expert_replica_group, *be);
    for (int64_t bucket : {int64_t{1}, int64_t{7}, int64_t{100}, int64_t{4096}, int64_t{1} << 40}) {
      for (bool zero1 : {false, true}) {
        be->copy_to_device(ps.grads(), mine.data(), sizeof(float) * mine.size());
        GradientReducer reducer(*be, ps, *data, *replica, bucket, zero1);
        reducer.begin_step();
        reducer.finish();
        std::vector<float> got(mine.size());
        be->copy_to_host(got.data(), ps.grads(), sizeof(float) * got.size());
        const std::string what = std::string(l.name) + " bucket " + std::to_string(bucket) +
                                 (zero1 ? " zero1" : "");
        if (!zero1) {
          EXPECT_TRUE(same_bits(got, want)) << what;
          continue;
        }
        // ZeRO-1: this rank's shard summed, the rest of the dense region its own input.
        const int64_t lo = reducer.shard_begin(), hi = reducer.shard_end();
        EXPECT_TRUE(same_bits(got, want, lo, hi)) << what << " own shard";
        EXPECT_TRUE(same_bits(got, mine, 0, lo)) << what << " before the shard";
        EXPECT_TRUE(same_bits(got, mine, hi, dense_end)) << what << " after the shard";
        EXPECT_TRUE(same_bits(got, want, dense_end, total)) << what << " experts";
      }
    }
  }
}

struct Trained {
  std::vector<double> losses, grad_norms;
  std::vector<float> params;  // this rank's ParamStore::values()
  int64_t dense_state = 0;    // floats of optimizer state of dense parameters on this rank
};

Trained train_steps(const RunConfig& cfg, ProcessGrid& grid,
                    const BackendFactory& backend = make_backend) {
  Trainer trainer(cfg, grid, TrainerUse::kTrain, backend);
  Trained r;
  for (int64_t s = 1; s <= cfg.train.steps; ++s) {
    const StepMetrics m = trainer.train_step(s);
    r.losses.push_back(m.loss);
    r.grad_norms.push_back(m.grad_norm);
  }
  ParamStore& ps = trainer.model().params();
  r.params.resize(static_cast<size_t>(ps.total_numel()));
  trainer.backend().copy_to_host(r.params.data(), ps.values(), sizeof(float) * r.params.size());
  for (const Optimizer::StateTensor& t : trainer.optimizer().state()) {
    if (!t.data || ps.infos()[size_t(t.param)].offset >= ps.expert_region_begin()) continue;
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    r.dense_state += n;
  }
  return r;
}

// The model reports gradients as its backward pass finishes them, so the reducer launches the
// buckets during backward: progressively (some launched while later reports are still to
// come) and all of them by the end of the pass, leaving nothing to finish(); the result is
// bitwise the reduction of the same gradients launched all at once after backward.
struct LaunchRecorder : GradientReadyListener {
  GradientReducer* reducer = nullptr;
  std::vector<size_t> launched_after_report;
  void on_gradients_ready(int64_t begin, int64_t end) override {
    reducer->on_gradients_ready(begin, end);
    launched_after_report.push_back(reducer->launched());
  }
};

TEST(GradientReducer, BucketsLaunchDuringBackward) {
  for (const Layout& l : kLayouts) {
    std::unique_ptr<ProcessGrid> grid = grid_for(l);
    if (!grid) continue;
    RunConfig cfg = tiny_config(l);
    auto be = make_backend("cpu");
    ModelParallelism mp{grid->expert_group.get(), grid->model_group.get(),
                        Sharding{grid->expert, grid->expert_rank, grid->model, grid->model_rank}};
    SwitchT5Model model(*be, cfg.model, ModelShape{4, cfg.data.inputs_length,
                                                   cfg.data.targets_length}, mp);
    ParamStore& ps = model.params();
    ps.initialize(*be, 3);
    auto data = make_data_plane(*grid->data_group, *be);
    auto replica = make_data_plane(*grid->expert_replica_group, *be);
    Batch batch;
    SyntheticTask(cfg.data, cfg.model, 5)
        .fill(batch, SyntheticTask::Stream::kTrain, 4 * int64_t(grid->data_rank), 4);
    LossWeights w;
    w.ce_scale = 1e-2;
    auto grads_after = [&](bool report) {
      GradientReducer reducer(*be, ps, *data, *replica, /*bucket_floats=*/4096, false);
      ps.zero_grads(*be);
      model.forward(batch, true, 9, 4 * uint64_t(grid->data_rank));
      reducer.begin_step();
      LaunchRecorder recorder;
      recorder.reducer = &reducer;
      model.backward(w, report ? &recorder : nullptr);
      if (report) {
        const size_t n = reducer.buckets().size();
        EXPECT_GT(n, 2u) << l.name;
        EXPECT_EQ(reducer.launched(), n) << l.name << ": not every bucket launched in backward";
        const auto& after = recorder.launched_after_report;
        EXPECT_TRUE(std::any_of(after.begin(), after.end() - 1,
                                [&](size_t k) { return k > 0 && k < n; }))
            << l.name << ": no bucket launched before the last report";
      }
      reducer.finish();
      std::vector<float> g(size_t(ps.total_numel()));
      be->copy_to_host(g.data(), ps.grads(), sizeof(float) * g.size());
      return g;
    };
    const std::vector<float> at_end = grads_after(false), during = grads_after(true);
    EXPECT_TRUE(same_bits(during, at_end)) << l.name;
  }
}

// Bucket sizes never change a bit of training: 0.0001 MiB is 26 floats, about 10000 buckets.
TEST(GradientReducer, TrainingIsBitwiseTheSameForEveryBucketSize) {
  for (const Layout& l : kLayouts) {
    std::unique_ptr<ProcessGrid> grid = grid_for(l);
    if (!grid) continue;
    const Trained whole =
        train_steps(tiny_config(l, {"train.steps=3", "parallel.bucket_mb=1e6"}), *grid);
    for (const char* mb : {"0.0001", "0.001", "0.05"}) {
      for (const char* zero1 : {"false", "true"}) {
        const Trained b = train_steps(
            tiny_config(l, {"train.steps=3", std::string("parallel.bucket_mb=") + mb,
                            std::string("parallel.zero1=") + zero1, "train.max_grad_norm=0"}),
            *grid);
        const std::string what = std::string(l.name) + " bucket_mb " + mb + " zero1 " + zero1;
        EXPECT_EQ(b.losses, whole.losses) << what;
        EXPECT_EQ(b.grad_norms.size(), whole.grad_norms.size()) << what;
        // ZeRO-1 sums the norm's squares per shard first: not bitwise, 1e-12.
        for (size_t s = 0; s < b.grad_norms.size(); ++s)
          EXPECT_NEAR(b.grad_norms[s], whole.grad_norms[s], 1e-12 * whole.grad_norms[s]) << what;
        EXPECT_TRUE(same_bits(b.params, whole.params)) << what;
      }
    }
  }
}

// ZeRO-1 against the same layout without it: 12 steps with clipping on, both optimizers. The
// dense optimizer state is split over the data ranks (its sum is the unsharded state).
TEST(GradientReducer, Zero1TrainsLikeUnshardedWithBothOptimizers) {
  for (const Layout& l : kLayouts) {
    std::unique_ptr<ProcessGrid> grid = grid_for(l);
    if (!grid) continue;
    for (const char* opt : {"adafactor", "adamw"}) {
      auto cfg = [&](const char* zero1) {
        return tiny_config(l, {"train.steps=12", std::string("train.optimizer=") + opt,
                               "train.max_grad_norm=0.5", "parallel.bucket_mb=0.01",
                               std::string("parallel.zero1=") + zero1});
      };
      const Trained plain = train_steps(cfg("false"), *grid);
      const Trained zero1 = train_steps(cfg("true"), *grid);
      const std::string what = std::string(l.name) + " " + opt;
      ASSERT_EQ(zero1.losses.size(), plain.losses.size());
      for (size_t s = 0; s < plain.losses.size(); ++s) {
        EXPECT_NEAR(zero1.losses[s], plain.losses[s], 1e-6 * std::fabs(plain.losses[s]))
            << what << " step " << s + 1;
        EXPECT_NEAR(zero1.grad_norms[s], plain.grad_norms[s], 1e-6 * plain.grad_norms[s])
            << what << " step " << s + 1;
      }
      EXPECT_LT(plain.losses.back(), plain.losses.front() - 0.5) << what << ": it learned";
      double scale = 0, diff = 0;
      for (size_t i = 0; i < plain.params.size(); ++i) {
        scale = std::max(scale, double(std::fabs(plain.params[i])));
        diff = std::max(diff, double(std::fabs(zero1.params[i] - plain.params[i])));
      }
      EXPECT_LE(diff, 1e-6 * scale) << what;
      int64_t state[2] = {zero1.dense_state, 0};
      grid->data_group->all_reduce_sum(state, 1);
      EXPECT_EQ(state[0], plain.dense_state) << what << ": shards add up to the whole state";
      EXPECT_LT(zero1.dense_state, plain.dense_state) << what << ": this rank holds a part";
    }
  }
}

// The guarded backend's memory crashes the process if the host touches it: training there goes
// through the data plane's host staging (gradients, ZeRO-1, expert all-to-all, tensor-parallel
// sums, Adafactor's gather) and gives the cpu backend's bits.
TEST(GradientReducer, GuardedBackendTrainsBitwiseLikeCpu) {
  for (const Layout& l : kLayouts) {
    std::unique_ptr<ProcessGrid> grid = grid_for(l);
    if (!grid) continue;
    for (const char* zero1 : {"false", "true"}) {
      const RunConfig cfg = tiny_config(l, {"train.steps=3", "parallel.bucket_mb=0.05",
                                            std::string("parallel.zero1=") + zero1});
      const Trained cpu = train_steps(cfg, *grid);
      const Trained guarded = train_steps(cfg, *grid, testing::guarded_backend_factory());
      const std::string what = std::string(l.name) + " zero1 " + zero1;
      EXPECT_EQ(guarded.losses, cpu.losses) << what;
      EXPECT_EQ(guarded.grad_norms, cpu.grad_norms) << what;
      EXPECT_TRUE(same_bits(guarded.params, cpu.params)) << what;
    }
  }
}

}  // namespace
}  // namespace switcht5
