// The NCCL data plane (comm/nccl/nccl_data_plane.h) on NCCL communicators of one rank, and
// parallel.data_plane's selection in make_data_plane.
//
// GPU (instances named .../cuda, ctest entry test_nccl_data_plane_gpu, label gpu): every NCCL
// call the plane makes (ncclAllReduce, ncclReduceScatter, ncclAllGather, ncclBroadcast, grouped
// ncclSend/ncclRecv, and the per-block grouped ncclReduce / ncclBroadcast, forced with
// set_blockwise_always since a group of one only has equal blocks) against the contract
// (data_plane.h) and, bitwise, against what parallel.data_plane: mpi gives a group of one on
// host buffers (make_data_plane over the cpu backend); the event ordering with the compute
// stream (a collective reads what compute wrote before it, compute after synchronize() reads
// what it wrote); the Communicator adapter over it; abort(). Skipped with the reason where the
// build has no NCCL or no GPU is usable.
// CPU (every build): parallel.data_plane: nccl without the CUDA backend is a UserError naming
// the key.
#include <gtest/gtest.h>

#include <bit>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "comm/data_plane.h"
#include "core/check.h"
#include "test_util.h"
#if defined(SWITCHT5_HAVE_NCCL)
#include "comm/nccl/nccl_data_plane.h"
#endif

namespace switcht5 {
namespace {

using testing::download;
using testing::random_vector;
using testing::upload;

::testing::AssertionResult same_bits(const std::vector<float>& got,
                                     const std::vector<float>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  for (size_t i = 0; i < got.size(); ++i)
    if (std::bit_cast<uint32_t>(got[i]) != std::bit_cast<uint32_t>(want[i]))
      return ::testing::AssertionFailure() << "element " << i << " of " << got.size() << ": "
                                           << got[i] << " vs " << want[i];
  return ::testing::AssertionSuccess();
}

// ---- selection (CPU) ----------------------------------------------------------------------

TEST(DataPlaneSelection, KindsAreTheConfigValues) {
  EXPECT_EQ(data_plane_kind("mpi"), DataPlaneKind::kMpi);
  EXPECT_EQ(data_plane_kind("nccl"), DataPlaneKind::kNccl);
  EXPECT_THROW(data_plane_kind("gloo"), Error);
}

// Whether or not this build has NCCL, a host backend cannot carry an NCCL plane; the message
// names the key (and, with NCCL, the backend; without, the build).
TEST(DataPlaneSelection, NcclOnTheCpuBackendIsAUserErrorNamingTheKey) {
  auto self = make_self_communicator();
  auto cpu = make_backend("cpu");
  try {
    make_data_plane(*self, *cpu, DataPlaneKind::kNccl);
    ADD_FAILURE() << "no error";
  } catch (const UserError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("parallel.data_plane"), std::string::npos) << msg;
#if defined(SWITCHT5_HAVE_NCCL)
    EXPECT_NE(msg.find("train.backend: cuda"), std::string::npos) << msg;
#else
    EXPECT_NE(msg.find("this build has no NCCL"), std::string::npos) << msg;
#endif
  }
  // mpi on a group of one: the local plane, for any backend.
  EXPECT_EQ(make_data_plane(*self, *cpu, DataPlaneKind::kMpi)->size(), 1);
}

// ---- NCCL on a group of one (GPU) ---------------------------------------------------------

class NcclPlane : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
#if defined(SWITCHT5_HAVE_NCCL)
    std::string why;
    be_ = testing::backend_or_skip("cuda", why);
    if (!be_) {
      std::printf("skipped: %s\n", why.c_str());
      GTEST_SKIP() << why;
    }
    self_ = make_self_communicator();
    auto plane = std::make_unique<NcclDataPlane>(*self_, dynamic_cast<CudaBackend&>(*be_));
    nccl_ = plane.get();
    plane_ = std::move(plane);
    cpu_ = make_backend("cpu");
    mpi_ = make_data_plane(*self_, *cpu_, DataPlaneKind::kMpi);
#else
    const char* why = "this build has no NCCL (configure with -DSWITCHT5_CUDA=ON where nccl.h "
                      "and libnccl are installed)";
    std::printf("skipped: %s\n", why);
    GTEST_SKIP() << why;
#endif
  }

  void set_blockwise([[maybe_unused]] bool on) {
#if defined(SWITCHT5_HAVE_NCCL)
    nccl_->set_blockwise_always(on);
#endif
  }

  // `op` on the NCCL plane (device buffer) and on the mpi setting's plane (host buffer, cpu
  // backend), from the same input; both results, after synchronize().
  template <class Op>
  std::pair<std::vector<float>, std::vector<float>> both(const std::vector<float>& input, Op op) {
    DeviceArray<float> d = upload(*be_, input);
    op(*plane_, d.data());
    plane_->synchronize();
    DeviceArray<float> h = upload(*cpu_, input);
    op(*mpi_, h.data());
    mpi_->synchronize();
    return {download(*be_, d.data(), d.size()), download(*cpu_, h.data(), h.size())};
  }

  std::unique_ptr<Backend> be_, cpu_;
  std::unique_ptr<Communicator> self_;
  std::unique_ptr<DataPlane> plane_, mpi_;
