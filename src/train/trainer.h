// One training step: this rank's rows of each global batch -> forward/backward over gradient
// accumulation micro-batches -> gradient reduction over the process grid (GradientReducer, on
// the data plane) -> global-norm clipping -> optimizer step (non-finite steps skipped on every
// rank together, decided on the control plane) -> ZeRO-1 parameter all-gather. The loop around
// it (logging, checkpoints, signals) is train() in train/train_loop.h.
//
// Data parallelism: every data rank holds all non-expert parameters and computes on its rows;
// their gradients are summed over the data group. Expert parallelism: experts are sharded over
// expert groups (SwitchFFN exchanges tokens); expert gradients are summed only over the ranks
// holding the same experts. The loss weights are global counts (model.h), so the sum over ranks
// is exactly the one-process gradient: the layout does not change the math.
//
// ZeRO-1 (parallel.zero1): the dense parameters' update and optimizer state are sharded over the
// data ranks in contiguous, parameter-aligned ranges (train/gradient_reducer.h).
//
// Trainer holds everything a step needs and does no file I/O, so the benchmark
// (bench/bench_step) times exactly the step that train() runs.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "comm/data_plane.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "model/batch.h"
#include "model/model.h"
#include "train/batch_source.h"
#include "train/gradient_reducer.h"
#include "train/metrics.h"
#include "train/optimizer.h"
#include "train/schedule.h"
#include "train/stall_hook.h"
#include "train/train_loop.h"

namespace switcht5 {

struct TrainingState;  // checkpoint/checkpoint.h

// What a Trainer is built for: training (model, optimizer, training and validation data) or
// evaluation only (model and validation data: no optimizer state, no training shards read).
enum class TrainerUse { kTrain, kEvaluate };

// Sequences per forward call: train.batch_size / parallel.data / train.grad_accum_steps (a
// whole number for a validated config).
int micro_batch_size(const RunConfig& cfg);

// What one rank's step communicates over, as the model, the gradient reducer and the optimizer
// take it. The Trainer passes its backend communicators and data planes over the process grid;
// `switcht5 plan` passes stand-ins that have only a size and rank 0 (train/memory_plan.h).
struct StepGroups {
  Communicator* expert = nullptr;  // over the expert group (the model's all-to-all)
  Communicator* model = nullptr;   // over the model group (tensor parallelism, Adafactor)
  DataPlane* data = nullptr;       // over the data group (gradients; training only)
  DataPlane* replica = nullptr;    // over the expert-replica group (training only)
  Sharding sharding;               // this rank's expert and model blocks
  int data_rank = 0;
};

// Everything a rank's training or evaluation holds in backend memory, built in one place, so
// that `switcht5 plan` counts exactly what the Trainer allocates: the model (parameters, their
// gradients and compute copy, activations, the batch on the device), and for training the
// gradient reducer and the optimizer (state only for the parameters this rank updates), then
// the step's statistics array. Parameters are allocated, not initialised.
struct StepState {
  std::unique_ptr<SwitchT5Model> model;
  std::unique_ptr<GradientReducer> reducer;  // training only
  std::unique_ptr<Optimizer> optimizer;      // training only
  DeviceArray<double> statistics;            // model statistics, then the trainer's (trainer.cpp)
  // Training only: what changes from step to step, in backend memory, written before the step's
  // work is issued (so a recorded step, train.cuda_graphs, replays on the current values).
  std::vector<DeviceBatch> micro_batches;  // one per gradient-accumulation micro-batch
  DeviceArray<uint64_t> rng_step;          // [1] the step: RandomKey's counter for dropout/jitter
  DeviceArray<float> ce_scale;             // [1] LossWeights::ce_scale (1 / target tokens)
  size_t step_input_bytes() const;
};
StepState build_step_state(const RunConfig& cfg, Backend& be, TrainerUse use,
                           const StepGroups& groups);

class Trainer {
 public:
  // `grid` must outlive the trainer; its degrees must match cfg.parallel. `make_backend_named`
  // builds the backend from cfg.train.backend and the grid's node-local rank (which GPU this
  // rank uses); tests pass a substitute.
  Trainer(const RunConfig& cfg, ProcessGrid& grid, TrainerUse use = TrainerUse::kTrain,
          const BackendFactory& make_backend_named = make_backend);
  ~Trainer();

  // Runs optimizer step `step` (1-based) on the next global batch of the training source. A
  // non-finite loss or gradient on any rank skips the update on every rank (metrics.skipped);
  // more than train.max_skipped_steps consecutive skips throw Error. `expert_norms` (the same on
  // every rank; the loop asks at logged steps) also fills each Switch layer's
  // expert_grad_norm, unless the step was skipped.
  StepMetrics train_step(int64_t step, bool expert_norms = false);
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
  // its optimizer state, or -1 when every data rank holding it does (always -1 for a trainer
  // built for evaluation).
  int param_owner(size_t i) const { return reducer_ ? reducer_->param_owner()[i] : -1; }
  // The gradient reducer (null for a trainer built for evaluation).
  const GradientReducer* reducer() const { return reducer_.get(); }
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

