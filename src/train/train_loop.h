// `switcht5 train`: the loop around Trainer::train_step: resume, logging and metrics.jsonl,
// periodic validation and checkpoints, and stopping on a signal.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "train/metrics.h"

namespace switcht5 {

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

}  // namespace switcht5
