#include "train/run_log.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string_view>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/sinks/base_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include "core/check.h"

namespace switcht5 {

// A file written a whole line at a time (see run_log.h): one write() per line (more only for a
// short write), and a line that fails is cut off again, back to the length before it.
class LineFile {
 public:
  // UserError when it cannot be opened.
  LineFile(std::string path, bool append) : path_(std::move(path)) {
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC),
                 0644);
    SWT_USER_CHECK(fd_ >= 0, "{}: cannot open for writing: {}", path_, std::strerror(errno));
    struct stat st {};
    size_ = ::fstat(fd_, &st) == 0 ? st.st_size : 0;
    if (!append) return;
    // Appending after a run that stopped mid-line (a crash, or a disk full before this check
    // existed): start on a line of its own.
    char last = '\n';
    if (size_ > 0 && ::pread(fd_, &last, 1, size_ - 1) == 1 && last != '\n') (void)append_line("");
  }
  ~LineFile() { ::close(fd_); }
  LineFile(const LineFile&) = delete;
  LineFile& operator=(const LineFile&) = delete;

  const std::string& path() const { return path_; }

  // Appends `text` + '\n'. "" on success, else the OS's reason, the file cut back to its length
  // before (where it can be: not /dev/full, say).
  std::string append_line(std::string_view text) {
    std::string line(text);
    line += '\n';
    size_t done = 0;
    while (done < line.size()) {
      const ssize_t n = ::write(fd_, line.data() + done, line.size() - done);
      if (n > 0) {
        done += size_t(n);
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else {
        const std::string reason = n < 0 ? std::strerror(errno) : "wrote nothing";
        if (done > 0) (void)::ftruncate(fd_, size_);
        return reason;
      }
    }
    size_ += off_t(done);
    return "";
  }

 private:
  std::string path_;
  int fd_ = -1;
  off_t size_ = 0;  // the file's length after the last whole line
};

namespace {

// A log file of the run: a LineFile behind spdlog's sink interface. Its first failure is kept
// (check_log_health reports it) and the lines after it are dropped: a line that fails to
// write says so once, and the ones after it would only fail or leave a gap.
class CheckedFileSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  CheckedFileSink(const std::string& path, bool append) : file_(path, append) {}
  // "" or "<file>: cannot write the log: <reason>".
  std::string failure() {
    std::lock_guard<std::mutex> lock(mutex_);
    return failure_;
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    if (!failure_.empty()) return;
    spdlog::memory_buf_t formatted;
    formatter_->format(msg, formatted);
    std::string_view text(formatted.data(), formatted.size());
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.remove_suffix(1);
    const std::string reason = file_.append_line(text);
    if (!reason.empty())
      failure_ = fmt::format("{}: cannot write the log: {}", file_.path(), reason);
  }
  void flush_() override {}  // every line is written at once

 private:
  LineFile file_;
  std::string failure_;
};

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
    sinks.push_back(std::make_shared<CheckedFileSink>(run_dir + "/train.log", append));
  }
  if (cfg.log.per_rank_files)
    sinks.push_back(std::make_shared<CheckedFileSink>(
        fmt::format("{}/rank-{}.log", run_dir, grid.world_rank), append));
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
    if (std::dynamic_pointer_cast<CheckedFileSink>(s)) files.push_back(s);
  // Sharing the sinks shares their format (spdlog formats per sink): the same "[rank r]" lines.
  auto files_only = std::make_shared<spdlog::logger>(log.name(), files.begin(), files.end());
  return [files_only](const std::string& line) {
    files_only->error("{}", line);
    files_only->flush();
  };
}

void check_log_health(const spdlog::logger& log) {
  for (const spdlog::sink_ptr& s : log.sinks())
    if (auto file = std::dynamic_pointer_cast<CheckedFileSink>(s)) {
      const std::string failure = file->failure();
      if (!failure.empty()) throw UserError(failure);
    }
}

void log_step(spdlog::logger& log, const StepMetrics& m, double step_flops,
              const std::string& suffix) {
  log.info("step {:>6} | loss {:.4f} | aux {:.4f} | z {:.4f} | lr {:.3e} | gnorm {:.3f} | "
           "drop {:.3f} | {:.1f} ms | {:.0f} tok/s | {:.1f} GFLOP/s{}{}",
           m.step, m.loss, m.aux_loss, m.z_loss, m.lr, m.grad_norm, m.dropped_fraction,
           m.step_ms, m.tokens_per_s, step_flops / m.step_ms * 1e-6,
           m.has_val ? fmt::format(" | val_loss {:.4f}", m.val_loss) : "", suffix);
  check_log_health(log);
}

MetricsFile::MetricsFile(const ProcessGrid& grid, const std::string& run_dir, bool append) {
  if (grid.is_root()) file_ = std::make_unique<LineFile>(run_dir + "/metrics.jsonl", append);
}

MetricsFile::~MetricsFile() = default;

void MetricsFile::write(const StepMetrics& m) {
  if (!file_) return;
  const std::string reason = file_->append_line(metrics_json(m));
  SWT_USER_CHECK(reason.empty(), "{}: cannot write the metrics of step {}: {}", file_->path(),
                 m.step, reason);
}

}  // namespace switcht5
