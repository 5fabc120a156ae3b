// What one rank of a training run holds in backend memory, for `switcht5 plan`: counted, not
// estimated. plan_memory builds the run's real step state (build_step_state, train/trainer.h:
// the model, gradient reducer, optimizer and statistics array the Trainer builds) on a
// SizingBackend (backend/sizing_backend.h), which allocates nothing and counts every request,
// so the numbers are what training allocates and cannot drift from the allocation code; the
// parts (parameters, activations, ...) come from the objects' own byte counts and must add up
// to the counted total (tests/test_plan.cpp holds both to a real Trainer's allocations).
//
// Rank 0 of the layout cfg.parallel is sized (size-only stand-ins for its communicators: rank
// 0, the group's size). Every rank's share has the same size except under ZeRO-1, whose shards
// are balanced to within one parameter.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"

namespace switcht5 {

struct MemoryPlan {
  std::string backend;    // train.backend
  std::string precision;  // train.precision
  int micro_batch = 0;    // sequences per forward call
  // Bytes as requested by the allocating code (a DeviceArray's bytes()):
  int64_t master_params = 0;        // fp32 parameters
  int64_t compute_copy = 0;         // their bf16 copy (train.precision bf16), else 0
  int64_t gradients = 0;            // fp32
  int64_t optimizer_state = 0;      // what the optimizer allocates (ZeRO-1 shard when on)
  int64_t optimizer_unsharded = 0;  // the same without ZeRO-1 (= optimizer_state without it)
  int64_t kept_activations = 0;     // SwitchT5Model::kept_activation_bytes()
  int64_t activation_workspace = 0; // activation_bytes() - kept: scratch and gradient buffers
  int64_t inputs = 0;               // the batch on the device (the model's and the step's micro-
                                    // batches), the position buckets, the step's scalars
  int64_t statistics = 0;           // the step's statistics array
  // Backend memory for communication: none today (the gradient reducer reduces in place in the
  // gradients; the MPI data plane stages device buffers through host memory).
  int64_t communication = 0;
  int64_t other = 0;                // counted but in no part above (0: tests keep it so)
  int64_t counted = 0;              // everything the step state allocates
  // What the backend adds: each allocation rounded to its blocks (64 bytes host, 256 in the
  // CUDA arena), and the CUDA backend's fixed workspaces (kernels 4 MiB, cuBLASLt 32 MiB, one
  // result block).
  int64_t rounding = 0;
  int64_t backend_workspace = 0;
  int64_t total = 0;                // counted + rounding + backend_workspace
  // CUDA: the arena the default SWITCHT5_CUDA_MEMORY_FRACTION reserves on a device with
  // `device_memory` bytes free, and whether `total` fits in it (not counted: the transient
  // scratch of mixed-precision GEMMs, cuda_backend.h, allocated and freed within an op).
  int64_t device_memory = 0;
  int64_t arena_limit = 0;
  bool fits = true;
};

// `device_memory_bytes` (CUDA only; <= 0: 141 GB, an H200) is the device's memory.
MemoryPlan plan_memory(const RunConfig& cfg, double device_memory_bytes = 0);

// The gradient reduction of the ranks of data rank `data_rank` in cfg's layout, from the
// GradientReducer and optimizer the run builds (for the communication plan, train/comm_plan.h).
// Only split_gathers depends on the data rank (ZeRO-1: a rank updates its shard's parameters).
struct PlannedReduction {
  struct Bucket {
    int64_t floats = 0;
    bool experts = false;  // over the expert-replica group, else the data group
  };
  std::vector<Bucket> buckets;        // launch order; none for a group of one
  bool zero1 = false;
  int64_t dense_floats = 0;           // the data group's region (ZeRO-1's all_gather)
  std::vector<int64_t> split_gathers; // Adafactor: each model-split parameter's block it gathers
};
PlannedReduction plan_reduction(const RunConfig& cfg, int data_rank = 0);


// Bytes of one checkpoint file of cfg's model (checkpoint/checkpoint.h: every parameter and the
// optimizer's state, fp32, whole logical tensors; attributes not counted): the free space a
// save needs beside the checkpoints already kept.
int64_t checkpoint_file_bytes(const RunConfig& cfg);

// Memory the host can still give this process's node, in bytes: MemAvailable (/proc/meminfo),
// lowered to the cgroup's limit less its usage where one applies (a SLURM job's cgroup); -1
// when neither can be read.
int64_t host_memory_available();

// This process's peak resident memory in bytes (VmHWM, /proc/self/status), or -1. Read by
// `plan` after planning (which allocates nothing): the program's own footprint (code, libraries,
// their static data), which a training process has besides what the plan counts.
int64_t process_peak_resident();

// The memory preflight of `switcht5 train`, before anything is allocated: UserError (exit 2)
// with the numbers when plan_memory's total for one rank does not fit in `capacity` bytes (a
// device backend's Backend::memory_capacity()), or, for a backend in host memory (capacity 0),
// when ranks_on_node ranks' totals exceed the host's available memory. Returns the plan.
MemoryPlan require_memory_fits(const RunConfig& cfg, int64_t capacity, int ranks_on_node);

}  // namespace switcht5
