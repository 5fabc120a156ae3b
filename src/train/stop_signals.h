// Stopping a run on SIGTERM / SIGUSR1 (what SLURM sends before a time limit; mpirun forwards
// SIGUSR1): the training loop asks between steps, and every rank agrees on it, saves a
// checkpoint and returns.
//
// The signals are never delivered to a thread that computes. While a StopSignals lives, the
// calling thread and every OpenMP worker (oneDNN runs on them) block SIGTERM and SIGUSR1: a
// signal then either waits, pending, until agreed() takes it with sigtimedwait between steps,
// or is handled on a thread that does not compute (MPI's progress threads, the data loader's
// prefetch thread), whose handler only records it. Why: on this project's AVX-512 machines a
// signal handled while oneDNN's AVX-512 kernels run corrupted the heap ("corrupted size vs.
// prev_size" inside dnnl_sgemm) in about 1 run in 10 under CPU load; with oneDNN held to AVX2,
// or with the reference backend, it never did (0 of 40 and 0 of 30 runs). Blocking avoids it
// whatever the cause (the kernel's or a hypervisor's AVX-512 signal-frame handling, or oneDNN's).
#pragma once
#include <csignal>

namespace switcht5 {

class Communicator;

// Installs the handlers and blocks the signals in the computing threads while it lives;
// restores the previous handlers and masks after (a signal still pending then is recorded by
// the handler, not lost). One at a time.
class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // The signal any rank received since construction (the largest signal number when several
  // did), or 0; the same on every rank. Collective over `world` (control plane).
  static int agreed(Communicator& world);

 private:
  struct sigaction old_term_ {}, old_usr1_ {};
};

}  // namespace switcht5
