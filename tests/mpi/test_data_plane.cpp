// The data plane's contract (comm/data_plane.h) under mpirun: every collective against a host
// computation of the documented result, bitwise (sums in rank order), on the cpu backend and on
// the guarded backend, whose memory the host cannot read (tests/guarded_backend.h): there the
// plane must stage through host buffers, and any host access to backend memory would crash.
// Each runs with the default chunk size and a tiny one (12 bytes) that cuts every collective
// into many rounds, and with blocks of unequal and zero sizes. Also: the Communicator adapter
// over a plane (make_backend_communicator) that model code uses.
#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "../guarded_backend.h"
#include "backend/backend.h"
#include "comm/data_plane.h"
#include "comm/mpi_communicator.h"
#include "core/rng.h"
#include "mpi_test_env.h"

namespace switcht5 {
namespace {

using testing::GuardedBackend;
using testing::test_world;

::testing::AssertionResult same_bits(const std::vector<float>& got,
                                     const std::vector<float>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  for (size_t i = 0; i < got.size(); ++i)
    if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(want[i]))
      return ::testing::AssertionFailure() << "element " << i << " of " << got.size() << ": "
                                           << got[i] << " vs " << want[i] << " (rank "
                                           << test_world().rank() << ")";
  return ::testing::AssertionSuccess();
}

// Rank r's input: n values of a stream keyed by (seed, r), any rank can recompute it.
std::vector<float> input(int rank, int64_t n, uint64_t seed) {
  CounterRng rng(seed * 1000 + uint64_t(rank));
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = float(rng.next_double() * 2.0 - 1.0);
  return x;
}

// The sum over ranks 0..size-1 of input(r, n, seed), in rank order (the contract).
std::vector<float> rank_order_sum(int size, int64_t n, uint64_t seed) {
  std::vector<float> s = input(0, n, seed);
  for (int r = 1; r < size; ++r) {
    const std::vector<float> x = input(r, n, seed);
    for (int64_t i = 0; i < n; ++i) s[size_t(i)] += x[size_t(i)];
  }
  return s;
}

struct PlaneCase {
  const char* backend;  // "cpu" or "guarded"
  int64_t chunk_bytes;
};

class DataPlaneContract : public ::testing::TestWithParam<PlaneCase> {
 protected:
  void SetUp() override {
    auto cpu = make_backend("cpu");
    be_ = std::string(GetParam().backend) == "guarded"
              ? std::unique_ptr<Backend>(std::make_unique<GuardedBackend>(std::move(cpu)))
              : std::move(cpu);
    group_ = test_world().split(0, test_world().rank());
    if (auto* mpi = dynamic_cast<MpiCommunicator*>(group_.get()))
      mpi->set_max_chunk_bytes(GetParam().chunk_bytes);
    plane_ = make_data_plane(*group_, *be_);  // inherits the chunk size
  }

  // Host -> backend -> host around `op`.
  DeviceArray<float> upload(const std::vector<float>& h) {
    DeviceArray<float> d(*be_, int64_t(h.size()));
    if (!h.empty()) be_->copy_to_device(d.data(), h.data(), sizeof(float) * h.size());
    return d;
  }
  std::vector<float> download(const DeviceArray<float>& d) {
    std::vector<float> h(static_cast<size_t>(d.size()));
    if (!h.empty()) be_->copy_to_host(h.data(), d.data(), d.bytes());
    return h;
  }
  // Unequal blocks, some empty: rank r's block has (5 r + 3) % 7 elements.
  std::vector<int64_t> counts() const {
    std::vector<int64_t> c;
    for (int r = 0; r < plane_->size(); ++r) c.push_back((5 * r + 3) % 7 + (r == 1 ? 40 : 0));
    return c;
  }

  std::unique_ptr<Backend> be_;
  std::unique_ptr<Communicator> group_;
  std::unique_ptr<DataPlane> plane_;
};

TEST_P(DataPlaneContract, AllReduceSumsInRankOrder) {
  const int P = plane_->size(), me = plane_->rank();
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{1001}}) {
    DeviceArray<float> d = upload(input(me, n, 1));
    plane_->all_reduce_sum(d.data(), n);
    plane_->synchronize();
    EXPECT_TRUE(same_bits(download(d), rank_order_sum(P, n, 1))) << "n=" << n;
  }
}

TEST_P(DataPlaneContract, ReduceScatterSumsOwnBlockAndKeepsTheRest) {
  const int P = plane_->size(), me = plane_->rank();
  const std::vector<int64_t> c = counts();
  int64_t total = 0, start = 0;
  for (int r = 0; r < P; ++r) {
    if (r == me) start = total;
    total += c[size_t(r)];
  }
  const std::vector<float> mine = input(me, total, 2);
  DeviceArray<float> d = upload(mine);
  plane_->reduce_scatter_sum(d.data(), c);
  plane_->synchronize();
  std::vector<float> want = mine;
  const std::vector<float> sum = rank_order_sum(P, total, 2);
  for (int64_t i = start; i < start + c[size_t(me)]; ++i) want[size_t(i)] = sum[size_t(i)];
  EXPECT_TRUE(same_bits(download(d), want));
}

