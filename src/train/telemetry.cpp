#include "train/telemetry.h"

#include <algorithm>

#include <fmt/format.h>

namespace switcht5 {

namespace {
constexpr int64_t kMinTokensPerExpert = 16;
}  // namespace

RoutingMonitor::RoutingMonitor(double collapse_share, int collapse_logs, int64_t dead_steps)
    : share_(collapse_share), logs_(std::max(1, collapse_logs)),
      dead_steps_(std::max<int64_t>(1, dead_steps)) {}

void RoutingMonitor::add_step(const StepMetrics& m) {
  if (empty_steps_.size() != m.routing.size()) {
    empty_steps_.assign(m.routing.size(), {});
    empty_tokens_.assign(m.routing.size(), {});
    over_share_.assign(m.routing.size(), 0);
    collapsed_.assign(m.routing.size(), false);
  }
  for (size_t l = 0; l < m.routing.size(); ++l) {
    const std::vector<int64_t>& t = m.routing[l].expert_tokens;
    if (empty_steps_[l].size() != t.size()) {
      empty_steps_[l].assign(t.size(), 0);
      empty_tokens_[l].assign(t.size(), 0);
    }
    int64_t routed = 0;
    for (int64_t x : t) routed += x;
    for (size_t e = 0; e < t.size(); ++e) {
      empty_steps_[l][e] = t[e] == 0 ? empty_steps_[l][e] + 1 : 0;
      empty_tokens_[l][e] = t[e] == 0 ? empty_tokens_[l][e] + routed : 0;
    }
  }
  ++steps_since_log_;
}

std::vector<std::string> RoutingMonitor::at_log(StepMetrics& m) {
  std::vector<std::string> warnings;
  for (size_t l = 0; l < m.routing.size() && l < empty_steps_.size(); ++l) {
    LayerRouting& r = m.routing[l];
    // No token since the previous log: empty at each of the interval's steps.
    const std::vector<int64_t>& empty = empty_steps_[l];
    r.dead_experts = int(std::count_if(empty.begin(), empty.end(),
                                       [&](int64_t n) { return n >= steps_since_log_; }));
    // An expert with no token is alarming when it lasts dead_steps steps and every expert could
    // expect many tokens in them: below kMinTokensPerExpert per expert (a few steps of a small
    // batch over many experts) a uniform router leaves some without one by chance (at 16
    // expected, 1 in 9 million).
    const int64_t min_tokens = kMinTokensPerExpert * int64_t(empty.size());
    int long_dead = 0;
    for (size_t e = 0; e < empty.size(); ++e)
      if (empty[e] >= dead_steps_ && empty_tokens_[l][e] >= min_tokens) ++long_dead;
    const bool dead = long_dead > 0;
    if (share_ <= 0 || r.expert_fraction.empty()) continue;
    const auto busiest = std::max_element(r.expert_fraction.begin(), r.expert_fraction.end());
    over_share_[l] = *busiest > share_ ? over_share_[l] + 1 : 0;
    const bool collapsed = over_share_[l] >= logs_ || dead;
    if (collapsed && !collapsed_[l])
      warnings.push_back(fmt::format(
          "routing collapse in {} at step {}: expert {} takes {:.0f}% of the tokens{}, {} of {} "
          "experts got no token in the last {} steps, {:.0f}% dropped (router entropy {:.3f} "
          "nats, top-1 probability {:.3f}); check router_aux_loss_coef, the learning rate and "
          "capacity_factor",
          r.layer, m.step, busiest - r.expert_fraction.begin(), 100 * *busiest,
          over_share_[l] >= logs_ ? fmt::format(" (over {:.0f}% at {} logged steps in a row)",
                                                100 * share_, over_share_[l])
                                  : std::string(),
          long_dead, r.expert_fraction.size(), dead_steps_, 100 * r.dropped_fraction, r.entropy,
          r.top1_prob));
    if (!collapsed && collapsed_[l])
      warnings.push_back(fmt::format("routing in {} recovered at step {}: busiest expert {:.0f}%, "
                                     "no dead experts",
                                     r.layer, m.step, 100 * *busiest));
    collapsed_[l] = collapsed;
  }
  steps_since_log_ = 0;
  return warnings;
}

}  // namespace switcht5
