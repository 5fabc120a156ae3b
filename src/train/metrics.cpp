#include "train/metrics.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "model/model.h"
#include "model/router.h"

namespace switcht5 {

void decode_routing(StepMetrics& m, const double* model_stats,
                    const std::vector<std::string>& layers, int num_experts) {
  const int64_t stride = router_stats_size(num_experts);
  double routed = 0.0, dropped = 0.0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const double* a = model_stats + kModelStatsFixed + int64_t(l) * stride;
    const double calls = a[kRouterCalls], tokens = a[kRouterTokens];
    LayerRouting r;
    r.layer = layers[l];
    r.aux_loss = a[kRouterBalanceSum] / calls;
    r.z_loss = a[kRouterZSum] / calls;
    r.dropped_fraction = tokens > 0 ? a[kRouterDropped] / tokens : 0.0;
    for (int e = 0; e < num_experts; ++e) {
      r.expert_fraction.push_back(tokens > 0 ? a[kRouterStatsFixed + e] / tokens : 0.0);
      r.expert_tokens.push_back(std::llround(a[kRouterStatsFixed + e]));
    }
    const double* confidence = a + router_confidence_slot(num_experts);
    r.entropy = confidence[kRouterEntropySum] / calls;
    r.top1_prob = confidence[kRouterTop1Sum] / calls;
    r.top1_margin = confidence[kRouterMarginSum] / calls;
    // Coefficient of variation of the load: the mean fraction is 1/E (every token has a top-1).
    double var = 0.0;
    for (double f : r.expert_fraction) var += (f - 1.0 / num_experts) * (f - 1.0 / num_experts);
    r.load_cv = tokens > 0 ? std::sqrt(var / num_experts) * num_experts : 0.0;
    m.aux_loss += r.aux_loss / double(layers.size());
    m.z_loss += r.z_loss / double(layers.size());
    routed += tokens;
    dropped += a[kRouterDropped];
    m.routing.push_back(std::move(r));
  }
  m.dropped_fraction = routed > 0 ? dropped / routed : 0.0;
}

std::string describe_expert_tokens(const StepMetrics& m) {
  constexpr size_t kListed = 16;
  std::string out;
  for (const LayerRouting& r : m.routing) {
    const std::vector<int64_t>& t = r.expert_tokens;
    out += out.empty() ? "" : ", ";
    if (t.size() <= kListed) {
      out += fmt::format("{} [{}]", r.layer, fmt::join(t, " "));
      continue;
    }
    const auto [lo, hi] = std::minmax_element(t.begin(), t.end());
    out += fmt::format("{} [{} experts: min {} (expert {}), max {} (expert {}), {} with none]",
                       r.layer, t.size(), *lo, lo - t.begin(), *hi, hi - t.begin(),
                       std::count(t.begin(), t.end(), int64_t{0}));
  }
  return out;
}

std::string json_number(double v, const char* format) {
  return std::isfinite(v) ? fmt::format(fmt::runtime(format), v) : std::string("null");
}

namespace {

}  // namespace

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      out += fmt::format("\\u{:04x}", int(c));
      continue;
    }
    out += c;
  }
  return out + "\"";
}

std::string metrics_json(const StepMetrics& m) {
  std::string s = fmt::format(
      "{{\"step\": {}, \"loss\": {}, \"aux_loss\": {}, \"z_loss\": {}, \"lr\": {}, "
      "\"grad_norm\": {}, \"tokens_per_s\": {}, \"dropped_fraction\": {}, \"step_ms\": {}",
      m.step, json_number(m.loss), json_number(m.aux_loss), json_number(m.z_loss),
      json_number(m.lr), json_number(m.grad_norm), json_number(m.tokens_per_s, "{:.6g}"),
      json_number(m.dropped_fraction), json_number(m.step_ms, "{:.6g}"));
  if (m.skipped) s += ", \"skipped\": true, \"nonfinite\": " + json_string(m.nonfinite);
  if (m.has_val) s += ", \"val_loss\": " + json_number(m.val_loss);
  if (!m.routing.empty()) {
    s += ", \"router\": [";
    for (size_t i = 0; i < m.routing.size(); ++i) {
      const LayerRouting& r = m.routing[i];
      std::string fractions;
      for (size_t e = 0; e < r.expert_fraction.size(); ++e)
        fractions += (e ? ", " : "") + json_number(r.expert_fraction[e], "{:.6g}");
      s += fmt::format("{}{{\"layer\": {}, \"aux_loss\": {}, \"z_loss\": {}, "
                       "\"dropped_fraction\": {}, \"expert_fraction\": [{}], \"entropy\": {}, "
                       "\"top1_prob\": {}, \"top1_margin\": {}, \"load_cv\": {}",
                       i ? ", " : "", json_string(r.layer), json_number(r.aux_loss, "{:.6g}"),
                       json_number(r.z_loss, "{:.6g}"), json_number(r.dropped_fraction, "{:.6g}"),
                       fractions, json_number(r.entropy, "{:.6g}"),
                       json_number(r.top1_prob, "{:.6g}"), json_number(r.top1_margin, "{:.6g}"),
                       json_number(r.load_cv, "{:.6g}"));
      if (r.dead_experts >= 0) s += fmt::format(", \"dead_experts\": {}", r.dead_experts);
      if (!r.expert_grad_norm.empty()) {
        std::string norms;
        for (size_t e = 0; e < r.expert_grad_norm.size(); ++e)
          norms += (e ? ", " : "") + json_number(r.expert_grad_norm[e], "{:.6g}");
        s += ", \"expert_grad_norm\": [" + norms + "]";
      }
      s += "}";
    }
    s += "]";
  }
  return s + "}";
}

}  // namespace switcht5
