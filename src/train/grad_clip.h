// Global gradient-norm clipping over the one contiguous gradient array of a ParamStore.
#pragma once
#include "backend/backend.h"
#include "model/params.h"

namespace switcht5 {

// norm = sqrt(sum over every gradient element of g^2)   (one Backend::sum_squares call)
// When max_norm > 0 and norm > max_norm, every gradient is scaled by max_norm / norm.
// Returns the norm BEFORE clipping. A non-finite norm (NaN/Inf gradients) is returned as is and
// the gradients are left untouched, so the caller can see it and skip the step.
double clip_grad_norm(Backend& be, ParamStore& params, double max_norm);

// The scaling step alone, for a norm computed elsewhere (over several processes).
void clip_grad_norm_scaled(Backend& be, ParamStore& params, double norm, double max_norm);

}  // namespace switcht5
