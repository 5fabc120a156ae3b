// One token's router confidence terms (Backend::accumulate_router_confidence), shared by the
// reference and CPU backends, which differ only in how they sum tokens (the CUDA kernel,
// reduce.cu, has its own device copy).
#pragma once
#include <algorithm>

namespace switcht5 {

struct TokenConfidence {
  double entropy = 0.0;  // lse - sum_e p_e logit_e
  double top1 = 0.0;     // p1
  double margin = 0.0;   // p1 - p2 (p2 = 0 when E = 1)
};

// p, z: the token's E probabilities and logits; lse its logsumexp.
inline TokenConfidence token_confidence(const float* p, const float* z, float lse, int E) {
  double expected_logit = 0.0, p1 = -1.0, p2 = 0.0;
  for (int e = 0; e < E; ++e) {
    expected_logit += double(p[e]) * z[e];
    if (p[e] > p1) {
      p2 = std::max(p1, 0.0);
      p1 = p[e];
    } else if (p[e] > p2) {
      p2 = p[e];
    }
  }
  return {double(lse) - expected_logit, p1, p1 - p2};
}

}  // namespace switcht5
