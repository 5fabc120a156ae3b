// The training loop on one process: synthetic batches -> forward/backward over gradient
// accumulation micro-batches -> global-norm clipping -> optimizer step, with logging to spdlog
// and DIR/metrics.jsonl, and periodic validation.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"

namespace switcht5 {

struct StepMetrics {
  int64_t step = 0;
  double loss = 0.0;              // mean cross-entropy over the global batch's target tokens
  double aux_loss = 0.0;          // load-balancing loss, mean over Switch layers (1 = balanced)
  double z_loss = 0.0;            // router z-loss, mean over Switch layers
  double lr = 0.0;
  double grad_norm = 0.0;         // before clipping
  double tokens_per_s = 0.0;      // (inputs + targets) tokens of the global batch per second
  double dropped_fraction = 0.0;  // tokens past capacity / routed tokens, all Switch layers
  double step_ms = 0.0;
  bool has_val = false;
  double val_loss = 0.0;
};

struct TrainResult {
  std::vector<StepMetrics> logged;  // every logged step
  double final_loss = 0.0;
};

// Trains per `cfg`, writing config.yaml, train.log and metrics.jsonl into run_dir.
TrainResult train(const RunConfig& cfg, const std::string& run_dir);

// One metrics.jsonl line (no trailing newline).
std::string metrics_json(const StepMetrics& m);

}  // namespace switcht5
