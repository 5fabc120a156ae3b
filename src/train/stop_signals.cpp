#include "train/stop_signals.h"

#include <cstdint>

#include "comm/communicator.h"

namespace switcht5 {
namespace {

// The stop request of a SIGTERM / SIGUSR1 handler. A signal handler can only reach a global: this
// is the one global of the trainer, written by the handler and read between steps.
volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int signo) { g_stop_signal = signo; }

}  // namespace

StopSignals::StopSignals() {
  g_stop_signal = 0;
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, &old_term_);
  sigaction(SIGUSR1, &sa, &old_usr1_);
}

StopSignals::~StopSignals() {
  sigaction(SIGTERM, &old_term_, nullptr);
  sigaction(SIGUSR1, &old_usr1_, nullptr);
}

int StopSignals::agreed(Communicator& world) {
  int64_t s = g_stop_signal;
  world.all_reduce_max(&s, 1);
  return int(s);
}

}  // namespace switcht5
