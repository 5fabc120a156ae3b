// What a training step reports: StepMetrics (losses, learning rate, gradient norm, throughput,
// routing statistics per Switch layer), decoded from the step's statistics array, and its
// metrics.jsonl form.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace switcht5 {

// Routing statistics of one Switch layer over a step (all micro-batches and data ranks).
struct LayerRouting {
  std::string layer;                     // e.g. "encoder.block.1"
  double aux_loss = 0.0;                 // load-balancing loss, mean over groups
  double z_loss = 0.0;                   // router z-loss, mean over tokens
  double dropped_fraction = 0.0;
  std::vector<double> expert_fraction;   // fraction of tokens whose top-1 is each expert
  std::vector<int64_t> expert_tokens;    // the tokens whose top-1 is each expert
  // Telemetry (issue 14): how sure the router is, mean over the step's tokens (padding
  // included); log(E) entropy and 1/E top-1 probability mean it cannot tell the experts apart.
  double entropy = 0.0;                  // nats
  double top1_prob = 0.0;
  double top1_margin = 0.0;              // top-1 minus top-2 probability
  double load_cv = 0.0;                  // std / mean of expert_fraction over the experts (0:
                                         // balanced; sqrt(E - 1): all tokens on one expert)
  // Set by the training loop at logged steps:
  int dead_experts = -1;                 // experts no token chose since the previous log (-1:
                                         // not computed)
  std::vector<double> expert_grad_norm;  // L2 norm of each expert's gradient (empty: not
                                         // computed), before clipping
};

struct StepMetrics {
  int64_t step = 0;
  double loss = 0.0;              // mean cross-entropy over the global batch's target tokens
  double aux_loss = 0.0;          // load-balancing loss, mean over Switch layers (1 = balanced)
  double z_loss = 0.0;            // router z-loss, mean over Switch layers
  double lr = 0.0;
  double grad_norm = 0.0;         // before clipping
  double tokens_per_s = 0.0;      // (inputs + targets) tokens of the global batch per second
  double dropped_fraction = 0.0;  // tokens past capacity / routed tokens, all Switch layers
  double step_ms = 0.0;
  // Of step_ms, the update after the gradients: clipping, the optimizer and ZeRO-1's gather
  // (0 on a skipped step). step_ms - optimizer_ms is data, forward, backward and reductions.
  double optimizer_ms = 0.0;
  bool skipped = false;           // non-finite loss or gradient: no update was applied
  std::string nonfinite;          // then: the first non-finite tensor and the rank that saw it
  std::vector<LayerRouting> routing;
  bool has_val = false;
  double val_loss = 0.0;
};

// Fills m.routing, m.aux_loss, m.z_loss and m.dropped_fraction from a host copy of a model
// statistics array (model/model.h ModelStatsSlot: kModelStatsFixed entries, then
// router_stats_size(num_experts) per Switch layer, in the order of `layers`), summed over the
// step's micro-batches and data ranks.
void decode_routing(StepMetrics& m, const double* model_stats,
                    const std::vector<std::string>& layers, int num_experts);

// Per Switch layer, the tokens whose top-1 is each expert, for the watchdog's message:
// "encoder.block.1 [12 0 7 5], decoder.block.1 [...]"; a layer of more than 16 experts as
// "encoder.block.1 [128 experts: min 0 (expert 5), max 40 (expert 17), 3 with none]".
std::string describe_expert_tokens(const StepMetrics& m);

// One metrics.jsonl line (no trailing newline).
std::string metrics_json(const StepMetrics& m);

// `text` as a JSON string literal (quotes, backslashes and control characters escaped).
std::string json_string(const std::string& text);

// A number for JSON output: JSON has no NaN or Infinity, so a non-finite value (a skipped
// step's loss, the validation loss of a model gone bad) is written as null.
std::string json_number(double v, const char* format = "{:.9g}");

}  // namespace switcht5
