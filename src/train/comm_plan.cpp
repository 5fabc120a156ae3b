#include "train/comm_plan.h"

#include <algorithm>

#include "model/flops.h"
#include "model/model.h"
#include "model/router.h"
#include "train/memory_plan.h"
#include "train/trainer.h"

namespace switcht5 {
namespace {

// A process group as ProcessGrid lays it out: `size` ranks `stride` apart in world rank order.
struct GroupShape {
  const char* name;
  int size;
  int stride;
};

// Seconds and wire bytes of one rank's share of `floats` payload in collective c over g.
void estimate(PlannedCollective& pc, const GroupShape& g, const LinkModel& links) {
  const double p = g.size, payload = 4.0 * double(pc.floats);
  const double nvlink = links.nvlink_gb_per_s * 1e9, net = links.network_gb_per_s * 1e9;
  // The group's ranks span nodes when its extent in world ranks passes a node boundary.
  const int64_t extent = int64_t(g.stride) * (g.size - 1) + 1;
  pc.spans_nodes = g.size > 1 && extent > links.gpus_per_node;
  switch (pc.collective) {
    case Collective::kAllReduce: pc.wire_bytes = 2.0 * (p - 1) / p * payload; break;
    case Collective::kReduceScatter:
    case Collective::kAllGather:
    case Collective::kAllToAll: pc.wire_bytes = (p - 1) / p * payload; break;
    case Collective::kBroadcast: pc.wire_bytes = payload; break;
  }
  if (!pc.spans_nodes) {
    pc.seconds = pc.wire_bytes / nvlink;
  } else if (pc.collective == Collective::kAllToAll) {
    // Peers on this rank's node (same node: world ranks within gpus_per_node of a node start).
    const double on_node = std::max(1, std::min(g.size, links.gpus_per_node / std::max(1, g.stride)));
    const double block = payload / p;
    pc.seconds = std::max(block * (on_node - 1) / nvlink, block * (p - on_node) / net);
  } else {
    pc.seconds = pc.wire_bytes / net;  // a ring is as fast as its slowest (network) hop
  }
}

}  // namespace

int64_t CommPlan::floats(const std::string& group, Collective c) const {
  int64_t n = 0;
  for (const PlannedCollective& x : collectives)
    if (x.group == group && x.collective == c) n += x.floats;
  return n;
}

int64_t CommPlan::calls(const std::string& group, Collective c) const {
  int64_t n = 0;
  for (const PlannedCollective& x : collectives)
    if (x.group == group && x.collective == c) n += x.calls;
  return n;
}

CommPlan plan_communication(const RunConfig& cfg, const LinkModel& links, int data_rank) {
  const ModelConfig& m = cfg.model;
  const ParallelConfig& par = cfg.parallel;
  const int M = par.model, P = par.expert, world = par.data * par.model;
  const int micro = micro_batch_size(cfg), accum = cfg.train.grad_accum_steps;
  const int64_t D = m.d_model, E = m.num_experts;
  const GroupShape data{"data", par.data, M}, model{"model", M, 1},
      expert{"expert", P, M}, replica{"expert_replica", par.data / P, P * M};

  CommPlan plan;
  auto add = [&](const GroupShape& g, Collective c, const std::string& carries, int64_t calls,
                 int64_t floats, bool overlapped = false) {
    if (g.size <= 1 || calls == 0) return;
    PlannedCollective pc;
    pc.group = g.name;
    pc.group_size = g.size;
    pc.collective = c;
    pc.carries = carries;
    pc.calls = calls;
    pc.floats = floats;
    pc.overlapped = overlapped;
    estimate(pc, g, links);
    plan.collectives.push_back(pc);
  };

  // The model: per micro-batch, counted per stack (SwitchT5Model's forward and backward).
  int64_t tp_calls = 0, tp_floats = 0, bcast_calls = 0, bcast_floats = 0, a2a_calls = 0,
          a2a_floats = 0;
  for (int dec = 0; dec < 2; ++dec) {
    const int layers = dec ? m.num_decoder_layers : m.num_layers;
    const int step = dec ? m.decoder_sparse_step : m.encoder_sparse_step;
    const int T = dec ? cfg.data.targets_length : cfg.data.inputs_length;
    const int64_t N = int64_t(micro) * T;
    const int S = m.group_size > 0 ? m.group_size : T;
    for (int i = 0; i < layers; ++i) {
      const bool sparse = is_sparse_layer(step, i);
      const int attention = dec ? 2 : 1;  // self (+ cross)
      // forward g and backward f of each attention and the FFN, and the gate gradient [N].
      tp_calls += 2 * (attention + 1) + (sparse ? 1 : 0);
      tp_floats += 2 * (attention + 1) * N * D + (sparse ? N : 0);
      if (sparse) {
        ++bcast_calls;
        bcast_floats += N * E;
        const int64_t GC = (N / S) * int64_t(expert_capacity(m, S, true));
        a2a_calls += 4;
        a2a_floats += 4 * E * GC * D;
      }
    }
  }
  ++tp_calls;  // the encoder output's gradient, summed once (the decoder's k/v read it)
  tp_floats += int64_t(micro) * cfg.data.inputs_length * D;
  add(model, Collective::kAllReduce, "tensor-parallel sums of activations and their gradients",
      accum * tp_calls, accum * tp_floats);
  add(model, Collective::kBroadcast, "router logits from model rank 0", accum * bcast_calls,
      accum * bcast_floats);
  add(expert, Collective::kAllToAll, "tokens to their experts and back, forward and backward",
      accum * a2a_calls, accum * a2a_floats);

  // The step: the gradient buckets the run's reducer makes, ZeRO-1, Adafactor's gathers.
  const PlannedReduction red = plan_reduction(cfg, data_rank);
  int64_t dense_calls = 0, dense_floats = 0, expert_calls = 0, expert_floats = 0;
  for (const PlannedReduction::Bucket& b : red.buckets) {
    (b.experts ? expert_calls : dense_calls) += 1;
    (b.experts ? expert_floats : dense_floats) += b.floats;
  }
  add(data, red.zero1 ? Collective::kReduceScatter : Collective::kAllReduce,
      "gradients of the dense parameters, in buckets", dense_calls, dense_floats, true);
  if (red.zero1)
    add(data, Collective::kAllGather, "ZeRO-1: updated parameters from their owners", 1,
        red.dense_floats);
  add(replica, Collective::kAllReduce, "gradients of the experts, in buckets", expert_calls,
      expert_floats, true);
  int64_t gathers = 0;
  for (int64_t n : red.split_gathers) gathers += 2 * int64_t(M) * n;
  add(model, Collective::kAllGather, "Adafactor: model-split parameters and gradients whole",
      2 * int64_t(red.split_gathers.size()), gathers);

  // Time: compute at mfu of the peak; gradient buckets behind the backward pass but the last.
  const double flops =
      3.0 * forward_matmul_flops(m, cfg.train.batch_size, cfg.data.inputs_length,
                                 cfg.data.targets_length, true) / world;
  plan.compute_seconds = flops / (links.mfu * links.gpu_tflops * 1e12);
  double overlapped = 0.0, last_bucket = 0.0;
  for (const PlannedCollective& pc : plan.collectives) {
    plan.comm_seconds += pc.seconds;
    if (pc.overlapped) {
      overlapped += pc.seconds;
      last_bucket = std::max(last_bucket, pc.seconds / double(pc.calls));
    } else {
      plan.exposed_seconds += pc.seconds;
    }
  }
  plan.exposed_seconds +=
      std::max(overlapped - 2.0 / 3.0 * plan.compute_seconds, std::min(overlapped, last_bucket));
  plan.step_seconds = plan.compute_seconds + plan.exposed_seconds;
  plan.scaling_efficiency = plan.compute_seconds / plan.step_seconds;
  return plan;
}

}  // namespace switcht5
