// Training progress on rank 0's console: where the run is and when it will end.
//   live (a person at a terminal: one process, stdout a terminal, not under a launcher or SLURM,
//   TERM not "dumb"): one line redrawn in place at most 5 times a second,
//     [#######.............]  312/1000 31% | loss 2.3104 | 104k tok/s | 0:04 elapsed | ETA 0:09
//   cleared before every log line and drawn again after (carriage returns and spaces only: no
//   escape sequences);
//   otherwise (pipes, files, mpirun, SLURM): nothing extra; the periodic log lines carry the
//   same facts through suffix() ("| 312/1000 | 0:04 elapsed, ETA 0:09 | MFU 41%").
// ETA = remaining steps x the mean step time since the first step of this process (the first
// step, with its one-time allocations and plan choices, is left out once there are others).
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

#include "comm/process_grid.h"
#include "train/metrics.h"

namespace switcht5 {

// Whether rank 0's stdout is read live by a person (the conditions above).
bool live_console(const ProcessGrid& grid);

// "0:04", "12:09", "3:02:17" (hours when needed).
std::string clock_duration(double seconds);

class Progress {
 public:
  // Steps start_step + 1 .. total_steps will run; peak_flops (> 0 when known) of the whole job,
  // for MFU; step_flops: matmul FLOPs of one optimizer step (Trainer::step_flops).
  Progress(bool live, int64_t start_step, int64_t total_steps, double step_flops,
           double peak_flops);
  // After every step.
  void update(const StepMetrics& m);
  // Before a log line: erases the live line (nothing when not live).
  void clear();
  // The facts a log line adds: " | 312/1000 | 0:04 elapsed, ETA 0:09[ | MFU 41%]".
  std::string suffix(int64_t step) const;

 private:
  using Clock = std::chrono::steady_clock;
  double elapsed_s() const;
  double eta_s(int64_t step) const;
  void draw(const StepMetrics& m);

  bool live_;
  int64_t start_step_, total_steps_;
  double step_flops_, peak_flops_;
  Clock::time_point start_, first_step_end_{}, last_draw_{};
  int64_t steps_done_ = 0;
  double last_step_s_ = 0.0;
  bool drawn_ = false;
  size_t drawn_width_ = 0;  // characters of the line on screen
};

}  // namespace switcht5
