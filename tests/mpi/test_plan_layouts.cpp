// `switcht5 plan` sizes rank 0 of a layout (train/memory_plan.h) with size-only stand-ins for
// its communicators; here rank 0 of a real layout, on the counting GuardedBackend, holds exactly
// the bytes the plan counted, after construction and after a training step (expert, model and
// data parallelism, ZeRO-1, fp32 and bf16).
#include <map>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "../guarded_backend.h"
#include "comm/communicator.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "mpi_test_env.h"
#include "train/comm_plan.h"
#include "train/memory_plan.h"
#include "train/trainer.h"

namespace switcht5 {
namespace {

struct Layout {
  const char* name;
  int data, expert, model;
  bool zero1;
  const char* precision;
};

class PlanLayouts : public ::testing::TestWithParam<Layout> {};

TEST_P(PlanLayouts, RankZeroAllocatesWhatThePlanCounts) {
  const Layout l = GetParam();
  Communicator& world = testing::test_world();
  const int n = l.data * l.model;
  if (world.size() % n != 0) GTEST_SKIP() << "needs a multiple of " << n << " ranks";
  const RunConfig cfg = load_config(
      std::string(SWITCHT5_SOURCE_DIR) + "/configs/tiny-synthetic.yaml",
      {"train.batch_size=8", "model.router_jitter_noise=0.01", "model.encoder_sparse_step=1",
       "train.eval_every=0", "parallel.data=" + std::to_string(l.data),
       "parallel.expert=" + std::to_string(l.expert), "parallel.model=" + std::to_string(l.model),
       std::string("parallel.zero1=") + (l.zero1 ? "true" : "false"),
       std::string("train.precision=") + l.precision});
  const MemoryPlan plan = plan_memory(cfg);
  EXPECT_EQ(plan.other, 0);
  ProcessGrid grid = ProcessGrid::create(world.split(world.rank() / n, world.rank()), l.data,
                                         l.model, l.expert);
  Trainer trainer(cfg, grid, TrainerUse::kTrain, testing::guarded_backend_factory());
  auto& be = dynamic_cast<testing::GuardedBackend&>(trainer.backend());
  const int64_t built = int64_t(be.requested_bytes());
  EXPECT_FALSE(trainer.train_step(1).skipped);
  if (grid.world_rank == 0) {
    EXPECT_EQ(built, plan.counted) << "after construction";
    EXPECT_EQ(int64_t(be.peak_requested_bytes()), plan.counted) << "after a step";
  }
}

// What every rank's data planes move in a training step (DataPlane::traffic) is what
// `switcht5 plan` predicts (train/comm_plan.h), collective by collective and group by group:
// calls and payload floats, exactly. Two micro-batches, Switch layers in both stacks.
TEST_P(PlanLayouts, EveryRankMovesWhatThePlanPredicts) {
  const Layout l = GetParam();
  Communicator& world = testing::test_world();
  const int n = l.data * l.model;
  if (world.size() % n != 0) GTEST_SKIP() << "needs a multiple of " << n << " ranks";
  const RunConfig cfg = load_config(
      std::string(SWITCHT5_SOURCE_DIR) + "/configs/tiny-synthetic.yaml",
      {"train.batch_size=8", "train.grad_accum_steps=2", "model.encoder_sparse_step=1",
       "train.eval_every=0", "parallel.bucket_mb=0.01", "parallel.data=" + std::to_string(l.data),
       "parallel.expert=" + std::to_string(l.expert), "parallel.model=" + std::to_string(l.model),
       std::string("parallel.zero1=") + (l.zero1 ? "true" : "false"),
       std::string("train.precision=") + l.precision});
  ProcessGrid grid = ProcessGrid::create(world.split(world.rank() / n, world.rank()), l.data,
                                         l.model, l.expert);
  const CommPlan plan = plan_communication(cfg, {}, grid.data_rank);
  Trainer trainer(cfg, grid);
  trainer.train_step(1);
  std::map<std::string, PlaneTraffic> before;
  const std::vector<std::string> groups = {"data", "expert_replica", "expert", "model"};
  for (const std::string& g : groups) before[g] = trainer.traffic(g);
  EXPECT_FALSE(trainer.train_step(2).skipped);
  int64_t moved = 0;
  for (const std::string& g : groups) {
    const PlaneTraffic after = trainer.traffic(g);
    for (int c = 0; c < kCollectiveKinds; ++c) {
      const Collective k = Collective(c);
      SCOPED_TRACE(g + " " + collective_name(k) + " on world rank " +
                   std::to_string(grid.world_rank));
      EXPECT_EQ(after.calls[c] - before[g].calls[c], plan.calls(g, k));
      EXPECT_EQ(after.floats[c] - before[g].floats[c], plan.floats(g, k));
      moved += after.floats[c] - before[g].floats[c];
    }
  }
  EXPECT_GT(moved, 0);  // every layout here communicates
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, PlanLayouts,
    ::testing::Values(Layout{"D2", 2, 1, 1, false, "fp32"},
                      Layout{"D2_E2", 2, 2, 1, false, "fp32"},
                      Layout{"D2_E2_zero1_bf16", 2, 2, 1, true, "bf16"},
                      Layout{"M2_bf16", 1, 1, 2, false, "bf16"},
                      Layout{"D4_E2_zero1", 4, 2, 1, true, "fp32"},
                      Layout{"D2_E2_M2_zero1", 2, 2, 2, true, "bf16"}),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace switcht5
