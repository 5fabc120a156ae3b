#include "train/train_loop.h"

#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "checkpoint/checkpoint.h"
#include "comm/communicator.h"
#include "core/check.h"
#include "train/run_lock.h"
#include "train/run_log.h"
#include "train/stop_signals.h"
#include "train/trainer.h"

namespace switcht5 {

TrainResult train(const RunConfig& cfg, ProcessGrid& grid, const std::string& run_dir,
                  const TrainOptions& options) {
  const std::string ckpt_dir = checkpoint_dir(cfg, run_dir);
  // Which checkpoint to resume from, decided by rank 0 (it may be the only one to see the
  // directory first) and shared.
  std::string resume_path;
  if (!options.resume.empty()) {
    if (grid.is_root()) resume_path = resolve_resume(options.resume, ckpt_dir);
    grid.world->broadcast(resume_path, 0);
  }
  const bool resuming = !resume_path.empty();
  // Rank 0 creates the run directory and locks it before anything is written there (one run
  // per directory, train/run_lock.h); every rank learns whether it could, and a second trainer
  // on the same directory stops on every rank with rank 0's message, having written nothing.
  std::unique_ptr<RunDirLock> lock;
  std::string lock_error;
  if (grid.is_root()) {
    try {
      std::filesystem::create_directories(run_dir);
      lock = std::make_unique<RunDirLock>(run_dir);
    } catch (const UserError& e) {
      lock_error = e.what();
    } catch (const std::filesystem::filesystem_error& e) {
      lock_error = fmt::format("{}: cannot create the run directory: {}", run_dir,
                               e.code().message());
    }
  }
  grid.world->broadcast(lock_error, 0);
  if (!lock_error.empty()) throw UserError(lock_error);
  if (cfg.log.per_rank_files) std::filesystem::create_directories(run_dir);
  auto log = make_run_logger(cfg, grid, run_dir, /*append=*/resuming);
  // A watchdog's message goes to the log files too (stderr has it already, and rank 0's console
  // sink is stdout: it would show twice under mpirun).
  Watchdog::Registration watchdog_log;
  if (grid.watchdog) watchdog_log = grid.watchdog->log_to(file_log_writer(*log));
  log->info("switcht5 train: run dir {}, config {}", run_dir, cfg.source_path);
  log->info("resolved config:\n{}", to_yaml(cfg));

  const TrainConfig& tc = cfg.train;
  Trainer trainer(cfg, grid, TrainerUse::kTrain, options.make_backend_named);
  log->info("{} processes: data {} x model {}, experts over groups of {}{}; backend {}; {} "
            "parameters on this rank ({:.1f} MB fp32); micro-batch {} x ({} + {}) tokens, {} "
            "micro-batches per step; {:.3g} GFLOP of matmul per global step",
            grid.world_size, grid.data, grid.model, grid.expert,
            cfg.parallel.zero1 ? ", ZeRO-1 optimizer sharding" : "",
            trainer.backend().name() +
                (grid.world_size > 1 ? ", data plane " + cfg.parallel.data_plane : ""),
            trainer.model().params().total_numel(), trainer.model().params().total_numel() * 4e-6,
            tc.batch_size / (grid.data * tc.grad_accum_steps), cfg.data.inputs_length,
            cfg.data.targets_length, tc.grad_accum_steps, trainer.step_flops() * 1e-9);

  TrainResult result;
  if (resuming) {
    TrainingState state = trainer.checkpoint_state();
    const LoadResult lr = load_checkpoint(state, resume_path, /*training_state=*/true);
    if (lr.training_state) trainer.restore(state);
    result.start_step = lr.step;
    log->info("resumed from {} (step {}, saved with {}){}", resume_path, lr.step, lr.layout,
              lr.training_state ? ""
                                : "; it holds parameters only: fresh optimizer state and data "
                                  "position");
  } else if (options.resume == "auto") {
    log->info("--resume auto: no checkpoint in {}; starting from step 0", ckpt_dir);
  }

  // Written only now, so that a failed resume leaves the run directory as it was.
  if (grid.is_root()) {
    std::ofstream f(run_dir + "/config.yaml");
    SWT_USER_CHECK(f.good(), "{}/config.yaml: cannot write to the run directory", run_dir);
    f << to_yaml(cfg);
  }
  MetricsFile metrics(grid, run_dir, /*append=*/resuming);
  auto save = [&](int64_t step, const char* why) {
    const SaveResult s = save_checkpoint(trainer.checkpoint_state(step), ckpt_dir);
    log->info("checkpoint {} ({}): {:.1f} MB in {:.2f} s", s.path, why, s.bytes * 1e-6, s.seconds);
    result.checkpoints.push_back(s.path);
  };
  StopSignals signals;
  int64_t saved_step = -1;
  for (int64_t step = result.start_step + 1; step <= tc.steps; ++step) {
    StepMetrics m = trainer.train_step(step);
    result.final_loss = m.loss;
    result.last_step = step;
    if (m.skipped)
      log->warn("step {}: non-finite loss or gradient, update skipped on every rank; first "
                "non-finite: {}",
                step, m.nonfinite);
    const bool do_eval = tc.eval_every > 0 && (step % tc.eval_every == 0 || step == tc.steps);
    const bool do_log =
        step % cfg.log.every == 0 || step == 1 || step == tc.steps || do_eval || m.skipped;
    if (do_log) {
      if (do_eval && trainer.has_validation()) {
        m.has_val = true;
        m.val_loss = trainer.evaluate();
      }
      log_step(*log, m, trainer.step_flops());
      metrics.write(m);
      result.logged.push_back(std::move(m));
    }
    if (cfg.checkpoint.every > 0 && step % cfg.checkpoint.every == 0) {
      save(step, "every checkpoint.every steps");
      saved_step = step;
    }
    // A signal during the last step changes nothing: the end-of-training save follows.
    if (const int sig = step < tc.steps ? StopSignals::agreed(*grid.world) : 0) {
      log->warn("received {}: saving a checkpoint after step {} and stopping",
                sig == SIGTERM ? "SIGTERM" : sig == SIGUSR1 ? "SIGUSR1" : "a signal", step);
      if (saved_step != step) save(step, "stop signal");
      result.stop_signal = sig;
      log->info("stopped at step {} of {}; continue with --resume auto", step, tc.steps);
      spdlog::drop("switcht5");
      return result;
    }
  }
  if (result.last_step > 0 && saved_step != result.last_step)
    save(result.last_step, "end of training");
  if (result.last_step == 0)
    log->info("nothing to train: the checkpoint is at step {} of train.steps = {}",
              result.start_step, tc.steps);
  log->info("done: {} steps, final loss {:.4f}", tc.steps, result.final_loss);
  spdlog::drop("switcht5");
  return result;
}

TrainResult train(const RunConfig& cfg, const std::string& run_dir, const TrainOptions& options) {
  ProcessGrid grid = ProcessGrid::create(make_self_communicator(), cfg.parallel.data,
                                         cfg.parallel.model, cfg.parallel.expert);
  return train(cfg, grid, run_dir, options);
}

}  // namespace switcht5
