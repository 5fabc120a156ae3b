// Trains a config on a layout and gathers every parameter in full, for tests that compare
// layouts (tests/mpi/test_parallel_equivalence.cpp, gpu_test_train_data_planes.cpp).
#pragma once
#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "train/trainer.h"

#include <gtest/gtest.h>

namespace switcht5::testing {

struct TrainedRun {
  std::vector<double> losses, grad_norms;
  // Per step, per Switch layer: each expert's gradient norm, then the router's mean entropy,
  // top-1 probability and margin (telemetry, gathered over ranks).
  std::vector<std::vector<double>> expert_norms, confidence;
  std::map<std::string, std::vector<float>> params;  // full logical tensors
};

// Gathers a model-split block into the logical tensor (blocks along `dim`).
inline std::vector<float> gather_model_split(Communicator& group, const ParamInfo& p,
                                      const std::vector<float>& local) {
  const int M = group.size();
  std::vector<float> blocks(local.size() * M);
  group.all_gather(blocks.data(), local.data(), int64_t(local.size()));
  int64_t outer = 1;
  for (int k = 0; k < p.model_split_dim; ++k) outer *= p.shape[size_t(k)];
  const int64_t inner = int64_t(local.size()) / outer;
  std::vector<float> full(blocks.size());
  for (int m = 0; m < M; ++m)
    for (int64_t o = 0; o < outer; ++o)
      std::copy_n(blocks.begin() + (m * outer + o) * inner, inner,
                  full.begin() + (o * M + m) * inner);
  return full;
}

// Trains `cfg` on `world` (size data x model) and gathers every parameter in full.
inline TrainedRun train_layout(const RunConfig& cfg, std::unique_ptr<Communicator> world) {
  ProcessGrid grid = ProcessGrid::create(std::move(world), cfg.parallel.data,
                                         cfg.parallel.model, cfg.parallel.expert);
  Trainer trainer(cfg, grid);
  TrainedRun r;
  for (int64_t s = 1; s <= cfg.train.steps; ++s) {
    StepMetrics m = trainer.train_step(s, /*expert_norms=*/true);
    r.losses.push_back(m.loss);
    r.grad_norms.push_back(m.grad_norm);
    std::vector<double> norms, confidence;
    for (const LayerRouting& l : m.routing) {
      norms.insert(norms.end(), l.expert_grad_norm.begin(), l.expert_grad_norm.end());
      confidence.insert(confidence.end(), {l.entropy, l.top1_prob, l.top1_margin});
    }
    r.expert_norms.push_back(std::move(norms));
    r.confidence.push_back(std::move(confidence));
  }
  Backend& be = trainer.backend();
  ParamStore& ps = trainer.model().params();
  for (const ParamInfo& p : ps.infos()) {
    std::vector<float> local(p.numel);
    be.copy_to_host(local.data(), ps.values() + p.offset, sizeof(float) * p.numel);
    if (p.model_split_dim >= 0 && grid.model > 1)
      local = gather_model_split(*grid.model_group, p, local);
    if (p.kind == ParamKind::kStacked) {
      std::vector<float> full(local.size() * grid.expert);
      grid.expert_group->all_gather(full.data(), local.data(), int64_t(local.size()));
      r.params[p.name] = std::move(full);
    } else {
      r.params[p.name] = std::move(local);
    }
  }
  return r;
}

// `run` trained like `ref` (one process): every step's loss and gradient norm within 1e-5
// relative, and every parameter tensor within 1e-5 of its largest entry. The reference must
// have trained (its loss fell by more than 0.5), so equality is not trivially true.
inline void expect_same_training(const TrainedRun& run, const TrainedRun& ref) {
  auto max_abs = [](const std::vector<float>& v) {
    double m = 0;
    for (float x : v) m = std::max(m, double(std::fabs(x)));
    return m;
  };
  ASSERT_EQ(run.losses.size(), ref.losses.size());
  for (size_t s = 0; s < ref.losses.size(); ++s) {
    EXPECT_LE(std::fabs(run.losses[s] - ref.losses[s]), 1e-5 * std::fabs(ref.losses[s]))
        << "step " << s + 1 << ": " << run.losses[s] << " vs " << ref.losses[s];
    EXPECT_LE(std::fabs(run.grad_norms[s] - ref.grad_norms[s]), 1e-5 * ref.grad_norms[s])
        << "step " << s + 1;
    // Telemetry: every expert's gradient norm and the router's confidence, whole model.
    ASSERT_EQ(run.expert_norms[s].size(), ref.expert_norms[s].size()) << "step " << s + 1;
    ASSERT_FALSE(ref.expert_norms[s].empty());
    for (size_t i = 0; i < ref.expert_norms[s].size(); ++i)
      EXPECT_LE(std::fabs(run.expert_norms[s][i] - ref.expert_norms[s][i]),
                1e-5 * ref.grad_norms[s])
          << "step " << s + 1 << " expert norm " << i;
    ASSERT_EQ(run.confidence[s].size(), ref.confidence[s].size());
    for (size_t i = 0; i < ref.confidence[s].size(); ++i)
      EXPECT_NEAR(run.confidence[s][i], ref.confidence[s][i], 1e-6)
          << "step " << s + 1 << " router confidence " << i;
  }
  EXPECT_GT(ref.losses.front() - ref.losses.back(), 0.5);
  ASSERT_EQ(run.params.size(), ref.params.size());
  for (const auto& [name, want] : ref.params) {
    const std::vector<float>& got = run.params.at(name);
    ASSERT_EQ(got.size(), want.size()) << name;
    double diff = 0;
    for (size_t i = 0; i < want.size(); ++i)
      diff = std::max(diff, double(std::fabs(got[i] - want[i])));
    EXPECT_LE(diff, 1e-5 * max_abs(want)) << name;
  }
}

}  // namespace switcht5::testing
