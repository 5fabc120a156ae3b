// Matrix-multiply FLOPs of one training step, as executed (expert FFNs over their full capacity
// buffers, attention over the padded lengths). 2*M*N*K per GEMM; backward = 2 x forward.
// Elementwise work is not counted: this is the number to compare with the GEMM's peak.
#pragma once
#include "config/config.h"

namespace switcht5 {

// Forward FLOPs for `batch` sequences of inputs_length / targets_length tokens.
double forward_matmul_flops(const ModelConfig& cfg, int batch, int inputs_length,
                            int targets_length, bool training);

}  // namespace switcht5