TEST_P(DataPlaneContract, AllGatherGivesEveryRankEveryBlock) {
  const int P = plane_->size(), me = plane_->rank();
  const std::vector<int64_t> c = counts();
  // Rank r's buffer holds its own block at its place and garbage elsewhere.
  std::vector<float> want, mine;
  for (int r = 0; r < P; ++r) {
    const std::vector<float> block = input(r, c[size_t(r)], 3);
    want.insert(want.end(), block.begin(), block.end());
    const std::vector<float> junk(block.size(), -7.0f);
    mine.insert(mine.end(), r == me ? block.begin() : junk.begin(),
                r == me ? block.end() : junk.end());
  }
  DeviceArray<float> d = upload(mine);
  plane_->all_gather(d.data(), c);
  plane_->synchronize();
  EXPECT_TRUE(same_bits(download(d), want));
}

TEST_P(DataPlaneContract, AllToAllTransposesBlocks) {
  const int P = plane_->size(), me = plane_->rank();
  const int64_t n = 13;
  DeviceArray<float> in = upload(input(me, n * P, 4)), out(*be_, n * P);
  plane_->all_to_all(out.data(), in.data(), n);
  plane_->synchronize();
  std::vector<float> want;
  for (int q = 0; q < P; ++q) {
    const std::vector<float> from_q = input(q, n * P, 4);  // q's block `me` came here
    want.insert(want.end(), from_q.begin() + me * n, from_q.begin() + (me + 1) * n);
  }
  EXPECT_TRUE(same_bits(download(out), want));
}

TEST_P(DataPlaneContract, BroadcastCopiesTheRoot) {
  const int P = plane_->size(), me = plane_->rank(), root = P - 1;
  DeviceArray<float> d = upload(input(me, 77, 5));
  plane_->broadcast(d.data(), 77, root);
  plane_->synchronize();
  EXPECT_TRUE(same_bits(download(d), input(root, 77, 5)));
}

// The Communicator adapter model code gets: floats on the plane (backend memory), host scalars
// on the control communicator.
TEST_P(DataPlaneContract, BackendCommunicatorRoutesFloatsToThePlane) {
  const int P = plane_->size(), me = plane_->rank();
  auto comm = make_backend_communicator(*plane_, *group_, *be_);
  EXPECT_EQ(comm->size(), P);
  EXPECT_EQ(comm->rank(), me);
  DeviceArray<float> d = upload(input(me, 50, 6));
  comm->all_reduce_sum(d.data(), 50);
  EXPECT_TRUE(same_bits(download(d), rank_order_sum(P, 50, 6)));
  // Out of place, equal blocks.
  const int64_t n = 9;
  DeviceArray<float> block = upload(input(me, n, 7)), gathered(*be_, n * P);
  comm->all_gather(gathered.data(), block.data(), n);
  std::vector<float> want;
  for (int r = 0; r < P; ++r) {
    const std::vector<float> b = input(r, n, 7);
    want.insert(want.end(), b.begin(), b.end());
  }
  EXPECT_TRUE(same_bits(download(gathered), want));
  DeviceArray<float> blocks = upload(input(me, n * P, 8)), reduced(*be_, n);
  comm->reduce_scatter_sum(reduced.data(), blocks.data(), n);
  const std::vector<float> sum = rank_order_sum(P, n * P, 8);
  EXPECT_TRUE(same_bits(download(reduced),
                        std::vector<float>(sum.begin() + me * n, sum.begin() + (me + 1) * n)));
  double host = me + 1.0;  // host memory: the control plane
  comm->all_reduce_sum(&host, 1);
  EXPECT_EQ(host, P * (P + 1) / 2.0);
  std::string s = me == 0 ? "from rank 0" : "";
  comm->broadcast(s, 0);
  EXPECT_EQ(s, "from rank 0");
}

INSTANTIATE_TEST_SUITE_P(
    Planes, DataPlaneContract,
    ::testing::Values(PlaneCase{"cpu", MpiCommunicator::kDefaultMaxChunkBytes},
                      PlaneCase{"cpu", 12},
                      PlaneCase{"guarded", MpiCommunicator::kDefaultMaxChunkBytes},
                      PlaneCase{"guarded", 12}),
    [](const auto& info) {
      return std::string(info.param.backend) +
             (info.param.chunk_bytes == 12 ? "_tiny_chunks" : "_default_chunks");
    });

}  // namespace
}  // namespace switcht5
