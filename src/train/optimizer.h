// Optimizers over a ParamStore: Adafactor as T5 trains with it, and AdamW.
//
// An Optimizer owns its state (in backend memory, allocated with DeviceArray) and applies the
// gradients of ParamStore::grads() to ParamStore::values() through the Backend's
// adafactor_update / adamw_update kernels, one call per parameter tensor.
//
// Adafactor (Shazeer & Stern 2018), matching HF transformers' Adafactor with relative_step=False,
// warmup_init=False, beta1=None (no momentum), an external learning rate, and scale_parameter =
// options.scale_parameter. T5 / Mesh-TF / T5X train with the parameter scale on
// (multiply_by_parameter_scale, epsilon2 1e-3) and lr = 1/sqrt(max(step, 10^4)); HF's recipe
// for fine-tuning T5 turns it off and uses a small fixed lr (1e-3). With it on, each matrix's
// step is lr * max(epsilon2, rms(matrix before the step)), so a weight initialised at scale
// 0.02 moves 0.02x as far as one at scale 1 (see Backend::adafactor_update).
//   t-th step (t = 1, 2, ...):  beta2t = 1 - t^(-decay_rate)   (decay_rate 0.8: beta2t(1) = 0)
//   factored [R,C] matrices:   row / column running means of g^2 + eps1 (Backend::adafactor_update)
//   unfactored tensors:        full running mean of g^2 + eps1
//   update clipping per matrix: u /= max(1, rms(u) / clipping_threshold)
//   p -= lr_k * (u + weight_decay * p)   (decoupled; p is the value before this step)
//   lr_k = lr * max(epsilon2, rms(p)) with the parameter scale, else lr
// Which tensors are factored: kMatrix and kEmbedding are one [rows, cols] matrix, kStacked
// [E,R,C] is E independent [R,C] matrices (HF keeps each expert as its own parameter, so its
// per-tensor clipping and parameter scale are our per-matrix ones); kVector, and any tensor with
// rows == 1 or cols == 1, is unfactored. A model-split parameter is gathered whole first, so its
// clipping and scale see the logical matrix.
//
// AdamW (Loshchilov & Hutter 2019), as torch.optim.AdamW:
//   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
//   p -= lr * ( (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) + weight_decay * p )
//
// Weight decay never applies to kVector parameters (RMSNorm scales), for either optimizer.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "config/config.h"
#include "model/params.h"

namespace switcht5 {

class Communicator;

struct OptimizerOptions {
  std::string name = "adafactor";  // adafactor | adamw
  // AdamW
  double beta1 = 0.9, beta2 = 0.999, epsilon = 1e-8, weight_decay = 0.0;
  // Adafactor (weight_decay above applies to it too)
  double decay_rate = 0.8, clipping_threshold = 1.0, epsilon1 = 1e-30;
  bool scale_parameter = false;  // lr times max(epsilon2, rms(p)) per matrix
  double epsilon2 = 1e-3;
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // Applies params.grads() to params.values() and, in bf16, writes the updated parameters' bf16
  // compute copies (ParamStore::compute_copy) in the same pass. The step counter starts at 0; the first step()
  // uses t = 1 and leaves steps_taken() == 1. `params` must have the layout the optimizer was
  // made for.
  virtual void step(Backend& be, ParamStore& params, float lr) = 0;
  int64_t steps_taken() const { return steps_taken_; }
  void set_steps_taken(int64_t steps) { steps_taken_ = steps; }  // when restoring a checkpoint

  // A named view of one state tensor in backend memory, e.g. "<param>.exp_avg" (AdamW) or
  // "<param>.exp_avg_sq_row" (Adafactor; the names are those of HF's optimizer state), placed in
  // its logical tensor the way ParamInfo places a parameter block (for checkpoints).
  struct StateTensor {
    std::string name;
    std::vector<int64_t> shape;        // the block this process holds
    float* data;                       // null: this optimizer keeps no state for the parameter
                                       // (ZeRO-1: another data rank updates it)
    std::vector<int64_t> full_shape;   // the logical tensor (the same over every layout)
    std::vector<int64_t> slice_start;  // the block's first index in it
    int model_split_dim;               // the logical dimension split over the model group, or
                                       // -1 when every model rank holds the same block
    int param;                         // index of the parameter in ParamStore::infos()
  };
  // Every state tensor of every parameter, in parameter order, the same list on every rank
  // (entries of parameters this optimizer does not update have data == null).
  virtual std::vector<StateTensor> state() = 0;

 protected:
  int64_t steps_taken_ = 0;
};

// Whether Adafactor keeps factored row/column statistics for this parameter.
bool adafactor_factored(const ParamInfo& info);

// Floats of state that make_optimizer(options with name `name`) allocates for parameter `p`
// (this process's block, as registered) when it updates it, with p split along
// p.model_split_dim over a model group of `model_parallel` ranks. AdamW: m and v, one each per
// element of the block. Adafactor: per logical matrix (a split block's statistics cover the
// whole logical matrix, see make_optimizer) row + column statistics when factored, else a
// full second moment. `switcht5 plan` sizes a layout with it without allocating anything.
// UserError for an unknown name.
int64_t optimizer_state_numel(const std::string& name, const ParamInfo& p, int model_parallel);

// The options train.* asks for (the trainer's, bench_optimizer's).
OptimizerOptions optimizer_options(const TrainConfig& train);

// Makes the optimizer named by options.name for the parameters of `params`, which must be
// allocated (their offsets are fixed then). Throws UserError for an unknown name or bad options.
// `updates` (one flag per parameter, empty = all) restricts the optimizer to a subset, with
// state only for that subset: ZeRO-1 gives each data rank its share of the replicated
// parameters. `model_group` (tensor parallelism): Adafactor updates a parameter split over it
// as the whole logical matrix (gathered; factored statistics and update clipping need every
// row and column), so the result equals the unsplit model's; AdamW is elementwise.
std::unique_ptr<Optimizer> make_optimizer(const OptimizerOptions& options, Backend& be,
                                          const ParamStore& params,
                                          const std::vector<bool>& updates = {},
                                          Communicator* model_group = nullptr);

}  // namespace switcht5