#if defined(SWITCHT5_HAVE_NCCL)
  NcclDataPlane* nccl_ = nullptr;
#endif
};

TEST_P(NcclPlane, AllReduceAndBroadcastMatchTheMpiPlane) {
  EXPECT_EQ(plane_->size(), 1);
  EXPECT_EQ(plane_->rank(), 0);
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{1001}, int64_t{3} << 20}) {
    const std::vector<float> x = random_vector(n, 10 + uint64_t(n));
    auto [got, want] = both(x, [n](DataPlane& p, float* d) { p.all_reduce_sum(d, n); });
    EXPECT_TRUE(same_bits(got, want)) << "all_reduce_sum n=" << n;
    EXPECT_TRUE(same_bits(got, x)) << "a sum over one rank is its input, n=" << n;
    auto [gb, wb] = both(x, [n](DataPlane& p, float* d) { p.broadcast(d, n, 0); });
    EXPECT_TRUE(same_bits(gb, wb)) << "broadcast n=" << n;
    EXPECT_TRUE(same_bits(gb, x)) << "broadcast n=" << n;
  }
  DeviceArray<float> d(*be_, 4);
  EXPECT_THROW(plane_->broadcast(d.data(), 4, 1), Error);  // root outside the group
}

TEST_P(NcclPlane, ReduceScatterAndAllGatherMatchTheMpiPlaneWholeAndBlockwise) {
  for (bool blockwise : {false, true}) {
    set_blockwise(blockwise);
    for (int64_t c : {int64_t{0}, int64_t{57}, int64_t{1} << 20}) {
      const std::vector<int64_t> counts = {c};
      const std::vector<float> x = random_vector(c, 20 + uint64_t(c));
      auto [got, want] =
          both(x, [&](DataPlane& p, float* d) { p.reduce_scatter_sum(d, counts); });
      EXPECT_TRUE(same_bits(got, want))
          << "reduce_scatter_sum c=" << c << " blockwise=" << blockwise;
      EXPECT_TRUE(same_bits(got, x)) << "reduce_scatter_sum c=" << c;
      auto [gg, wg] = both(x, [&](DataPlane& p, float* d) { p.all_gather(d, counts); });
      EXPECT_TRUE(same_bits(gg, wg)) << "all_gather c=" << c << " blockwise=" << blockwise;
      EXPECT_TRUE(same_bits(gg, x)) << "all_gather c=" << c;
    }
  }
  set_blockwise(false);
  DeviceArray<float> d(*be_, 4);
  const std::vector<int64_t> two = {2, 2}, negative = {-1};
  EXPECT_THROW(plane_->reduce_scatter_sum(d.data(), two), Error);  // one count per rank
  EXPECT_THROW(plane_->all_gather(d.data(), negative), Error);
}

