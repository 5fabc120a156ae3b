// Stopping a run on SIGTERM / SIGUSR1 (what SLURM sends before a time limit; mpirun forwards
// SIGUSR1): the handler only records the signal; the training loop asks between steps, and
// every rank agrees on it, saves a checkpoint and returns.
#pragma once
#include <csignal>

namespace switcht5 {

class Communicator;

// Installs the handlers while it lives and restores the previous ones after. One at a time.
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
