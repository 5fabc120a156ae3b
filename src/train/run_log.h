// A training run's logs: the spdlog logger (console and train.log on rank 0, rank-<r>.log on
// every rank with log.per_rank_files), the line a logged step prints, and metrics.jsonl.
#pragma once
#include <fstream>
#include <functional>
#include <memory>
#include <string>

#include <spdlog/spdlog.h>

#include "comm/process_grid.h"
#include "config/config.h"
#include "train/metrics.h"

namespace switcht5 {

// Rank 0 logs to the console and run_dir/train.log; with cfg.log.per_rank_files every rank
// also logs to run_dir/rank-<r>.log. Lines carry "[rank r]" when the job has several ranks.
// The console colours level names only where a person reads it (see run_log.cpp). `append`:
// resuming, the files are continued.
std::shared_ptr<spdlog::logger> make_run_logger(const RunConfig& cfg, const ProcessGrid& grid,
                                                const std::string& run_dir, bool append);

// Writes a line at error level to `log`'s file sinks only (not the console), flushed; for
// messages already on stderr. Holds the sinks: usable from any thread while it lives.
std::function<void(const std::string&)> file_log_writer(const spdlog::logger& log);

// "step N | loss ... | GFLOP/s[ | val_loss ...]<suffix>" for a logged step (suffix: the
// progress, train/progress.h).
void log_step(spdlog::logger& log, const StepMetrics& m, double step_flops,
              const std::string& suffix = "");

// run_dir/metrics.jsonl, one metrics_json() line per logged step, flushed at once; written by
// rank 0 only (other ranks hold a closed file and write nothing).
class MetricsFile {
 public:
  // UserError when the file cannot be written. Truncates unless `append`.
  MetricsFile(const ProcessGrid& grid, const std::string& run_dir, bool append);
  void write(const StepMetrics& m);

 private:
  std::ofstream out_;
};

}  // namespace switcht5
