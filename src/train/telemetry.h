// Routing telemetry across steps (issue 14): what one step's statistics cannot say. Per Switch
// layer, the experts no token chose since the previous logged step (dead experts), and the
// collapse watch: a layer whose busiest expert takes more than `collapse_share` of its tokens at
// `collapse_logs` consecutive logged steps, or that has dead experts (when the interval routed at
// least 16 tokens per expert: fewer leave experts empty by chance), gets one warning line when
// it enters that state (and one when it leaves it), naming the layer. Routing collapse is the
// failure MoE users fear most; the line says which layer and how bad, when it starts.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "train/metrics.h"

namespace switcht5 {

class RoutingMonitor {
 public:
  // collapse_share <= 0 turns the collapse watch off (dead experts are still counted).
  RoutingMonitor(double collapse_share, int collapse_logs);

  // Every step, in order: adds the step's per-expert token counts to the interval.
  void add_step(const StepMetrics& m);
  // At a logged step (after add_step): sets m.routing[l].dead_experts for the interval since the
  // previous logged step, starts a new interval, and returns the warning lines (none usually).
  std::vector<std::string> at_log(StepMetrics& m);

 private:
  double share_;
  int logs_;
  std::vector<std::vector<int64_t>> interval_;  // [layer][expert] tokens since the last log
  std::vector<int> over_share_;                 // consecutive logs over the share, per layer
  std::vector<bool> collapsed_;                 // warned and not yet recovered, per layer
};

}  // namespace switcht5
