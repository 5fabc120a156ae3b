#include "train/stop_signals.h"

#include <omp.h>
#include <pthread.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <ctime>

#include "comm/communicator.h"

namespace switcht5 {
namespace {

// The stop request, written by the handler or the signal thread and read between steps. A
// signal handler can only reach a global: these are the trainer's globals.
volatile std::sig_atomic_t g_stop_signal = 0;
volatile std::sig_atomic_t g_interrupts = 0;  // SIGINTs so far
volatile std::sig_atomic_t g_announce = 0;    // StopSignals(announce = true)

// write(2), the one output a signal handler may use.
void say(const char* text, size_t n) { (void)!::write(STDERR_FILENO, text, n); }
#define SWT_SAY(literal) say(literal, sizeof(literal) - 1)

// Async-signal-safe: called from the handler as well as from the signal thread.
void record(int signo) {
  const int interrupts = g_interrupts;
  if (signo == SIGINT) g_interrupts = interrupts + 1;
  if (signo == SIGINT && interrupts > 0) {
    SWT_SAY("switcht5: second SIGINT: exiting now without saving (exit code 130); the "
            "checkpoints already written are kept\n");
    ::_exit(128 + SIGINT);
  }
  // The first stop signal, announced at once (the step may take a while): the main loop logs
  // it again when it acts on it.
  if (g_announce && g_stop_signal == 0) {
    if (signo == SIGINT)
      SWT_SAY("switcht5: received SIGINT: the run stops after the current step and saves a "
              "checkpoint (press Ctrl-C again to exit at once without saving)\n");
    else if (signo == SIGTERM)
      SWT_SAY("switcht5: received SIGTERM: the run stops after the current step and saves a "
              "checkpoint\n");
    else
      SWT_SAY("switcht5: received SIGUSR1: the run stops after the current step and saves a "
              "checkpoint\n");
  }
  if (signo > g_stop_signal) g_stop_signal = signo;
}

extern "C" void on_stop_signal(int signo) { record(signo); }

sigset_t stop_set() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGUSR1);
  sigaddset(&set, SIGINT);
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

const char* stop_signal_name(int signo) {
  switch (signo) {
    case SIGTERM: return "SIGTERM";
    case SIGUSR1: return "SIGUSR1";
    case SIGINT: return "SIGINT";
  }
  return "a signal";
}

StopSignals::StopSignals(bool announce) {
  g_stop_signal = 0;
  g_interrupts = 0;
  g_announce = announce ? 1 : 0;
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, &old_term_);
  sigaction(SIGUSR1, &sa, &old_usr1_);
  sigaction(SIGINT, &sa, &old_int_);
  mask_computing_threads(SIG_BLOCK);
  // Created after the mask: the thread inherits it, so sigtimedwait takes the signals that no
  // unmasked thread's handler took. It wakes every 50 ms to see whether it should end.
  thread_ = std::thread([this] {
    const sigset_t set = stop_set();
    const timespec period{0, 50'000'000};
    while (!stop_thread_.load(std::memory_order_relaxed)) {
      const int sig = sigtimedwait(&set, nullptr, &period);
      if (sig > 0) record(sig);
    }
  });
}

StopSignals::~StopSignals() {
  stop_thread_.store(true, std::memory_order_relaxed);
  thread_.join();
  // Unblock while our handler is still installed: a signal pending now is recorded, not lost
  // to the default action.
  mask_computing_threads(SIG_UNBLOCK);
  sigaction(SIGTERM, &old_term_, nullptr);
  sigaction(SIGUSR1, &old_usr1_, nullptr);
  sigaction(SIGINT, &old_int_, nullptr);
}

int StopSignals::agreed(Communicator& world) {
  int64_t s = g_stop_signal;
  world.all_reduce_max(&s, 1);
  return int(s);
}

}  // namespace switcht5
