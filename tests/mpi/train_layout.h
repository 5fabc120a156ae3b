// Trains a config on a layout and gathers every parameter in full, for tests that compare
// layouts (tests/mpi/test_parallel_equivalence.cpp, gpu_test_train_data_planes.cpp).
#pragma once
#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "train/trainer.h"

namespace switcht5::testing {

struct TrainedRun {
  std::vector<double> losses, grad_norms;
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
    StepMetrics m = trainer.train_step(s);
    r.losses.push_back(m.loss);
    r.grad_norms.push_back(m.grad_norm);
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

}  // namespace switcht5::testing
