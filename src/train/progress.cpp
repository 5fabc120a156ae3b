#include "train/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include <fmt/format.h>

namespace switcht5 {

bool live_console(const ProcessGrid& grid) {
  if (!grid.is_root() || grid.world_size > 1 || ::isatty(STDOUT_FILENO) != 1) return false;
  // Under mpirun (Open MPI; MPICH's hydra sets PMI_RANK) a rank's stdout is a pseudo-terminal
  // even when mpirun's own output goes to a file; SLURM's output is a file.
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_RANK", "SLURM_JOB_ID"})
    if (std::getenv(var) != nullptr) return false;
  const char* term = std::getenv("TERM");
  return term != nullptr && std::string_view(term) != "dumb";
}

std::string clock_duration(double seconds) {
  const int64_t s = std::isfinite(seconds) && seconds > 0 ? int64_t(std::llround(seconds)) : 0;
  if (s >= 3600) return fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
  return fmt::format("{}:{:02}", s / 60, s % 60);
}

Progress::Progress(bool live, int64_t start_step, int64_t total_steps, double step_flops,
                   double peak_flops)
    : live_(live), start_step_(start_step), total_steps_(total_steps), step_flops_(step_flops),
      peak_flops_(peak_flops), start_(Clock::now()) {}

double Progress::elapsed_s() const {
  return std::chrono::duration<double>(Clock::now() - start_).count();
}

double Progress::eta_s(int64_t step) const {
  if (steps_done_ == 0) return 0.0;
  // Mean step time, without the first step once there are others.
  const double mean =
      steps_done_ > 1
          ? std::chrono::duration<double>(Clock::now() - first_step_end_).count() /
                double(steps_done_ - 1)
          : elapsed_s();
  return mean * double(total_steps_ - step);
}

std::string Progress::suffix(int64_t step) const {
  std::string s = fmt::format(" | {}/{} | {} elapsed, ETA {}", step, total_steps_,
                              clock_duration(elapsed_s()), clock_duration(eta_s(step)));
  if (peak_flops_ > 0 && last_step_s_ > 0)
    s += fmt::format(" | MFU {:.0f}%", 100.0 * step_flops_ / last_step_s_ / peak_flops_);
  return s;
}

void Progress::update(const StepMetrics& m) {
  ++steps_done_;
  if (steps_done_ == 1) first_step_end_ = Clock::now();
  last_step_s_ = m.step_ms * 1e-3;
  if (!live_) return;
  const Clock::time_point now = Clock::now();
  if (drawn_ && now - last_draw_ < std::chrono::milliseconds(200) && m.step < total_steps_) return;
  last_draw_ = now;
  draw(m);
}

void Progress::draw(const StepMetrics& m) {
  constexpr int kWidth = 20;
  const double done = total_steps_ > 0 ? double(m.step) / double(total_steps_) : 1.0;
  const int filled = int(done * kWidth);
  std::string bar(size_t(filled), '#');
  bar.append(size_t(kWidth - filled), '.');
  std::string line = fmt::format("[{}] {:>{}}/{} {:.0f}% | loss {:.4f} | {:.0f}k tok/s | {} "
                                 "elapsed | ETA {}",
                                 bar, m.step, int(std::to_string(total_steps_).size()),
                                 total_steps_, 100 * done, m.loss, m.tokens_per_s * 1e-3,
                                 clock_duration(elapsed_s()), clock_duration(eta_s(m.step)));
  if (peak_flops_ > 0 && last_step_s_ > 0)
    line += fmt::format(" | MFU {:.0f}%", 100.0 * step_flops_ / last_step_s_ / peak_flops_);
  // Carriage return and spaces over a longer previous line: no escape sequences (NO_COLOR and
  // TERM=dumb consoles show none).
  const size_t pad = drawn_width_ > line.size() ? drawn_width_ - line.size() : 0;
  std::fprintf(stdout, "\r%s%*s", line.c_str(), int(pad), "");
  std::fflush(stdout);
  drawn_width_ = line.size() + pad;
  drawn_ = true;
}

void Progress::clear() {
  if (!live_ || !drawn_) return;
  std::fprintf(stdout, "\r%*s\r", int(drawn_width_), "");
  std::fflush(stdout);
  drawn_ = false;
  drawn_width_ = 0;
}

}  // namespace switcht5
