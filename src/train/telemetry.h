// Routing telemetry across steps (issue 14): what one step's statistics cannot say. Per Switch
// layer, the experts no token chose since the previous logged step (dead experts, a metric), and
// the collapse watch: a layer whose busiest expert takes more than `collapse_share` of its tokens
// at `collapse_logs` consecutive logged steps, or that has an expert no token chose for
// `dead_steps` steps in a row (while the layer routed at least 16 tokens per expert in them:
// fewer leave experts empty by chance), gets one warning line when it enters that state (and one
// when it leaves it), naming the layer. Routing collapse is the failure MoE users fear most; the
// line says which layer and how bad, when it starts.
// Why dead_steps counts steps and not logged intervals: with log.every 1 an interval is one step,
// and 32-expert layers that train well leave an expert or two empty for a step or for up to ~20
// steps now and then (bench/results/2026-12-03-headline-ffn.md); an interval rule warned about
// 1000 times a run there. A collapsed router leaves experts empty for hundreds of steps.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "train/metrics.h"

namespace switcht5 {

class RoutingMonitor {
 public:
  // collapse_share <= 0 turns the collapse watch off (dead experts are still counted).
  RoutingMonitor(double collapse_share, int collapse_logs, int64_t dead_steps);

  // Every step, in order: extends or ends each expert's run of steps with no token.
  void add_step(const StepMetrics& m);
  // At a logged step (after add_step): sets m.routing[l].dead_experts for the interval since the
  // previous logged step, starts a new interval, and returns the warning lines (none usually).
  std::vector<std::string> at_log(StepMetrics& m);

 private:
  double share_;
  int logs_;
  int64_t dead_steps_;
  int64_t steps_since_log_ = 0;
  // [layer][expert]: steps in a row the expert got no token, and the layer's tokens in them.
  std::vector<std::vector<int64_t>> empty_steps_, empty_tokens_;
  std::vector<int> over_share_;                 // consecutive logs over the share, per layer
  std::vector<bool> collapsed_;                 // warned and not yet recovered, per layer
};

}  // namespace switcht5
