// The training loop: this rank's rows of each global batch -> forward/backward over gradient
// accumulation micro-batches -> gradient synchronisation over the process grid -> global-norm
// clipping -> optimizer step (non-finite steps skipped on every rank together), with logging to
// spdlog and DIR/metrics.jsonl, and periodic validation.
//
// Data parallelism: every data rank holds all non-expert parameters and computes on its rows;
// their gradients are summed over the data group. Expert parallelism: experts are sharded over
// expert groups (SwitchFFN exchanges tokens); expert gradients are summed only over the ranks
// holding the same experts. The loss weights are global counts (model.h), so the sum over ranks
// is exactly the one-process gradient: the layout does not change the math.
//
// Trainer holds everything a step needs and does no file I/O, so the benchmark
// (bench/bench_step) times exactly the step that train() runs.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "model/batch.h"
#include "model/model.h"
#include "train/batch_source.h"
#include "train/optimizer.h"
#include "train/schedule.h"

namespace switcht5 {

// Routing statistics of one Switch layer over a step (all micro-batches and data ranks).
struct LayerRouting {
  std::string layer;                     // e.g. "encoder.block.1"
  double aux_loss = 0.0;                 // load-balancing loss, mean over groups
  double z_loss = 0.0;                   // router z-loss, mean over tokens
  double dropped_fraction = 0.0;
  std::vector<double> expert_fraction;   // fraction of tokens whose top-1 is each expert
};

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
  bool skipped = false;           // non-finite loss or gradient: no update was applied
  std::string nonfinite;          // then: the first non-finite tensor and the rank that saw it
  std::vector<LayerRouting> routing;
  bool has_val = false;
  double val_loss = 0.0;
};

struct TrainingState;  // checkpoint/checkpoint.h

// What a Trainer is built for: training (model, optimizer, training and validation data) or
// evaluation only (model and validation data: no optimizer state, no training shards read).
enum class TrainerUse { kTrain, kEvaluate };

class Trainer {
 public:
  // `grid` must outlive the trainer; its degrees must match cfg.parallel. `make_backend_named`
  // builds the backend from cfg.train.backend (tests pass a substitute).
  Trainer(const RunConfig& cfg, ProcessGrid& grid, TrainerUse use = TrainerUse::kTrain,
          const BackendFactory& make_backend_named = make_backend);
  ~Trainer();

  // Runs optimizer step `step` (1-based) on the next global batch of the training source. A
  // non-finite loss or gradient on any rank skips the update on every rank (metrics.skipped);
  // more than train.max_skipped_steps consecutive skips throw Error.
  StepMetrics train_step(int64_t step);
  // Mean cross-entropy over the first train.eval_batches global validation batches (eval
  // mode); NaN when the config has no validation data.
  double evaluate();
  bool has_validation() const { return val_source_ != nullptr; }

  Backend& backend() { return *be_; }
  SwitchT5Model& model() { return *model_; }
  bool has_optimizer() const { return optimizer_ != nullptr; }
  Optimizer& optimizer() { return *optimizer_; }
  ProcessGrid& grid() { return grid_; }
  BatchSource& train_source() { return *train_source_; }
  const RunConfig& config() const { return cfg_; }
  // ZeRO-1: the data rank that updates parameter i (index into ParamStore::infos()) and keeps
  // its optimizer state, or -1 when every data rank holding it does.
  int param_owner(size_t i) const { return owner_[i]; }
  // Consecutive skipped (non-finite) steps so far; part of the state a checkpoint restores.
  int consecutive_skips() const { return consecutive_skips_; }

  // The view of this trainer's state that checkpoints save and load (checkpoint/checkpoint.h),
  // after training step `step`: it points at the parameters and optimizer state in place.
  TrainingState checkpoint_state(int64_t step = 0);
  // Applies the scalars of a state that load_checkpoint filled with training state (optimizer
  // steps, consecutive skips, training data position; the tensors were loaded in place).
  void restore(const TrainingState& state);
  // Matmul FLOPs of one optimizer step over the whole global batch (forward + backward).
  double step_flops() const { return step_flops_; }

  // Test hook: the gradients of rank `rank` get a NaN at step `step` (also set by the
  // environment variable SWITCHT5_INJECT_NAN=STEP:RANK).
  void inject_nan(int64_t step, int rank) { inject_step_ = step; inject_rank_ = rank; }

 private:
  void sync_gradients();
  // Adds the sums of squares of the (summed) gradients of the three ParamStore regions to
  // extra[kNorm*] (backend memory); global_grad_norm combines a host copy over the groups.
  void accumulate_grad_norm_squares(double* extra);
  double global_grad_norm(const double* extra);
  std::string first_nonfinite();

  RunConfig cfg_;
  ProcessGrid& grid_;
  int local_rows_, micro_;
  std::unique_ptr<Backend> be_;
  std::unique_ptr<SwitchT5Model> model_;
  std::unique_ptr<Optimizer> optimizer_;
  LrSchedule schedule_;
  std::unique_ptr<BatchSource> train_source_;
  std::unique_ptr<BatchSource> val_source_;
  std::vector<std::string> switch_layers_;
  std::vector<int> owner_;         // ZeRO-1: data rank that updates each parameter (-1: all)
  Batch local_;                    // this rank's rows of the global batch
  std::vector<Batch> batches_;     // one per micro-batch, reused every step
  Batch eval_batch_;
  // A step's statistics in backend memory: the model's (ModelStatsSlot, summed over the
  // micro-batches, then all-reduced over the data group on the host copy) and the trainer's
  // sums of squares (StepStatsSlot in trainer.cpp). Read back once per step.
  DeviceArray<double> step_stats_;
  std::vector<double> host_stats_;
  double step_flops_ = 0.0;
  int consecutive_skips_ = 0;
  int64_t inject_step_ = -1;
  int inject_rank_ = -1;
};

struct TrainOptions {
  // --resume: "" (start fresh), "auto" (the latest checkpoint in the checkpoint directory, or
  // fresh when there is none), or a checkpoint file or directory.
  std::string resume;
  // Builds the trainer's backend from cfg.train.backend (tests substitute one).
  BackendFactory make_backend_named = make_backend;
};

struct TrainResult {
  std::vector<StepMetrics> logged;  // every logged step (rank 0 writes them to metrics.jsonl)
  double final_loss = 0.0;
  int64_t start_step = 0;           // steps already done when training started (resume)
  int64_t last_step = 0;            // the last step trained
  std::vector<std::string> checkpoints;  // files saved, in order
  int stop_signal = 0;              // SIGTERM / SIGUSR1 that stopped the run after a save, or 0
};

// Trains per `cfg` on `grid`; rank 0 writes config.yaml, train.log and metrics.jsonl into
// run_dir (every rank writes rank-<r>.log too with log.per_rank_files); checkpoints go to
// checkpoint_dir(cfg, run_dir) every checkpoint.every steps and after the last step. SIGTERM or
// SIGUSR1 (what SLURM sends before a time limit; mpirun forwards SIGUSR1) on any rank makes
// every rank finish the current step, save a checkpoint and return with stop_signal set.
// On resume, train.log and metrics.jsonl are appended to.
TrainResult train(const RunConfig& cfg, ProcessGrid& grid, const std::string& run_dir,
                  const TrainOptions& options = {});
// One process, no MPI: train() on a single-process grid.
TrainResult train(const RunConfig& cfg, const std::string& run_dir,
                  const TrainOptions& options = {});

// One metrics.jsonl line (no trailing newline).
std::string metrics_json(const StepMetrics& m);

}  // namespace switcht5
