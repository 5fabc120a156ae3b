// Every rank of a group issues the same collectives in the same order (the precondition of
// every collective, and what an all-to-all deadlock after hundreds of steps usually breaks):
// the tiny Switch model trains a few steps, evaluates and saves a checkpoint on several
// layouts, and then each group's trace (comm/watchdog.h: a hash of the sequence of
// (collective, element type, count) over the group's control plane and data plane, in program
// order) must agree on every rank of the group. Also: the comparison does tell two sequences
// apart.
//
// Runs under mpirun with 2 and 4 ranks; each layout of n = data x model ranks runs on every
// sub-world of n consecutive ranks that fits. One process has no watchdog and no trace: skipped.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/checkpoint.h"
#include "comm/communicator.h"
#include "comm/process_grid.h"
#include "comm/watchdog.h"
#include "config/config.h"
#include "mpi_test_env.h"
#include "train/trainer.h"

namespace switcht5 {
namespace {

using testing::test_world;

struct Layout {
  int data, model, expert;
  bool zero1;
  int accum;
};

std::string layout_name(const ::testing::TestParamInfo<Layout>& info) {
  const Layout& l = info.param;
  return "data" + std::to_string(l.data) + "_model" + std::to_string(l.model) + "_expert" +
         std::to_string(l.expert) + (l.zero1 ? "_zero1" : "") + "_accum" + std::to_string(l.accum);
}

// Whether every rank of `group` holds a trace of the same length and hash as `t`. Collective.
bool same_on_every_rank(Communicator& group, const CollectiveTrace& t) {
  const uint64_t h = t.hash();
  // max(x) == -max(-x) = min(x) iff every rank has the same x.
  int64_t v[6] = {int64_t(h >> 32), int64_t(h & 0xffffffffu), t.calls()};
  for (int i = 0; i < 3; ++i) v[3 + i] = -v[i];
  group.all_reduce_max(v, 6);
  return v[0] == -v[3] && v[1] == -v[4] && v[2] == -v[5];
}

// Splits test_world() into sub-worlds of n consecutive ranks.
std::unique_ptr<Communicator> sub_world(int n) {
  Communicator& world = test_world();
  return world.split(world.rank() / n, world.rank());
}

// A directory every rank of the job sees, made by rank 0 and removed when it goes.
struct SharedDir {
  std::string path;
  SharedDir() {
    Communicator& world = test_world();
    if (world.rank() == 0) {
      std::string pattern =
          (std::filesystem::temp_directory_path() / "switcht5_collective_order_XXXXXX").string();
      path = mkdtemp(pattern.data()) ? pattern : "";
    }
    world.broadcast(path, 0);
  }
  ~SharedDir() {
    test_world().barrier();
    if (test_world().rank() == 0 && !path.empty()) std::filesystem::remove_all(path);
  }
};

class CollectiveOrder : public ::testing::TestWithParam<Layout> {};

TEST_P(CollectiveOrder, SameOnEveryRankOfEachGroup) {
  const Layout& l = GetParam();
  const int n = l.data * l.model;
  if (test_world().size() % n != 0) GTEST_SKIP() << "needs a multiple of " << n << " ranks";
  SharedDir dir;
  ASSERT_FALSE(dir.path.empty());
  RunConfig cfg = load_config(std::string(SWITCHT5_SOURCE_DIR) + "/configs/tiny-synthetic.yaml",
                              {"train.steps=3", "train.batch_size=8", "train.eval_every=0",
                               "train.eval_batches=1", "model.num_experts=4",
                               "model.encoder_sparse_step=1", "model.decoder_sparse_step=2"});
  cfg.parallel.data = l.data;
  cfg.parallel.model = l.model;
  cfg.parallel.expert = l.expert;
  cfg.parallel.zero1 = l.zero1;
  cfg.train.grad_accum_steps = l.accum;
  ProcessGrid grid = ProcessGrid::create(sub_world(n), l.data, l.model, l.expert);
  ASSERT_NE(grid.watchdog, nullptr);
  {
    Trainer trainer(cfg, grid);
    for (int64_t s = 1; s <= cfg.train.steps; ++s) trainer.train_step(s);
    if (trainer.has_validation()) trainer.evaluate();
    // Each sub-world saves into its own directory.
    save_checkpoint(trainer.checkpoint_state(cfg.train.steps),
                    dir.path + "/" + std::to_string(test_world().rank() / n));
  }
  // A copy: the comparisons below are collectives and would extend the traces.
  const std::map<std::string, CollectiveTrace> traces = grid.watchdog->traces();
  const std::vector<std::pair<std::string, Communicator*>> groups = {
      {"world", grid.world.get()},
      {"data", grid.data_group.get()},
      {"model", grid.model_group.get()},
      {"expert", grid.expert_group.get()},
      {"expert-replica", grid.expert_replica_group.get()}};
  for (const auto& [label, comm] : groups) {
    const auto it = traces.find(label);
    ASSERT_NE(it, traces.end()) << "no trace of the " << label << " group";
    const CollectiveTrace& t = it->second;
    if (comm->size() > 1) {
      EXPECT_GT(t.calls(), 0) << label;
    }
    EXPECT_TRUE(same_on_every_rank(*comm, t))
        << "the " << label << " group's collectives differ between its ranks; this rank "
        << test_world().rank() << " issued " << t.calls() << ", the last: " << t.describe_last();
  }
  // The groups that carry a step's traffic did carry it.
  for (const auto& [label, degree] :
       {std::pair{"data", grid.data}, {"expert", grid.expert}, {"model", grid.model}}) {
    if (degree > 1) {
      EXPECT_GT(traces.at(label).calls(), 3 * cfg.train.steps) << label;
    }
  }
}

const Layout kLayouts[] = {
    {2, 1, 2, false, 1}, {2, 1, 1, true, 2}, {1, 2, 1, false, 1},                    // 2 ranks
    {4, 1, 2, true, 1},  {2, 2, 2, false, 1}, {4, 1, 4, false, 2}, {2, 2, 1, true, 1},  // 4 ranks
};

INSTANTIATE_TEST_SUITE_P(Layouts, CollectiveOrder, ::testing::ValuesIn(kLayouts), layout_name);

// The check is not vacuous: one rank issuing a different collective (the same messages, a max
// where the others sum) makes the traces differ.
TEST(CollectiveOrderCheck, TellsADifferentCollectiveApart) {
  const int n = test_world().size();
  if (n == 1) GTEST_SKIP() << "one process has no watchdog";
  ProcessGrid grid = ProcessGrid::create(sub_world(n), n, 1, 1);
  const CollectiveTrace* t = grid.watchdog->trace("data");
  EXPECT_TRUE(same_on_every_rank(*grid.data_group, *t));
  int64_t x = 1;
  if (grid.data_rank == 0) grid.data_group->all_reduce_max(&x, 1);
  else grid.data_group->all_reduce_sum(&x, 1);
  const CollectiveTrace snapshot = *t;
  EXPECT_FALSE(same_on_every_rank(*grid.data_group, snapshot));
}

}  // namespace
}  // namespace switcht5
