#include "train/train_loop.h"

#include <sys/statvfs.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "checkpoint/checkpoint.h"
#include "comm/communicator.h"
#include "core/check.h"
#include "train/memory_plan.h"
#include "train/run_lock.h"
#include "train/run_log.h"
#include "train/stop_signals.h"
#include "train/progress.h"
#include "train/telemetry.h"
#include "train/tensorboard.h"
#include "train/trainer.h"

namespace switcht5 {

namespace {

// The first error (in world order) of the ranks' `local` errors ("" for none), on every rank.
// Collective over `world`.
std::string first_error(Communicator& world, const std::string& local) {
  int64_t key = local.empty() ? 0 : int64_t(world.size() - world.rank());
  world.all_reduce_max(&key, 1);
  if (key == 0) return "";
  std::string error = local;
  world.broadcast(error, int(world.size() - key));
  return error;
}

// Creates `dir` and proves it writable by creating and removing a probe file named for this
// rank: a location that cannot be written is found before the first step, not at the first save
// after hours of training. Returns the error, or "".
std::string probe_writable(const std::string& dir, const std::string& key, int rank) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return fmt::format("{} {}: cannot create the directory: {}", key, dir, ec.message());
  if (!std::filesystem::is_directory(dir, ec))
    return fmt::format("{} {}: expected a directory", key, dir);
  const std::string probe = fmt::format("{}/.switcht5-probe-{}", dir, rank);
  std::FILE* f = std::fopen(probe.c_str(), "w");
  if (f == nullptr)
    return fmt::format("{} {}: cannot write there: {}", key, dir, std::strerror(errno));
  const bool written = std::fputs("probe\n", f) >= 0;
  const bool closed = std::fclose(f) == 0;
  const int err = errno;
  std::filesystem::remove(probe, ec);
  if (!written || !closed)
    return fmt::format("{} {}: cannot write there: {}", key, dir, std::strerror(err));
  return "";
}

// Bytes free for an unprivileged writer in the filesystem holding `dir`, or -1.
int64_t free_bytes(const std::string& dir) {
  struct statvfs st {};
  if (::statvfs(dir.c_str(), &st) != 0) return -1;
  return int64_t(st.f_bavail) * int64_t(st.f_frsize);
}

// "812 kB", "1.4 MB", "12.8 GB" (powers of 10).
std::string human_bytes(int64_t bytes) {
  const double b = double(bytes);
  if (b < 1e6) return fmt::format("{:.0f} kB", b * 1e-3);
  if (b < 1e9) return fmt::format("{:.1f} MB", b * 1e-6);
  return fmt::format("{:.1f} GB", b * 1e-9);
}

// How long a checkpoint save or load of `bytes` may take before the watchdog ends the job:
// parallel.timeout_s plus the file at 50 MB/s, a slow shared filesystem.
double checkpoint_deadline_s(const RunConfig& cfg, int64_t bytes) {
  return cfg.parallel.timeout_s + double(bytes) / 50e6;
}

}  // namespace

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
  // A fresh start (no --resume) into a directory that holds checkpoints would overwrite its logs
  // and prune its checkpoints: refused the same way.
  std::unique_ptr<RunDirLock> lock;
  std::string startup_error;
  if (grid.is_root()) {
    try {
      std::filesystem::create_directories(run_dir);
      lock = std::make_unique<RunDirLock>(run_dir);
      const std::string earlier = options.resume.empty() ? resolve_resume("auto", ckpt_dir) : "";
      SWT_USER_CHECK(earlier.empty(),
                     "{}: the run directory holds checkpoints of an earlier run (the latest is "
                     "{}); pass --resume auto to continue it, or choose another --run-dir "
                     "(nothing was changed)",
                     run_dir, earlier);
    } catch (const UserError& e) {
      startup_error = e.what();
    } catch (const std::filesystem::filesystem_error& e) {
      startup_error = fmt::format("{}: cannot create the run directory: {}", run_dir,
                                  e.code().message());
    }
  }
  grid.world->broadcast(startup_error, 0);
  if (!startup_error.empty()) throw AgreedUserError(startup_error);

  // Preflight: every location this rank will write, proven writable now (rank 0 writes the run
  // directory's files; every rank the checkpoints, collectively; each its own log with
  // log.per_rank_files).
  std::string preflight;
  if (grid.is_root() || cfg.log.per_rank_files)
    preflight = probe_writable(run_dir, "--run-dir", grid.world_rank);
  if (preflight.empty())
    preflight = probe_writable(ckpt_dir, "checkpoint.dir", grid.world_rank);
  preflight = first_error(*grid.world, preflight);
  if (!preflight.empty()) throw AgreedUserError(preflight);
  const int64_t checkpoint_bytes = checkpoint_file_bytes(cfg);
  const int64_t checkpoint_free = grid.is_root() ? free_bytes(ckpt_dir) : -1;

  // The trainer (its memory preflight first), then the checkpoint to resume from, before any
  // log file is opened: a failed resume leaves the run directory as it was (no appended
  // train.log, no rewritten config.yaml; the error goes to stderr).
  const TrainConfig& tc = cfg.train;
  Trainer trainer(cfg, grid, TrainerUse::kTrain, options.make_backend_named);
  TrainResult result;
  LoadResult loaded;
  if (resuming) {
    TrainingState state = trainer.checkpoint_state();
    Watchdog::Watch watch(grid.watchdog.get(), CommCall::kCheckpointLoad, resume_path,
                          checkpoint_deadline_s(cfg, checkpoint_bytes));
    loaded = load_checkpoint(state, resume_path, /*training_state=*/true);
    if (loaded.training_state) trainer.restore(state);
    result.start_step = loaded.step;
  }

  if (cfg.log.per_rank_files) std::filesystem::create_directories(run_dir);
  auto log = make_run_logger(cfg, grid, run_dir, /*append=*/resuming);
  // A watchdog's message goes to the log files too (stderr has it already, and rank 0's console
  // sink is stdout: it would show twice under mpirun).
  Watchdog::Registration watchdog_log;
  if (grid.watchdog) watchdog_log = grid.watchdog->log_to(file_log_writer(*log));
  log->info("switcht5 train: run dir {}, config {}", run_dir, cfg.source_path);
  log->info("resolved config:\n{}", to_yaml(cfg));
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
  if (checkpoint_free >= 0 && checkpoint_free < checkpoint_bytes)
    log->warn("checkpoint.dir {} has {} free but one checkpoint of this model takes {}: saving "
              "will fail unless space is freed",
              ckpt_dir, human_bytes(checkpoint_free), human_bytes(checkpoint_bytes));
  if (resuming)
    log->info("resumed from {} (step {}, saved with {}){}", resume_path, loaded.step,
              loaded.layout,
              loaded.training_state ? ""
                                    : "; it holds parameters only: fresh optimizer state and "
                                      "data position");
  else if (options.resume == "auto")
    log->info("--resume auto: no checkpoint in {}; starting from step 0", ckpt_dir);

  if (grid.is_root()) {
    std::ofstream f(run_dir + "/config.yaml");
    SWT_USER_CHECK(f.good(), "{}/config.yaml: cannot write to the run directory", run_dir);
    f << to_yaml(cfg);
    f.flush();
    SWT_USER_CHECK(f.good(), "{}/config.yaml: cannot write the resolved config: {}", run_dir,
                   std::strerror(errno));
  }
  MetricsFile metrics(grid, run_dir, /*append=*/resuming);
  TensorBoardWriter tensorboard(grid, run_dir, /*first_step=*/result.start_step + 1);
  RoutingMonitor routing(cfg.log.collapse_share, cfg.log.collapse_logs, cfg.log.dead_expert_steps);
  const double peak = trainer.backend().peak_flops(tc.precision == "bf16" ? DType::kBF16
                                                                          : DType::kF32) *
                      grid.world_size;
  Progress progress(live_console(grid), result.start_step, tc.steps, trainer.step_flops(), peak);
  auto save = [&](int64_t step, const char* why) {
    progress.clear();
    SaveResult s;
    {
      Watchdog::Watch watch(grid.watchdog.get(), CommCall::kCheckpointSave,
                            fmt::format("{}/{}", ckpt_dir, checkpoint_file_name(step)),
                            checkpoint_deadline_s(cfg, checkpoint_bytes));
      trainer.stall_hook().at("checkpoint", step, grid.world_rank);
      s = save_checkpoint(trainer.checkpoint_state(step), ckpt_dir);
    }
    log->info("checkpoint {} ({}): {:.1f} MB in {:.2f} s", s.path, why, s.bytes * 1e-6, s.seconds);
    for (const std::string& note : s.notes) log->warn("{}", note);
    check_log_health(*log);
    result.checkpoints.push_back(s.path);
  };
  StopSignals signals(/*announce=*/grid.is_root());
  int64_t saved_step = -1;
  for (int64_t step = result.start_step + 1; step <= tc.steps; ++step) {
    const bool do_eval = tc.eval_every > 0 && (step % tc.eval_every == 0 || step == tc.steps);
    const bool planned_log = step % cfg.log.every == 0 || step == 1 || step == tc.steps || do_eval;
    // Per-expert gradient norms cost a read-back: logged steps only.
    StepMetrics m = trainer.train_step(step, /*expert_norms=*/planned_log);
    result.final_loss = m.loss;
    result.last_step = step;
    progress.update(m);
    if (m.skipped || planned_log) progress.clear();
    if (m.skipped)
      log->warn("step {}: non-finite loss or gradient, update skipped on every rank; first "
                "non-finite: {}",
                step, m.nonfinite);
    routing.add_step(m);
    if (planned_log || m.skipped) {
      for (const std::string& w : routing.at_log(m)) log->warn("{}", w);
      if (do_eval && trainer.has_validation()) {
        m.has_val = true;
        m.val_loss = trainer.evaluate();
      }
      log_step(*log, m, trainer.step_flops(), progress.suffix(step));
      metrics.write(m);
      tensorboard.write(m);
      result.logged.push_back(std::move(m));
    }
    if (cfg.checkpoint.every > 0 && step % cfg.checkpoint.every == 0) {
      save(step, "every checkpoint.every steps");
      saved_step = step;
    }
    // A signal during the last step changes nothing: the end-of-training save follows.
    if (const int sig = step < tc.steps ? StopSignals::agreed(*grid.world) : 0) {
      progress.clear();
      log->warn("received {}: saving a checkpoint after step {} and stopping",
                stop_signal_name(sig), step);
      if (saved_step != step) save(step, "stop signal");
      result.stop_signal = sig;
      log->info("stopped at step {} of {}; continue with --resume auto", step, tc.steps);
      check_log_health(*log);
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
  check_log_health(*log);
  spdlog::drop("switcht5");
  return result;
}

TrainResult train(const RunConfig& cfg, const std::string& run_dir, const TrainOptions& options) {
  ProcessGrid grid = ProcessGrid::create(make_self_communicator(), cfg.parallel.data,
                                         cfg.parallel.model, cfg.parallel.expert);
  return train(cfg, grid, run_dir, options);
}

}  // namespace switcht5
