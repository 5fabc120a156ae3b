#include "train/run_log.h"

#include <cstdlib>
#include <string_view>
#include <vector>

#include <unistd.h>

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include "core/check.h"

namespace switcht5 {
namespace {

// Colour the console's level names only where a person reads them: one process whose stdout is
// a terminal (TERM not "dumb", NO_COLOR unset: no-color.org). Under mpirun a rank's stdout is a
// pseudo-terminal even when mpirun's own output goes to a pipe or a file, so more than one
// process never colours: logs, pipes and SLURM output files stay plain text.
bool console_colours(const ProcessGrid& grid) {
  if (grid.world_size > 1 || ::isatty(STDOUT_FILENO) != 1) return false;
  // mpirun -np 1 (Open MPI; MPICH's hydra sets PMI_RANK): still a pseudo-terminal. Not
  // PMIX_RANK: Open MPI sets it in a process started without mpirun too.
  for (const char* launcher_var : {"OMPI_COMM_WORLD_SIZE", "PMI_RANK"})
    if (std::getenv(launcher_var) != nullptr) return false;
  if (std::getenv("NO_COLOR") != nullptr) return false;
  const char* term = std::getenv("TERM");
  return term != nullptr && std::string_view(term) != "dumb";
}

}  // namespace

std::shared_ptr<spdlog::logger> make_run_logger(const RunConfig& cfg, const ProcessGrid& grid,
                                                const std::string& run_dir, bool append) {
  std::vector<spdlog::sink_ptr> sinks;
  if (grid.is_root()) {
    sinks.push_back(std::make_shared<spdlog::sinks::stdout_color_sink_mt>(
        console_colours(grid) ? spdlog::color_mode::always : spdlog::color_mode::never));
    sinks.push_back(
        std::make_shared<spdlog::sinks::basic_file_sink_mt>(run_dir + "/train.log", !append));
  }
  if (cfg.log.per_rank_files)
    sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_mt>(
        fmt::format("{}/rank-{}.log", run_dir, grid.world_rank), !append));
  auto logger = std::make_shared<spdlog::logger>("switcht5", sinks.begin(), sinks.end());
  logger->set_level(spdlog::level::from_str(cfg.log.level));
  logger->set_pattern(grid.world_size > 1
                          ? fmt::format("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] [rank {}] %v",
                                        grid.world_rank)
                          : std::string("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v"));
  logger->flush_on(spdlog::level::info);
  return logger;
}

std::function<void(const std::string&)> file_log_writer(const spdlog::logger& log) {
  std::vector<spdlog::sink_ptr> files;
  for (const spdlog::sink_ptr& s : log.sinks())
    if (std::dynamic_pointer_cast<spdlog::sinks::basic_file_sink_mt>(s)) files.push_back(s);
  // Sharing the sinks shares their format (spdlog formats per sink): the same "[rank r]" lines.
  auto files_only = std::make_shared<spdlog::logger>(log.name(), files.begin(), files.end());
  return [files_only](const std::string& line) {
    files_only->error("{}", line);
    files_only->flush();
  };
}

void log_step(spdlog::logger& log, const StepMetrics& m, double step_flops,
              const std::string& suffix) {
  log.info("step {:>6} | loss {:.4f} | aux {:.4f} | z {:.4f} | lr {:.3e} | gnorm {:.3f} | "
           "drop {:.3f} | {:.1f} ms | {:.0f} tok/s | {:.1f} GFLOP/s{}{}",
           m.step, m.loss, m.aux_loss, m.z_loss, m.lr, m.grad_norm, m.dropped_fraction,
           m.step_ms, m.tokens_per_s, step_flops / m.step_ms * 1e-6,
           m.has_val ? fmt::format(" | val_loss {:.4f}", m.val_loss) : "", suffix);
}

MetricsFile::MetricsFile(const ProcessGrid& grid, const std::string& run_dir, bool append) {
  if (!grid.is_root()) return;
  out_.open(run_dir + "/metrics.jsonl", append ? std::ios::app : std::ios::trunc);
  SWT_USER_CHECK(out_.good(), "{}/metrics.jsonl: cannot write to the run directory", run_dir);
}

void MetricsFile::write(const StepMetrics& m) {
  if (!out_.is_open()) return;
  out_ << metrics_json(m) << "\n";
  out_.flush();
}

}  // namespace switcht5