TEST_P(NcclPlane, AllToAllMatchesTheMpiPlane) {
  for (int64_t n : {int64_t{0}, int64_t{13}, int64_t{1} << 20}) {
    const std::vector<float> x = random_vector(n, 30 + uint64_t(n));
    DeviceArray<float> in = upload(*be_, x), out(*be_, n);
    plane_->all_to_all(out.data(), in.data(), n);
    plane_->synchronize();
    DeviceArray<float> hin = upload(*cpu_, x), hout(*cpu_, n);
    mpi_->all_to_all(hout.data(), hin.data(), n);
    mpi_->synchronize();
    const std::vector<float> got = download(*be_, out.data(), n);
    EXPECT_TRUE(same_bits(got, download(*cpu_, hout.data(), n))) << "n=" << n;
    EXPECT_TRUE(same_bits(got, x)) << "n=" << n;
  }
}

// The events: the collective (on the communication stream) must read what the compute stream
// wrote before the call, and compute issued after synchronize() must see what it wrote. Large
// buffers and no host waits between the steps leave each stream time to overtake the other if
// an event were missing.
TEST_P(NcclPlane, CollectivesAreOrderedWithTheComputeStream) {
  const int64_t n = int64_t{32} << 20;  // 128 MB
  DeviceArray<float> in(*be_, n), out(*be_, n);
  for (int round = 1; round <= 4; ++round) {
    be_->fill(in.data(), float(round), n);          // compute writes the input ...
    plane_->all_to_all(out.data(), in.data(), n);   // ... the collective copies it ...
    plane_->synchronize();
    be_->scale(out.data(), 2.0f, n);                // ... compute doubles the result ...
    be_->fill(in.data(), -1.0f, n);                 // ... and overwrites the input
    const std::vector<float> got = download(*be_, out.data(), n);
    int64_t wrong = 0;
    for (float v : got) wrong += v != 2.0f * float(round);
    EXPECT_EQ(wrong, 0) << "round " << round << ": " << wrong << " of " << n
                        << " elements out of order";
  }
}

// Model code's Communicator over the NCCL plane: floats on it, host values on the control plane.
TEST_P(NcclPlane, BackendCommunicatorRunsOnIt) {
  auto comm = make_backend_communicator(*plane_, *self_, *be_);
  const std::vector<float> x = random_vector(300, 40);
  DeviceArray<float> d = upload(*be_, x), out(*be_, 300);
  comm->all_reduce_sum(d.data(), 300);
  EXPECT_TRUE(same_bits(download(*be_, d.data(), 300), x));
  comm->all_gather(out.data(), d.data(), 300);
  EXPECT_TRUE(same_bits(download(*be_, out.data(), 300), x));
  comm->reduce_scatter_sum(out.data(), d.data(), 300);
  EXPECT_TRUE(same_bits(download(*be_, out.data(), 300), x));
  comm->all_to_all(out.data(), d.data(), 300);
  EXPECT_TRUE(same_bits(download(*be_, out.data(), 300), x));
  comm->broadcast(d.data(), 300, 0);
  EXPECT_TRUE(same_bits(download(*be_, d.data(), 300), x));
  double host = 2.5;
  comm->all_reduce_sum(&host, 1);
  EXPECT_EQ(host, 2.5);
}

// A watchdog's abort: the communicator is gone, later calls are Errors, destruction returns.
TEST_P(NcclPlane, AbortEndsThePlane) {
  DeviceArray<float> d(*be_, 64);
  plane_->all_reduce_sum(d.data(), 64);
  plane_->abort();
  plane_->abort();  // once is enough; twice is harmless
  EXPECT_THROW(plane_->all_reduce_sum(d.data(), 64), Error);
  EXPECT_THROW(plane_->synchronize(), Error);
  plane_.reset();
  be_->synchronize();  // the compute stream does not wait on anything aborted
}

// make_data_plane with parallel.data_plane: nccl on a group of one: no communicator needed.
TEST_P(NcclPlane, SelectedForCudaByMakeDataPlane) {
  auto local = make_data_plane(*self_, *be_, DataPlaneKind::kNccl);
  EXPECT_EQ(local->size(), 1);
  const std::vector<float> x = random_vector(10, 50);
  DeviceArray<float> d = upload(*be_, x);
  local->all_reduce_sum(d.data(), 10);
  local->synchronize();
  EXPECT_TRUE(same_bits(download(*be_, d.data(), 10), x));
}

INSTANTIATE_TEST_SUITE_P(Backends, NcclPlane, ::testing::Values(std::string("cuda")),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace switcht5
