// Test hook for the watchdog's coverage of operations that are not collectives of ours
// (comm/watchdog.h): SWITCHT5_STALL=WHERE:STEP:RANK:HOW makes world rank RANK stall at step STEP
//   WHERE  data        inside the wait for the data loader's training batch of that step
//          checkpoint  inside the save of that step's checkpoint (before anything is written)
//   HOW    sleep       sleep for ever (a loader or filesystem that never answers)
//          stop        raise SIGSTOP (a stopped process: its peers wait inside the collective
//                      HDF5 write; only they can notice)
// tests/mpi/test_watchdog.sh and test_stall.sh use it. Unset: no effect.
#pragma once
#include <cstdint>
#include <string>

namespace switcht5 {

struct StallHook {
  std::string where;  // "data" or "checkpoint"; empty: unset
  int64_t step = -1;
  int rank = -1;
  bool stop = false;  // HOW = stop (else sleep)

  // The environment's hook; UserError naming the variable when it is malformed.
  static StallHook from_env();
  // Stalls (never returns) when the hook names this place, step and rank.
  void at(const char* place, int64_t at_step, int world_rank) const;
};

}  // namespace switcht5
