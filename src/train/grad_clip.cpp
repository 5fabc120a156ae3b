#include "train/grad_clip.h"

#include <cmath>

namespace switcht5 {

void clip_grad_norm_scaled(Backend& be, ParamStore& params, double norm, double max_norm) {
  if (max_norm > 0.0 && std::isfinite(norm) && norm > max_norm)
    be.scale(params.grads(), static_cast<float>(max_norm / norm), params.total_numel());
}

double clip_grad_norm(Backend& be, ParamStore& params, double max_norm) {
  const double norm = std::sqrt(be.sum_squares(params.grads(), params.total_numel()));
  clip_grad_norm_scaled(be, params, norm, max_norm);
  return norm;
}

}  // namespace switcht5
