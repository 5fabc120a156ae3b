#include "train/grad_clip.h"

#include <cmath>

namespace switcht5 {

double clip_grad_norm(Backend& be, ParamStore& params, double max_norm) {
  const int64_t n = params.total_numel();
  const double norm = std::sqrt(be.sum_squares(params.grads(), n));
  if (max_norm > 0.0 && std::isfinite(norm) && norm > max_norm)
    be.scale(params.grads(), static_cast<float>(max_norm / norm), n);
  return norm;
}

}  // namespace switcht5
