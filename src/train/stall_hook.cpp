#include "train/stall_hook.h"

#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>

#include "core/check.h"

namespace switcht5 {

StallHook StallHook::from_env() {
  StallHook h;
  const char* env = std::getenv("SWITCHT5_STALL");
  if (env == nullptr || *env == '\0') return h;
  char where[16] = {}, how[8] = {};
  long long step = -1;
  int rank = -1;
  SWT_USER_CHECK(std::sscanf(env, "%15[a-z]:%lld:%d:%7[a-z]", where, &step, &rank, how) == 4 &&
                     (std::string(where) == "data" || std::string(where) == "checkpoint") &&
                     (std::string(how) == "sleep" || std::string(how) == "stop"),
                 "SWITCHT5_STALL=\"{}\": expected data|checkpoint:STEP:RANK:sleep|stop", env);
  h.where = where;
  h.step = step;
  h.rank = rank;
  h.stop = std::string(how) == "stop";
  return h;
}

void StallHook::at(const char* place, int64_t at_step, int world_rank) const {
  if (where != place || step != at_step || rank != world_rank) return;
  std::fprintf(stderr, "[rank %d] switcht5: SWITCHT5_STALL: stalling in %s at step %lld (%s)\n",
               world_rank, place, static_cast<long long>(at_step), stop ? "SIGSTOP" : "sleep");
  std::fflush(stderr);
  if (stop) std::raise(SIGSTOP);
  for (;;) ::pause();
}

}  // namespace switcht5
