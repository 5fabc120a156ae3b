#include "train/stop_signals.h"

#include <omp.h>
#include <pthread.h>

#include <cstdint>
#include <ctime>

#include "comm/communicator.h"

namespace switcht5 {
namespace {

// The stop request of a SIGTERM / SIGUSR1 handler. A signal handler can only reach a global: this
// is the one global of the trainer, written by the handler and read between steps.
volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int signo) { g_stop_signal = signo; }

sigset_t stop_set() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR1);
  return set;
}

// Applies `how` (SIG_BLOCK / SIG_UNBLOCK) for the stop signals to this thread and to every
// thread of the OpenMP pool (the same threads serve later parallel regions, oneDNN's included).
void mask_computing_threads(int how) {
  const sigset_t set = stop_set();
#pragma omp parallel num_threads(omp_get_max_threads())
  pthread_sigmask(how, &set, nullptr);
  pthread_sigmask(how, &set, nullptr);
}

}  // namespace

StopSignals::StopSignals() {
  g_stop_signal = 0;
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, &old_term_);
  sigaction(SIGUSR1, &sa, &old_usr1_);
  mask_computing_threads(SIG_BLOCK);
}

StopSignals::~StopSignals() {
  // Unblock while our handler is still installed: a signal pending now is recorded, not lost
  // to the default action.
  mask_computing_threads(SIG_UNBLOCK);
  sigaction(SIGTERM, &old_term_, nullptr);
  sigaction(SIGUSR1, &old_usr1_, nullptr);
}

int StopSignals::agreed(Communicator& world) {
  // A signal blocked everywhere waits, pending: take it now (zero timeout: never waits).
  const sigset_t set = stop_set();
  const timespec zero{0, 0};
  for (int sig; (sig = sigtimedwait(&set, nullptr, &zero)) > 0;)
    if (sig > g_stop_signal) g_stop_signal = sig;
  int64_t s = g_stop_signal;
  world.all_reduce_max(&s, 1);
  return int(s);
}

}  // namespace switcht5
