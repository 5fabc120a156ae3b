// The training loop on one process: synthetic batches -> forward/backward over gradient
// accumulation micro-batches -> global-norm clipping -> optimizer step, with logging to spdlog
// and DIR/metrics.jsonl, and periodic validation.
//
// Trainer holds everything a step needs (backend, model, optimizer, schedule, data) and does no
// I/O, so the benchmark (bench/bench_step) times exactly the step that train() runs.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "config/config.h"
#include "model/batch.h"
#include "model/model.h"
#include "train/optimizer.h"
#include "train/schedule.h"
#include "train/batch_source.h"

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

class Trainer {
 public:
  explicit Trainer(const RunConfig& cfg);
  ~Trainer();

  // Runs optimizer step `step` (1-based) on the next global batch of the training source:
  // forward/backward over the micro-batches, clipping and the update. Throws Error on a
  // non-finite loss or gradient.
  StepMetrics train_step(int64_t step);
  // Mean cross-entropy over the first train.eval_batches global validation batches (eval
  // mode); NaN when the config has no validation data.
  double evaluate();
  bool has_validation() const { return val_source_ != nullptr; }
  BatchSource& train_source() { return *train_source_; }

  Backend& backend() { return *be_; }
  SwitchT5Model& model() { return *model_; }
  // Matmul FLOPs of one optimizer step (forward + backward).
  double step_flops() const { return step_flops_; }

 private:
  RunConfig cfg_;
  int micro_;
  std::unique_ptr<Backend> be_;
  std::unique_ptr<SwitchT5Model> model_;
  std::unique_ptr<Optimizer> optimizer_;
  LrSchedule schedule_;
  std::unique_ptr<BatchSource> train_source_;
  std::unique_ptr<BatchSource> val_source_;
  Batch local_;                 // this process's rows of the global batch
  std::vector<Batch> batches_;  // one per micro-batch, reused every step
  Batch eval_batch_;
  double step_flops_ = 0.0;
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
