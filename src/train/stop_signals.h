// Stopping a run on a signal: SIGTERM / SIGUSR1 (what SLURM sends before a time limit; mpirun
// forwards SIGUSR1) and SIGINT (Ctrl-C): the training loop asks between steps, and every rank
// agrees on it, saves a checkpoint and returns. A second SIGINT ends the process at once,
// without saving (exit 130; the checkpoints already written are complete, see the directory
// protocol in checkpoint/checkpoint.h): the way out of a save or a step that takes too long.
//
// The signals are never delivered to a thread that computes. While a StopSignals lives, the
// calling thread and every OpenMP worker (oneDNN runs on them) block the stop signals, and a
// thread of its own takes them with sigtimedwait; a signal handled on a thread that does not
// compute (MPI's progress threads, the data loader's prefetch thread, the watchdog's) only
// records it the same way. Why: on this project's AVX-512 machines a signal handled while
// oneDNN's AVX-512 kernels run corrupted the heap ("corrupted size vs. prev_size" inside
// dnnl_sgemm) in about 1 run in 10 under CPU load; with oneDNN held to AVX2, or with the
// reference backend, it never did (0 of 40 and 0 of 30 runs). Blocking avoids it whatever the
// cause (the kernel's or a hypervisor's AVX-512 signal-frame handling, or oneDNN's).
#pragma once
#include <atomic>
#include <csignal>
#include <thread>

namespace switcht5 {

class Communicator;

// Installs the handlers, blocks the signals in the computing threads and starts the signal
// thread while it lives; restores the previous handlers and masks after (a signal still pending
// then is recorded by the handler, not lost). One at a time. `announce`: the signal thread
// writes one line to stderr when a stop signal arrives (rank 0: the step may take a while).
class StopSignals {
 public:
  explicit StopSignals(bool announce = false);
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // The signal any rank received since construction (the largest signal number when several
  // did), or 0; the same on every rank. Collective over `world` (control plane).
  static int agreed(Communicator& world);

 private:
  struct sigaction old_term_ {}, old_usr1_ {}, old_int_ {};
  std::atomic<bool> stop_thread_{false};
  std::thread thread_;
};

// "SIGTERM", "SIGUSR1", "SIGINT", else "signal N".
const char* stop_signal_name(int signo);

}  // namespace switcht5
