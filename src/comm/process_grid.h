// ProcessGrid: the ranks of a job laid out for data, model and expert parallelism, with one
// communicator per kind of group. Built once in main and passed to what needs it (process groups
// are explicit, never globals).
//
//   world rank w = data_rank * model + model_rank        (model-parallel ranks are neighbours)
//
// Expert parallelism shards the experts over groups of `expert` consecutive data ranks: data rank
// d is member (d % expert) of expert group (d / expert) and holds experts
// [(d % expert) * E / expert, (d % expert + 1) * E / expert). Ranks holding the same experts
// (same d % expert, same model rank) form an expert-replica group of data / expert ranks; expert
// gradients are summed over it, dense gradients over the data group.
//
// Example, 8 ranks, data 4 x model 2, expert 2 (w = world rank):
//   data_group      {0,2,4,6} {1,3,5,7}             same model rank, ordered by data rank
//   model_group     {0,1} {2,3} {4,5} {6,7}         same data rank
//   expert_group    {0,2} {4,6} {1,3} {5,7}         d / expert and model rank equal, by d % expert
//   replica_group   {0,4} {2,6} {1,5} {3,7}         d % expert and model rank equal, by d / expert
//
// The grid owns a Watchdog (comm/watchdog.h) and attaches it to every group, labelled "world",
// "data", "model", "expert" and "expert-replica": a collective that does not complete within
// collective_timeout_s (parallel.timeout_s) ends the job. The trainer also watches its
// checkpoint I/O and its waits for the data loader with it, one process included.
#pragma once
#include <memory>
#include <string>

#include "comm/communicator.h"
#include "comm/watchdog.h"

namespace switcht5 {

struct ProcessGrid {
  int world_rank = 0, world_size = 1;
  int data = 1, model = 1, expert = 1;                 // degrees
  int data_rank = 0, model_rank = 0, expert_rank = 0;  // expert_rank = data_rank % expert
  // This rank among the world's ranks on its node (Communicator::split_by_node), and how many
  // there are: a GPU backend picks its device by local_rank (BackendOptions).
  int local_rank = 0, local_size = 1;
  // Null for one process. Declared before the communicators, which report to it, so that it is
  // destroyed after them.
  std::unique_ptr<Watchdog> watchdog;
  std::unique_ptr<Communicator> world;
  std::unique_ptr<Communicator> data_group;    // size data, rank data_rank
  std::unique_ptr<Communicator> model_group;   // size model, rank model_rank
  std::unique_ptr<Communicator> expert_group;  // size expert, rank expert_rank
  std::unique_ptr<Communicator>
      expert_replica_group;  // size data / expert, rank data_rank / expert

  ProcessGrid() = default;
  ProcessGrid(ProcessGrid&&) = default;
  ProcessGrid& operator=(ProcessGrid&&) = default;
  ProcessGrid(const ProcessGrid&) = delete;
  ProcessGrid& operator=(const ProcessGrid&) = delete;

  // Validates the degrees (each >= 1, data * model == world size, expert divides data; a
  // UserError naming the numbers otherwise, thrown on every rank before any communication),
  // splits the groups and finds the node-local rank. Collective over `world`. A watchdog,
  // made when world has several ranks, ends the job with abort_all_ranks.
  static ProcessGrid create(std::unique_ptr<Communicator> world, int data, int model, int expert,
                            double collective_timeout_s = 600.0);

  bool is_root() const { return world_rank == 0; }
  // "world 8 = data 4 x model 2, expert 2; this rank: data 1, model 0, expert 1", for the log.
  std::string describe() const;
};

}  // namespace switcht5
