// Communicator and ProcessGrid under mpirun (ctest runs this with 1 rank without mpirun, and with
// 2 and 4 ranks through scripts/mpirun.sh). Expected values are computed from rank numbers, so
// every check is exact; floating-point sums are checked bitwise against the documented order
// ((x_0 + x_1) + x_2) + ... and across ranks.
#include <gtest/gtest.h>

#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "comm/mpi_communicator.h"
#include "comm/process_grid.h"
#include "core/check.h"
#include "core/rng.h"
#include "mpi_test_env.h"

namespace switcht5 {
namespace {

using testing::test_world;

// Counts of differing elements (bitwise for floats) and the first one, for one EXPECT per array.
template <class T>
::testing::AssertionResult same_bits(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  int64_t bad = 0, first = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    bool same;
    if constexpr (std::is_same_v<T, float>)
      same = std::bit_cast<uint32_t>(got[i]) == std::bit_cast<uint32_t>(want[i]);
    else if constexpr (std::is_same_v<T, double>)
      same = std::bit_cast<uint64_t>(got[i]) == std::bit_cast<uint64_t>(want[i]);
    else
      same = got[i] == want[i];
    if (!same && bad++ == 0) first = static_cast<int64_t>(i);
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << got.size() << " elements differ; first at " << first << ": "
         << got[first] << " vs " << want[first] << " (rank " << test_world().rank() << ")";
}

// Every test runs with the default chunk size and with tiny ones that cut each collective into
// many rounds (4 bytes: one float per round of a broadcast, one float per message of an
// all-reduce round of `size` elements; 12 bytes: rounds that do not divide the arrays).
class Collectives : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override {
    mpi_ = dynamic_cast<MpiCommunicator*>(&test_world());
    if (mpi_) mpi_->set_max_chunk_bytes(GetParam());
  }
  void TearDown() override {
    if (mpi_) mpi_->set_max_chunk_bytes(MpiCommunicator::kDefaultMaxChunkBytes);
  }
  Communicator& comm() { return test_world(); }
  int rank() { return comm().rank(); }
  int size() { return comm().size(); }
  MpiCommunicator* mpi_ = nullptr;
};

INSTANTIATE_TEST_SUITE_P(ChunkBytes, Collectives,
                         ::testing::Values(MpiCommunicator::kDefaultMaxChunkBytes, 4096, 12, 4),
                         [](const auto& info) { return "chunk" + std::to_string(info.param); });

// Sizes around the block boundaries: empty, fewer elements than ranks, odd, larger than a chunk.
const std::vector<int64_t> kCounts = {0, 1, 3, 5, 257, 4099};

TEST(Communicator, MpiWorldIsTheWholeJob) {
  Communicator& w = test_world();
  EXPECT_NE(dynamic_cast<MpiCommunicator*>(&w), nullptr)
      << "mpi_world() fell back to a self communicator";
  const char* env_size = std::getenv("OMPI_COMM_WORLD_SIZE");
  if (env_size) {
    EXPECT_EQ(w.size(), std::atoi(env_size));
  }
  std::vector<float> ranks(w.size()), mine = {float(w.rank())};
  w.all_gather(ranks.data(), mine.data(), 1);
  for (int r = 0; r < w.size(); ++r) EXPECT_EQ(ranks[r], float(r));
}

TEST_P(Collectives, AllReduceSumFloatExact) {
  const int p = size();
  for (int64_t n : kCounts) {
    // x_r[i] = (r + 1) * (i % 13 + 1): small integers, so every order of summation is exact.
    std::vector<float> x(n), want(n);
    for (int64_t i = 0; i < n; ++i) {
      x[i] = float((rank() + 1) * (i % 13 + 1));
      want[i] = float((i % 13 + 1) * p * (p + 1) / 2);
    }
    comm().all_reduce_sum(x.data(), n);
    EXPECT_TRUE(same_bits(x, want)) << "n = " << n;
  }
}

TEST_P(Collectives, AllReduceSumDoubleExact) {
  const int p = size();
  for (int64_t n : kCounts) {
    std::vector<double> x(n), want(n);
    for (int64_t i = 0; i < n; ++i) {
      x[i] = 0.5 * (rank() + 1) + 1024.0 * i;
      want[i] = 0.25 * p * (p + 1) + 1024.0 * i * p;
    }
    comm().all_reduce_sum(x.data(), n);
    EXPECT_TRUE(same_bits(x, want)) << "n = " << n;
  }
}

TEST_P(Collectives, AllReduceSumInt64BeyondDoublePrecision) {
  const int p = size();
  for (int64_t n : kCounts) {
    // Values above 2^53 would lose bits through a double.
    std::vector<int64_t> x(n), want(n);
    for (int64_t i = 0; i < n; ++i) {
      x[i] = (int64_t{1} << 55) + int64_t{rank()} * 1000003 + i;
      want[i] = p * (int64_t{1} << 55) + int64_t{p} * (p - 1) / 2 * 1000003 + p * i;
    }
    comm().all_reduce_sum(x.data(), n);
    EXPECT_TRUE(same_bits(x, want)) << "n = " << n;
  }
}

TEST_P(Collectives, AllReduceMaxInt64) {
  const int p = size();
  for (int64_t n : kCounts) {
    // Element i's maximum sits on rank i % p; negative values check that 0 is not an identity.
    std::vector<int64_t> x(n), want(n);
    for (int64_t i = 0; i < n; ++i) {
      x[i] = -(int64_t{1} << 40) - 10 * ((rank() - i % p + p) % p) - i;
      want[i] = -(int64_t{1} << 40) - i;
    }
    comm().all_reduce_max(x.data(), n);
    EXPECT_TRUE(same_bits(x, want)) << "n = " << n;
  }
}

// Random floats of mixed magnitudes, where the summation order changes the rounding: the result
// is bitwise the left fold over ranks in rank order on every rank, whatever the chunking.
TEST_P(Collectives, AllReduceSumRandomFloatsIsBitwiseRankOrder) {
  const int p = size();
  const int64_t n = 10007;
  auto input = [&](int r) {
    CounterRng rng(derive_seed(1234, r));
    std::vector<float> v(n);
    for (int64_t i = 0; i < n; ++i)
      v[i] = float((2.0 * rng.next_double() - 1.0) * std::ldexp(1.0, int(rng.next_below(40)) - 20));
    return v;
  };
  std::vector<float> want = input(0);
  for (int r = 1; r < p; ++r) {
    std::vector<float> v = input(r);
    for (int64_t i = 0; i < n; ++i) want[i] += v[i];
  }
  std::vector<float> x = input(rank());
  comm().all_reduce_sum(x.data(), n);
  EXPECT_TRUE(same_bits(x, want));

  // Every rank holds the same bits: gather all results and compare them with this rank's.
  std::vector<float> all(p * n);
  comm().all_gather(all.data(), x.data(), n);
  for (int r = 0; r < p; ++r)
    EXPECT_TRUE(same_bits(std::vector<float>(all.begin() + r * n, all.begin() + (r + 1) * n), x))
        << "rank " << r << "'s result differs from rank " << rank() << "'s";
}

TEST_P(Collectives, ReduceScatterSum) {
  const int p = size();
  for (int64_t n : kCounts) {
    // Block b of rank r: (r + 1) * (b + 1) * 100 + i % 17, exact in float.
    std::vector<float> in(p * n), out(n, -1.0f), want(n);
    for (int b = 0; b < p; ++b)
      for (int64_t i = 0; i < n; ++i) in[b * n + i] = float((rank() + 1) * (b + 1) * 100 + i % 17);
    for (int64_t i = 0; i < n; ++i)
      want[i] = float((rank() + 1) * 100 * p * (p + 1) / 2 + p * (i % 17));
    comm().reduce_scatter_sum(out.data(), in.data(), n);
    EXPECT_TRUE(same_bits(out, want)) << "n = " << n;
  }
}

TEST_P(Collectives, AllGather) {
  const int p = size();
  for (int64_t n : kCounts) {
    std::vector<float> in(n), out(p * n, -1.0f), want(p * n);
    for (int64_t i = 0; i < n; ++i) in[i] = float(rank() * 100000 + i);
    for (int q = 0; q < p; ++q)
      for (int64_t i = 0; i < n; ++i) want[q * n + i] = float(q * 100000 + i);
    comm().all_gather(out.data(), in.data(), n);
    EXPECT_TRUE(same_bits(out, want)) << "n = " << n;
  }
}

TEST_P(Collectives, AllToAll) {
  const int p = size();
  for (int64_t n : kCounts) {
    // Rank r's block b is tagged (sender r, destination b, index i).
    auto value = [](int sender, int dest, int64_t i) {
      return float(sender * 1000000 + dest * 10000 + i);
    };
    std::vector<float> in(p * n), out(p * n, -1.0f), want(p * n);
    for (int b = 0; b < p; ++b)
      for (int64_t i = 0; i < n; ++i) in[b * n + i] = value(rank(), b, i);
    for (int q = 0; q < p; ++q)
      for (int64_t i = 0; i < n; ++i) want[q * n + i] = value(q, rank(), i);
    comm().all_to_all(out.data(), in.data(), n);
    EXPECT_TRUE(same_bits(out, want)) << "n = " << n;
  }
}

TEST_P(Collectives, BroadcastFloatFromEveryRoot) {
  for (int root = 0; root < size(); ++root) {
    for (int64_t n : kCounts) {
      std::vector<float> x(n), want(n);
      for (int64_t i = 0; i < n; ++i) {
        want[i] = float(root * 7919 + i);
        x[i] = rank() == root ? want[i] : -1.0f;
      }
      comm().broadcast(x.data(), n, root);
      EXPECT_TRUE(same_bits(x, want)) << "root " << root << ", n = " << n;
    }
  }
}

TEST_P(Collectives, BroadcastStringFromEveryRoot) {
  for (int root = 0; root < size(); ++root) {
    for (size_t len : {size_t{0}, size_t{1}, size_t{4097}}) {
      std::string want(len, 'x');
      for (size_t i = 0; i < len; ++i) want[i] = char('a' + (i + root) % 26);
      // Non-roots start with a longer, different string: broadcast must resize, not append.
      std::string s = rank() == root ? want : std::string(len + 100, '?');
      comm().broadcast(s, root);
      EXPECT_EQ(s, want) << "root " << root << ", length " << len;
    }
  }
}

TEST(Communicator, BarrierWaitsForTheSlowestRank) {
  Communicator& w = test_world();
  const auto start = std::chrono::steady_clock::now();
  if (w.rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  w.barrier();
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (w.size() > 1) {
    EXPECT_GE(ms, 250.0) << "rank " << w.rank() << " left the barrier early";
  }
}

// Many collectives of different kinds and sizes back to back: messages of one never match
// receives of another.
TEST(Communicator, InterleavedCollectivesStayMatched) {
  Communicator& w = test_world();
  const int p = w.size();
  for (int it = 0; it < 50; ++it) {
    const int64_t n = 1 + (it * 37) % 101;
    std::vector<float> a(n, float(w.rank() + it));
    w.all_reduce_sum(a.data(), n);
    std::vector<float> g(p * n);
    w.all_gather(g.data(), a.data(), n);
    std::vector<int64_t> m = {int64_t{w.rank()} * it};
    w.all_reduce_max(m.data(), 1);
    std::vector<float> t(p * n);
    w.all_to_all(t.data(), g.data(), n);
    const float want = float(p * it + p * (p - 1) / 2);
    int64_t bad = 0;
    for (float v : a) bad += v != want;
    for (float v : g) bad += v != want;
    for (float v : t) bad += v != want;
    EXPECT_EQ(bad, 0) << "iteration " << it;
    EXPECT_EQ(m[0], int64_t{p - 1} * it);
  }
}

// All-reduce of 1 << (world rank) over a group: the bitmask of exactly its members.
int64_t member_mask(Communicator& group) {
  int64_t bit = int64_t{1} << test_world().rank();
  group.all_reduce_sum(&bit, 1);
  return bit;
}

// The group's members (world ranks) in group rank order, via all_gather.
std::vector<int> members(Communicator& group) {
  std::vector<float> all(group.size()), mine = {float(test_world().rank())};
  group.all_gather(all.data(), mine.data(), 1);
  return std::vector<int>(all.begin(), all.end());
}

void expect_group(Communicator& group, const std::vector<int>& want, const char* what) {
  const int me = test_world().rank();
  EXPECT_EQ(group.size(), int(want.size())) << what;
  int64_t mask = 0;
  int my_index = -1;
  for (size_t i = 0; i < want.size(); ++i) {
    mask |= int64_t{1} << want[i];
    if (want[i] == me) my_index = int(i);
  }
  EXPECT_EQ(group.rank(), my_index) << what;
  EXPECT_EQ(members(group), want) << what << " members (world ranks, by group rank)";
  EXPECT_EQ(member_mask(group), mask) << what << ": all_reduce_sum must sum exactly its members";
}

TEST(Communicator, SplitByParityOrderedByDescendingRank) {
  Communicator& w = test_world();
  auto sub = w.split(w.rank() % 2, -w.rank());
  std::vector<int> want;
  for (int r = w.size() - 1; r >= 0; --r)
    if (r % 2 == w.rank() % 2) want.push_back(r);
  expect_group(*sub, want, "parity group");
  // A split inherits the chunk size, and collectives on the parent still work afterwards.
  if (auto* m = dynamic_cast<MpiCommunicator*>(&w)) {
    EXPECT_EQ(dynamic_cast<MpiCommunicator&>(*sub).max_chunk_bytes(), m->max_chunk_bytes());
  }
  std::vector<int> everyone;
  for (int r = 0; r < w.size(); ++r) everyone.push_back(r);
  expect_group(w, everyone, "world after split");
}

class Grid : public ::testing::TestWithParam<std::tuple<int, int, int>> {};

INSTANTIATE_TEST_SUITE_P(Layouts, Grid,
                         ::testing::Values(std::tuple{1, 1, 1}, std::tuple{2, 1, 1},
                                           std::tuple{2, 1, 2}, std::tuple{4, 1, 1},
                                           std::tuple{4, 1, 2}, std::tuple{4, 1, 4},
                                           std::tuple{2, 2, 1}, std::tuple{2, 2, 2},
                                           std::tuple{1, 2, 1}, std::tuple{1, 4, 1}),
                         [](const auto& info) {
                           return "data" + std::to_string(std::get<0>(info.param)) + "_model" +
                                  std::to_string(std::get<1>(info.param)) + "_expert" +
                                  std::to_string(std::get<2>(info.param));
                         });

TEST_P(Grid, GroupsHoldExactlyTheirMembers) {
  const auto [data, model, expert] = GetParam();
  Communicator& w = test_world();
  if (data * model != w.size()) GTEST_SKIP() << "needs " << data * model << " ranks";
  ProcessGrid g = ProcessGrid::create(w.split(0, w.rank()), data, model, expert);
  const int me = w.rank(), d = me / model, m = me % model, e = d % expert;
  EXPECT_EQ(g.world_rank, me);
  EXPECT_EQ(g.world_size, w.size());
  EXPECT_EQ(g.is_root(), me == 0);
  EXPECT_EQ(g.data_rank, d);
  EXPECT_EQ(g.model_rank, m);
  EXPECT_EQ(g.expert_rank, e);
  EXPECT_EQ(std::tie(g.data, g.model, g.expert), std::tie(data, model, expert));
  // The tests' mpirun starts every rank on this one machine: one node, ranked as the world.
  EXPECT_EQ(g.local_rank, me);
  EXPECT_EQ(g.local_size, w.size());

  std::vector<int> world_members, data_members, model_members, expert_members, replica_members;
  for (int r = 0; r < w.size(); ++r) world_members.push_back(r);
  for (int dd = 0; dd < data; ++dd) data_members.push_back(dd * model + m);
  for (int mm = 0; mm < model; ++mm) model_members.push_back(d * model + mm);
  for (int k = 0; k < expert; ++k)
    expert_members.push_back(((d / expert) * expert + k) * model + m);
  for (int j = 0; j < data / expert; ++j) replica_members.push_back((j * expert + e) * model + m);
  expect_group(*g.world, world_members, "world");
  expect_group(*g.data_group, data_members, "data_group");
  expect_group(*g.model_group, model_members, "model_group");
  expect_group(*g.expert_group, expert_members, "expert_group");
  expect_group(*g.expert_replica_group, replica_members, "expert_replica_group");

  ProcessGrid moved = std::move(g);  // move-only
  EXPECT_EQ(moved.data_group->size(), data);
}

template <class F>
std::string user_error_of(F&& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("not a UserError: ") + e.what();
  }
  return "no error";
}

TEST(ProcessGridErrors, DegreesMustMultiplyToTheWorldSize) {
  Communicator& w = test_world();
  const int p = w.size();
  const std::string msg =
      user_error_of([&] { ProcessGrid::create(w.split(0, w.rank()), p + 1, 1, 1); });
  EXPECT_NE(msg.find(fmt::format(
                "parallel.data x parallel.model = {} x 1 = {}, but mpirun started {} process",
                p + 1, p + 1, p)),
            std::string::npos)
      << msg;
  const std::string msg2 =
      user_error_of([&] { ProcessGrid::create(w.split(0, w.rank()), p, 2, 1); });
  EXPECT_NE(msg2.find(fmt::format("= {} x 2 = {}, but mpirun started {} process", p, 2 * p, p)),
            std::string::npos)
      << msg2;
}

TEST(ProcessGridErrors, ExpertMustDivideData) {
  Communicator& w = test_world();
  const int p = w.size();
  const std::string msg =
      user_error_of([&] { ProcessGrid::create(w.split(0, w.rank()), p, 1, 3); });
  EXPECT_NE(msg.find(fmt::format("parallel.expert = 3 must divide parallel.data = {}", p)),
            std::string::npos)
      << msg;
  const std::string msg2 =
      user_error_of([&] { ProcessGrid::create(w.split(0, w.rank()), p, 1, 0); });
  EXPECT_NE(msg2.find("must be >= 1"), std::string::npos) << msg2;
}

// Counts whose byte sizes exceed INT_MAX with the default chunk size (2 GiB+ per rank, so opt-in:
// SWITCHT5_TEST_BIG_COUNTS=1). The tiny-chunk runs above cover the same code paths cheaply.
TEST(Communicator, BigCountsBeyondIntMaxBytes) {
  if (!std::getenv("SWITCHT5_TEST_BIG_COUNTS"))
    GTEST_SKIP() << "set SWITCHT5_TEST_BIG_COUNTS=1 (needs ~5 GiB per rank)";
  Communicator& w = test_world();
  const int p = w.size();
  const int64_t n = (int64_t{1} << 29) + 3;  // 2 GiB + 12 bytes of floats
  std::vector<float> x(n);
  for (int64_t i = 0; i < n; ++i) x[i] = float(w.rank() + 1 + (i & 1023));
  w.all_reduce_sum(x.data(), n);
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += x[i] != float(p * (p + 1) / 2 + p * (i & 1023));
  EXPECT_EQ(bad, 0);
  for (int64_t i = 0; i < n; ++i) x[i] = w.rank() == p - 1 ? float(i & 4095) : -1.0f;
  w.broadcast(x.data(), n, p - 1);
  bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += x[i] != float(i & 4095);
  EXPECT_EQ(bad, 0);
  std::vector<float>().swap(x);
  // all_to_all whose buffers (size blocks of m floats) exceed INT_MAX bytes: check the last
  // element of every block.
  const int64_t m = (int64_t{1} << 31) / p / 4 + 5;
  std::vector<float> in(p * m), out(p * m, -1.0f);
  for (int b = 0; b < p; ++b) in[b * m + m - 1] = float(w.rank() * 10 + b);
  w.all_to_all(out.data(), in.data(), m);
  for (int q = 0; q < p; ++q) EXPECT_EQ(out[q * m + m - 1], float(q * 10 + w.rank()));
}

}  // namespace
}  // namespace switcht5
