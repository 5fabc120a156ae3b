// Helper for test_abort.sh: the error path of switcht5's main() under MPI. Rank 1 (or the rank
// given as argv[1]) throws; the others block in a collective that can never complete. main
// catches, prints the error tagged with the rank and calls abort_all_ranks(3), which must end
// the whole job promptly.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "comm/mpi_communicator.h"
#include "core/check.h"

namespace {

int g_rank = 0;

void run(int failing_rank) {
  std::unique_ptr<switcht5::Communicator> world = switcht5::mpi_world();
  g_rank = world->rank();
  SWT_CHECK(world->rank() != failing_rank, "deliberate failure on rank {} of {}", world->rank(),
            world->size());
  std::vector<float> x(1000, 1.0f);
  world->all_reduce_sum(x.data(), static_cast<int64_t>(x.size()));  // never completes
  std::fprintf(stderr, "[rank %d] left a collective that a rank never joined\n", g_rank);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    run(argc > 1 ? std::atoi(argv[1]) : 1);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] abort_on_error: error: %s\n", g_rank, e.what());
    switcht5::abort_all_ranks(3);
  }
}
