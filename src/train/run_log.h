// A training run's logs: the spdlog logger (console and train.log on rank 0, rank-<r>.log on
// every rank with log.per_rank_files), the line a logged step prints, and metrics.jsonl.
//
// Every file here is written a whole line at a time and checked: one write() per line, and a
// line the OS refuses (a full disk, an I/O error) is cut off again, so that the files hold only
// whole lines, and the failure stops the run with a UserError naming the file and the OS's
// reason ("run/metrics.jsonl: cannot write the metrics of step 812: No space left on device")
// instead of letting it go on with a truncated record. A metrics line throws where it is
// written; a log line cannot (spdlog calls sinks from any thread, destructors among them), so a
// log file records its first failure and stops writing, and check_log_health() throws it.
#pragma once
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
// resuming, the files are continued. UserError when a file cannot be opened.
std::shared_ptr<spdlog::logger> make_run_logger(const RunConfig& cfg, const ProcessGrid& grid,
                                                const std::string& run_dir, bool append);

// Writes a line at error level to `log`'s file sinks only (not the console), flushed; for
// messages already on stderr. Holds the sinks: usable from any thread while it lives.
std::function<void(const std::string&)> file_log_writer(const spdlog::logger& log);

// UserError "<file>: cannot write the log: <reason>" when a log file of `log` (made by
// make_run_logger) has failed to take a line; nothing otherwise. Local to the rank.
void check_log_health(const spdlog::logger& log);

// "step N | loss ... | GFLOP/s[ | val_loss ...]<suffix>" for a logged step (suffix: the
// progress, train/progress.h); then check_log_health(), so that a run whose log cannot be
// written stops at its next logged step.
void log_step(spdlog::logger& log, const StepMetrics& m, double step_flops,
              const std::string& suffix = "");

class LineFile;

// run_dir/metrics.jsonl, one metrics_json() line per logged step, written at once (one
// write()); written by rank 0 only (other ranks hold no file and write nothing).
class MetricsFile {
 public:
  // UserError when the file cannot be opened. Truncates unless `append`.
  MetricsFile(const ProcessGrid& grid, const std::string& run_dir, bool append);
  ~MetricsFile();
  // UserError naming the file and the OS's reason when the line cannot be written; the file
  // then ends with the previous line.
  void write(const StepMetrics& m);

 private:
  std::unique_ptr<LineFile> file_;
};

}  // namespace switcht5
