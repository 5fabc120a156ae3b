// main() of the MPI test binaries: initialises MPI, runs every test on every rank, prints rank 0's
// full report and only the failures of the other ranks (tagged with the rank), and exits non-zero
// on every rank if any rank failed.
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>

#include "comm/mpi_communicator.h"
#include "mpi_test_env.h"

namespace switcht5::testing {
namespace {

Communicator* g_world = nullptr;

// Reports failed assertions and tests as "[rank r] ..." (ranks other than 0).
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_,
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.message());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed())
      std::fprintf(stderr, "[rank %d] [  FAILED  ] %s.%s\n", rank_, info.test_suite_name(),
                   info.name());
  }

 private:
  int rank_;
};

}  // namespace

Communicator& test_world() { return *g_world; }

}  // namespace switcht5::testing

int main(int argc, char** argv) {
  std::unique_ptr<switcht5::Communicator> world = switcht5::mpi_world();
  switcht5::testing::g_world = world.get();
  ::testing::InitGoogleTest(&argc, argv);
  if (world->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new switcht5::testing::RankFailurePrinter(world->rank()));
  }
  int64_t failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  world->all_reduce_sum(&failed, 1);
  if (world->rank() == 0)
    std::fprintf(stderr, "%s: %lld of %d ranks failed\n", failed ? "FAILED" : "passed",
                 static_cast<long long>(failed), world->size());
  switcht5::testing::g_world = nullptr;
  world.reset();
  return failed ? 1 : 0;
}
