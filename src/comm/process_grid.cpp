#include "comm/process_grid.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "comm/mpi_communicator.h"
#include "core/check.h"

namespace switcht5 {

ProcessGrid ProcessGrid::create(std::unique_ptr<Communicator> world, int data, int model,
                                int expert, double collective_timeout_s) {
  SWT_CHECK(world != nullptr, "ProcessGrid::create needs a world communicator");
  SWT_USER_CHECK(
      data >= 1 && model >= 1 && expert >= 1,
      "parallel.data, parallel.model and parallel.expert must be >= 1, got {}, {} and {}", data,
      model, expert);
  const int world_size = world->size();
  const int64_t product = int64_t{data} * model;
  SWT_USER_CHECK(product == world_size,
                 "parallel.data x parallel.model = {} x {} = {}, but mpirun started {} process{} "
                 "(launch with scripts/mpirun.sh -np {} ...)",
                 data, model, product, world_size, world_size == 1 ? "" : "es", product);
  SWT_USER_CHECK(data % expert == 0,
                 "parallel.expert = {} must divide parallel.data = {}: experts are sharded over "
                 "groups of parallel.expert consecutive data-parallel ranks",
                 expert, data);

  ProcessGrid g;
  // One process has a watchdog too: a checkpoint write to a stalled filesystem or a data loader
  // that never delivers hangs it as surely as a peer would. It ends one process with _Exit: the
  // main thread is stuck inside that operation (HDF5, a read), and exit()'s handlers would run
  // beside it (HDF5's own atexit handler included).
  g.watchdog = std::make_unique<Watchdog>(collective_timeout_s, world->rank(),
                                          [world_size](int code) {
                                            if (world_size > 1) abort_all_ranks(code);
                                            std::fflush(stdout);
                                            std::fflush(stderr);
                                            std::_Exit(code);
                                          });
  world->attach_watchdog(*g.watchdog, "world");
  g.world_rank = world->rank();
  g.world_size = world_size;
  g.data = data;
  g.model = model;
  g.expert = expert;
  g.data_rank = g.world_rank / model;
  g.model_rank = g.world_rank % model;
  g.expert_rank = g.data_rank % expert;
  const int expert_group_index = g.data_rank / expert;
  // Every rank makes the same four splits in the same order (split is collective).
  g.data_group = world->split(g.model_rank, g.data_rank);
  g.model_group = world->split(g.data_rank, g.model_rank);
  g.expert_group = world->split(expert_group_index * model + g.model_rank, g.expert_rank);
  g.expert_replica_group = world->split(g.expert_rank * model + g.model_rank, expert_group_index);
  g.data_group->attach_watchdog(*g.watchdog, "data");
  g.model_group->attach_watchdog(*g.watchdog, "model");
  g.expert_group->attach_watchdog(*g.watchdog, "expert");
  g.expert_replica_group->attach_watchdog(*g.watchdog, "expert-replica");
  const std::unique_ptr<Communicator> node = world->split_by_node();
  g.local_rank = node->rank();
  g.local_size = node->size();
  g.world = std::move(world);
  return g;
}

std::string ProcessGrid::describe() const {
  return fmt::format(
      "world {} = data {} x model {}, expert {}; this rank: data {}, model {}, expert {}",
      world_size, data, model, expert, data_rank, model_rank, expert_rank);
}

}  // namespace switcht5
