// Shared by the GoogleTest binaries that run under mpirun (tests/mpi/test_*.cpp): the world
// communicator that mpi_test_main.cpp sets up. Every rank runs every test; tests must make the
// same collective calls on every rank whatever their checks find, so they use EXPECT_* (not
// ASSERT_*) before any later collective, and skip on conditions all ranks share.
#pragma once
#include "comm/communicator.h"

namespace switcht5::testing {

// The job's world communicator (mpi_world()), valid while the tests run.
Communicator& test_world();

}  // namespace switcht5::testing
