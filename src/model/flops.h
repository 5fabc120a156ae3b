// Matrix-multiply FLOPs of one training step over static shapes (expert FFNs over their full
// capacity buffers, as a GPU backend runs them; attention over the padded lengths). The CPU
// backend skips the buffers' empty rows (Backend::gemm_ex_rows), so it executes less; it counts
// what it ran (CpuBackend::executed_gemm_flops). 2*M*N*K per GEMM; backward = 2 x forward.
// Elementwise work is not counted: this is the number to compare with the GEMM's peak.
#pragma once
#include "config/config.h"

namespace switcht5 {

// Forward FLOPs for `batch` sequences of inputs_length / targets_length tokens. `executed`: the
// expert FFNs over every capacity slot (drops and empty slots included); otherwise each token
// through its top-1 expert once (the model's FLOPs per token, what the Switch paper holds equal
// between models).
double forward_matmul_flops(const ModelConfig& cfg, int batch, int inputs_length,
                            int targets_length, bool training, bool executed = true);

// The formula, for `switcht5 plan` to print.
inline constexpr const char* kMatmulFlopsFormula =
    "2*M*N*K per matmul; per layer: attention 4*N*D*HK (q,o) + 4*Nk*D*HK (k,v) + 4*N*Tk*HK "
    "(scores, context), decoder cross-attention likewise over the encoder's tokens; FFN "
    "2*m*N*D*F (m = 2 relu, 3 gated-gelu) with N tokens through their top-1 expert, plus the "
    "router 2*N*D*E; LM head 2*N*D*V; training = 3 x forward";

// Parameters one token uses: every parameter outside the experts and, in each Switch layer,
// one expert's (top-1 routing).
int64_t active_parameters(const ModelConfig& cfg);

}  // namespace switcht5
