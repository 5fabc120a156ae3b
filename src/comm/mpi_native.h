// The MPI communicator behind a Communicator, for libraries that take an MPI_Comm themselves
// (parallel HDF5's MPI-IO driver). Includes <mpi.h>: only infrastructure .cpp files (src/comm,
// src/checkpoint) include this header, never model code (STYLE habit 3).
#pragma once
#include <mpi.h>

#include "comm/communicator.h"

namespace switcht5 {

// The MPI_Comm of an MpiCommunicator; MPI_COMM_NULL for any other Communicator (e.g. the
// single-process self communicator, which needs no MPI at all).
MPI_Comm native_mpi_comm(const Communicator& comm);

}  // namespace switcht5