  // What each data plane has moved so far (DataPlane::traffic), by group: "data",
  // "expert_replica" (training only), "expert", "model". `switcht5 plan` predicts it per step
  // (train/comm_plan.h).
  PlaneTraffic traffic(const std::string& group) const;

  // train.cuda_graphs: whether the step's forward and backward now replay a recording, and
  // how many steps replayed one (bench_step and tests report them).
  bool step_recorded() const { return step_recorded_; }
  int64_t replayed_steps() const { return replayed_steps_; }

  // Test hook: the gradients of rank `rank` get a NaN at step `step`, at float `offset` of
  // ParamStore::grads() (also set by the environment variable SWITCHT5_INJECT_NAN=STEP:RANK,
  // offset 0).
  void inject_nan(int64_t step, int rank, int64_t offset = 0) {
    inject_step_ = step;
    inject_rank_ = rank;
    inject_offset_ = offset;
  }
  // Test hook SWITCHT5_STALL (train/stall_hook.h), read when the trainer is built.
  const StallHook& stall_hook() const { return stall_; }

 private:
  // Adds the sums of squares of the summed gradients this rank holds (its ZeRO-1 shard of the
  // dense region) of the three ParamStore regions to extra[kNorm*] (backend memory);
  // global_grad_norm combines a host copy over the groups.
  void accumulate_grad_norm_squares(double* extra);
  double global_grad_norm(const double* extra);
  // Issues the step's work up to its read-back, all of it on the backend and reading only
  // backend memory (what train.cuda_graphs records once and replays): zeroed gradients and
  // statistics, forward and backward over the micro-batches (gradient buckets reduced as they
  // become final), and the gradient-norm partial sums.
  void issue_forward_backward(int64_t step, const LossWeights& w, RandomKey seed);
  std::string first_nonfinite();
  // Per Switch layer (switch_layers_ order), the L2 norm of each expert's summed gradient over
  // all of its stacked tensors, whole model (gathered over the expert and model groups).
  // Collective over those groups.
  std::vector<std::vector<double>> expert_grad_norms();

  RunConfig cfg_;
  ProcessGrid& grid_;
  int local_rows_, micro_;
  std::unique_ptr<Backend> be_;
  // The model's communication (expert all-to-all, tensor-parallel sums) and Adafactor's gather
  // of model-split parameters run on data planes over the expert and model groups, through
  // Communicator adapters (make_backend_communicator), so they take backend memory.
  std::unique_ptr<DataPlane> expert_plane_, model_plane_;
  std::unique_ptr<Communicator> expert_comm_, model_comm_;
  std::unique_ptr<SwitchT5Model> model_;
  std::unique_ptr<Optimizer> optimizer_;
  LrSchedule schedule_;
  std::unique_ptr<BatchSource> train_source_;
  std::unique_ptr<BatchSource> val_source_;
  std::vector<std::string> switch_layers_;
  // Data planes over the data and expert-replica groups, and the reducer on them (training).
  std::unique_ptr<DataPlane> data_plane_, replica_plane_;
  std::unique_ptr<GradientReducer> reducer_;
  Batch local_;                    // this rank's rows of the global batch
  std::vector<Batch> batches_;     // one per micro-batch, reused every step
  Batch eval_batch_;
  // A step's statistics in backend memory: the model's (ModelStatsSlot, summed over the
  // micro-batches, then all-reduced over the data group on the host copy) and the trainer's
  // sums of squares (StepStatsSlot in trainer.cpp). Read back once per step.
  DeviceArray<double> step_stats_;
  std::vector<DeviceBatch> device_batches_;     // StepState::micro_batches
  DeviceArray<uint64_t> rng_step_;              // StepState::rng_step
  DeviceArray<float> ce_scale_;                 // StepState::ce_scale
  bool step_recorded_ = false;                  // train.cuda_graphs: a recording to replay
  int64_t eager_steps_ = 0, replayed_steps_ = 0;
  std::vector<double> host_stats_;
  double step_flops_ = 0.0;
  int consecutive_skips_ = 0;
  int64_t inject_step_ = -1;
  int64_t inject_offset_ = 0;
  int inject_rank_ = -1;
  StallHook stall_;
  std::vector<std::vector<double>> expert_norms_;  // train_step's, until decoded into metrics
  // The watchdog aborts the data planes before it ends the job (NCCL: ncclCommAbort); last, so
  // that they are removed before the planes go.
  std::vector<Watchdog::Registration> plane_aborts_;
};

}  // namespace switcht5
