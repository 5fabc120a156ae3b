// Two ranks train on the GPU (ctest label gpu, np 2) equal to one rank: the tiny Switch model
// on train.backend cuda, 6 Adafactor steps, dropout off, for each data plane (mpi: staged
// through the host; nccl) and the layouts that exercise each collective: data 2 (all-reduce),
// data 2 with ZeRO-1 (per-block reduce and broadcast), data 2 x expert 2 (the expert
// all-to-all), model 2 (tensor-parallel sums, Adafactor's gather). Losses and grad norms within
// 1e-5 relative of one rank's, every parameter within 1e-5 of its largest entry, as
// tests/mpi/test_parallel_equivalence.cpp holds the CPU layouts.
//
// With fewer GPUs than ranks the two ranks share one. NCCL refuses two ranks of a communicator
// on one device ("Duplicate GPU detected"), so then each rank gets its own NCCL_HOSTID before
// NCCL starts: NCCL takes them for two hosts and moves the data over its network transport
// (sockets), slow but the same collectives. NCCL documents one device per rank; this is a test
// arrangement, not a way to run. Skipped, with the reason, without NCCL (the nccl cases) or
// without a usable GPU (all).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#if defined(SWITCHT5_HAVE_CUDA)
#include <cuda_runtime_api.h>
#endif

#include "backend/backend.h"
#include "comm/communicator.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "core/check.h"
#include "mpi_test_env.h"
#include "train_layout.h"
#include "train/trainer.h"

namespace switcht5 {
namespace {

using testing::test_world;

RunConfig tiny_config(const std::string& plane, int data, int expert, bool zero1, int model) {
  RunConfig cfg = load_config(std::string(SWITCHT5_SOURCE_DIR) + "/configs/tiny-synthetic.yaml",
                              {"train.steps=6", "train.batch_size=8", "model.dropout_rate=0",
                               "model.expert_dropout=0", "model.router_jitter_noise=0.01",
                               "model.num_experts=4", "model.encoder_sparse_step=1",
                               "model.decoder_sparse_step=2", "train.eval_every=0",
                               "train.backend=cuda"});
  cfg.parallel.data = data;
  cfg.parallel.model = model;
  cfg.parallel.expert = expert;
  cfg.parallel.zero1 = zero1;
  cfg.parallel.data_plane = plane;
  return cfg;
}

using testing::TrainedRun;
using testing::train_layout;

// Why the GPU runs cannot happen here ("" when they can), the same on every rank.
const std::string& gpu_unavailable() {
  static const std::string reason = [] {
    std::string why;
    try {
      std::unique_ptr<Backend> be = make_backend("cuda");
      DeviceArray<float> x(*be, 16);
      be->fill(x.data(), 1.0f, 16);
      float h = 0;
      be->copy_to_host(&h, x.data() + 15, sizeof(float));
      if (h != 1.0f) why = "the CUDA backend's fill/copy_to_host does not work";
    } catch (const std::exception& e) {
      why = std::string("no usable GPU: ") + e.what();
    }
    int64_t bad = why.empty() ? 0 : 1;
    test_world().all_reduce_max(&bad, 1);
    if (bad && why.empty()) why = "another rank has no usable GPU";
    return why;
  }();
  return reason;
}

// Ranks sharing a device: a host id of their own for NCCL (file comment), set before NCCL reads
// it at its first communicator.
void separate_nccl_hosts_if_sharing_a_gpu() {
#if defined(SWITCHT5_HAVE_CUDA)
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) return;
  if (devices < test_world().size() && std::getenv("NCCL_HOSTID") == nullptr) {
    const std::string id = "switcht5-test-rank-" + std::to_string(test_world().rank());
    setenv("NCCL_HOSTID", id.c_str(), 1);
  }
#endif
}

const TrainedRun& reference() {
  static const TrainedRun ref =
      train_layout(tiny_config("mpi", 1, 1, false, 1), make_self_communicator());
  return ref;
}

struct Case {
  const char* name;
  const char* plane;
  int data, expert;
  bool zero1;
  int model;
};

class TwoRanksOnGpu : public ::testing::TestWithParam<Case> {};

TEST_P(TwoRanksOnGpu, TrainLikeOneRank) {
  const Case c = GetParam();
  Communicator& world = test_world();
  if (world.size() != 2) GTEST_SKIP() << "runs on exactly 2 ranks, not " << world.size();
  if (!gpu_unavailable().empty()) {
    if (world.rank() == 0) std::printf("skipped: %s\n", gpu_unavailable().c_str());
    GTEST_SKIP() << gpu_unavailable();
  }
#if !defined(SWITCHT5_HAVE_NCCL)
  if (std::string(c.plane) == "nccl") {
    const char* why = "this build has no NCCL (parallel.data_plane: nccl)";
    if (world.rank() == 0) std::printf("skipped: %s\n", why);
    GTEST_SKIP() << why;
  }
#endif
  separate_nccl_hosts_if_sharing_a_gpu();
  const TrainedRun& ref = reference();
  TrainedRun run = train_layout(tiny_config(c.plane, c.data, c.expert, c.zero1, c.model),
                                world.split(0, world.rank()));
  testing::expect_same_training(run, ref);
}

const Case kCases[] = {
    {"mpi_D2", "mpi", 2, 1, false, 1},           {"mpi_D2_E2", "mpi", 2, 2, false, 1},
    {"mpi_D2_zero1", "mpi", 2, 1, true, 1},      {"mpi_M2", "mpi", 1, 1, false, 2},
    {"nccl_D2", "nccl", 2, 1, false, 1},         {"nccl_D2_E2", "nccl", 2, 2, false, 1},
    {"nccl_D2_zero1", "nccl", 2, 1, true, 1},    {"nccl_M2", "nccl", 1, 1, false, 2},
};

INSTANTIATE_TEST_SUITE_P(Layouts, TwoRanksOnGpu, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace switcht5
