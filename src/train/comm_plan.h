// What one rank of a training run communicates per optimizer step, for `switcht5 plan`: every
// data-plane collective by process group (counted from the model's structure and from the
// gradient buckets and ZeRO-1 shards the run's real GradientReducer makes), and a time estimate
// from link speeds. The payload (calls and floats per step) is exact: the MPI data plane counts
// what it is asked to move (DataPlane::traffic) and tests/mpi/test_plan_layouts.cpp holds the
// plan to those counts for several layouts. The times are a model, stated with its assumptions.
//
// Per micro-batch, with N tokens in a stack (micro-batch x its length), D = d_model, E experts:
//   model group (tensor parallelism, Megatron's f/g), all_reduce of [N, D]:
//     forward:  each self-attention, each cross-attention, each dense FFN and each Switch FFN
//     backward: the same sublayers, plus the Switch FFN's gate gradient [N] and, once, the
//               encoder output's gradient [N_enc, D] (the decoder's k/v read it);
//     broadcast of the router logits [N, E] (model rank 0 decides the routing).
//   expert group: all_to_all of the capacity buffer [E, G*C, D] (G groups of S tokens, capacity
//     C), to the experts and back, in the forward and in the backward: 4 per Switch layer.
// Per step: the gradient buckets over the data group (all_reduce, or ZeRO-1's reduce_scatter,
// then one all_gather of the updated parameters) and over the expert-replica group (all_reduce);
// Adafactor under tensor parallelism gathers each model-split parameter and its gradient
// (all_gather of [M x its block]). Control-plane scalars (a few KB on the host) are left out.
//
// Time model: a ring collective over p ranks sends 2(p-1)/p of its payload (all_reduce) or
// (p-1)/p (reduce_scatter, all_gather, all_to_all), the payload once (broadcast); fp32 on the
// wire. A group inside one node moves at the NVLink bandwidth; a group spanning nodes at the
// network bandwidth per GPU (all_to_all: its on-node and off-node shares each at their own
// speed, the slower bounding). Ranks are placed as ProcessGrid lays them out (model ranks
// neighbours, then data ranks), gpus_per_node to a node. Compute takes the step's matmul FLOPs
// per rank at `mfu` of `gpu_tflops`. Gradient reduction overlaps the backward pass (2/3 of the
// compute) except the last bucket; the all_to_all, tensor-parallel sums and ZeRO-1's all_gather
// are on the critical path. Predicted step = compute + exposed communication; weak-scaling
// efficiency = compute / step.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "comm/data_plane.h"
#include "config/config.h"

namespace switcht5 {

struct LinkModel {
  int gpus_per_node = 8;
  double nvlink_gb_per_s = 370.0;   // bus bandwidth of an all_to_all inside a node (H100/H200)
  double network_gb_per_s = 50.0;   // per GPU across nodes (400 Gb/s InfiniBand)
  double gpu_tflops = 989.0;        // H100/H200 dense bf16 datasheet peak
  double mfu = 0.4;                 // fraction of the peak the compute reaches
};

struct PlannedCollective {
  std::string group;   // "data", "expert_replica", "expert", "model"
  int group_size = 1;
  bool spans_nodes = false;
  Collective collective = Collective::kAllReduce;
  std::string carries;  // what it moves, for the table
  int64_t calls = 0;    // per optimizer step
  int64_t floats = 0;   // payload per step (DataPlane::traffic's unit)
  double wire_bytes = 0.0;  // what this rank sends per step (time model)
  double seconds = 0.0;
  bool overlapped = false;  // hidden behind the backward pass (gradient buckets)
};

struct CommPlan {
  std::vector<PlannedCollective> collectives;  // every one with calls > 0
  double compute_seconds = 0.0;
  double comm_seconds = 0.0;     // all of it, as if nothing overlapped
  double exposed_seconds = 0.0;  // on the critical path
  double step_seconds = 0.0;
  double scaling_efficiency = 1.0;
  // Payload per step summed over a group's collectives, by (group, collective): what the
  // measurement is compared with.
  int64_t floats(const std::string& group, Collective c) const;
  int64_t calls(const std::string& group, Collective c) const;
};

// A rank of data rank `data_rank` in the layout cfg.parallel. Every rank moves the same amounts,
// except Adafactor's gathers under ZeRO-1 and tensor parallelism (each data rank gathers the
// model-split parameters of its own shard).
CommPlan plan_communication(const RunConfig& cfg, const LinkModel& links = {}, int data_rank = 0);

}  // namespace switcht5
