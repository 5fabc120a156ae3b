// The one-process communicator and ProcessGrid on one process (no MPI): collectives are copies,
// the grid is 1 x 1 x 1, and bad degrees are UserErrors naming the numbers.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/process_grid.h"
#include "core/check.h"

namespace switcht5 {
namespace {

TEST(SelfCommunicator, CollectivesAreCopies) {
  auto c = make_self_communicator();
  EXPECT_EQ(c->rank(), 0);
  EXPECT_EQ(c->size(), 1);
  std::vector<float> x = {1.5f, -2.0f, 3.0f}, out(3, 0.0f);
  c->all_reduce_sum(x.data(), 3);
  EXPECT_EQ(x, (std::vector<float>{1.5f, -2.0f, 3.0f}));
  std::vector<int64_t> i = {5, -7};
  c->all_reduce_sum(i.data(), 2);
  c->all_reduce_max(i.data(), 2);
  EXPECT_EQ(i, (std::vector<int64_t>{5, -7}));
  c->reduce_scatter_sum(out.data(), x.data(), 3);
  EXPECT_EQ(out, x);
  std::fill(out.begin(), out.end(), 0.0f);
  c->all_gather(out.data(), x.data(), 3);
  EXPECT_EQ(out, x);
  std::fill(out.begin(), out.end(), 0.0f);
  c->all_to_all(out.data(), x.data(), 3);
  EXPECT_EQ(out, x);
  std::string s = "config";
  c->broadcast(s, 0);
  c->broadcast(x.data(), 3, 0);
  EXPECT_EQ(s, "config");
  EXPECT_THROW(c->broadcast(s, 1), Error);
  c->barrier();
  auto sub = c->split(3, 0);
  EXPECT_EQ(sub->size(), 1);
}

TEST(SelfCommunicator, GridIsOneByOneByOne) {
  ProcessGrid g = ProcessGrid::create(make_self_communicator(), 1, 1, 1);
  EXPECT_TRUE(g.is_root());
  EXPECT_EQ(g.data_group->size(), 1);
  EXPECT_EQ(g.model_group->size(), 1);
  EXPECT_EQ(g.expert_group->size(), 1);
  EXPECT_EQ(g.expert_replica_group->size(), 1);
  EXPECT_EQ(g.local_rank, 0);
  EXPECT_EQ(g.local_size, 1);
  EXPECT_EQ(g.describe(),
            "world 1 = data 1 x model 1, expert 1; this rank: data 0, model 0, expert 0");
}

TEST(SelfCommunicator, GridErrorsNameTheNumbers) {
  try {
    ProcessGrid::create(make_self_communicator(), 2, 2, 1);
    FAIL() << "no error";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find(
                  "parallel.data x parallel.model = 2 x 2 = 4, but mpirun started 1 process "),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(ProcessGrid::create(make_self_communicator(), 1, 1, 2), UserError);
  EXPECT_THROW(ProcessGrid::create(make_self_communicator(), 1, 0, 1), UserError);
}

}  // namespace
}  // namespace switcht5
