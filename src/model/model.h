// The Switch-T5 encoder-decoder: forward and hand-written backward, math only (no I/O, no
// communication). Block structure, HF names and conventions follow HF SwitchTransformers / T5:
//
//   encoder:  h = dropout(embed(inputs))
//             block i: h += dropout(SelfAttention(rmsnorm(h), bidirectional rel. bias, enc mask))
//                      h += dropout(FF_i(rmsnorm(h)))      FF_i sparse iff is_sparse_layer(i)
//             enc = dropout(rmsnorm_final(h))
//   decoder:  g = dropout(embed(decoder_inputs))
//             block i: g += dropout(SelfAttention(rmsnorm(g), causal rel. bias, dec mask))
//                      g += dropout(EncDecAttention(rmsnorm(g), enc, enc mask))
//                      g += dropout(FF_i(rmsnorm(g)))
//             dec = dropout(rmsnorm_final(g))
//   logits = (dec * d_model^-0.5) shared^T     (tie_word_embeddings)
//          =  dec lm_head^T                    (untied)
//
// Objective of one forward call, whose gradient backward() computes (LossWeights below):
//   J = ce_scale * sum_{valid targets} (CE_t + z_loss * lse_t^2)
//     + sum_{Switch layers} (router_aux_loss_coef * lb + router_z_loss_coef * z) / microbatches
// With ce_scale = 1 / (valid targets in the global batch) and microbatches = the number of
// forward calls that make up the global batch (gradient accumulation x data parallel), the
// sum of J over those calls is the global-batch objective whatever the layout.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "config/config.h"
#include "model/activation_buffer.h"
#include "model/attention.h"
#include "model/batch.h"
#include "model/feed_forward.h"
#include "model/params.h"
#include "model/switch_ffn.h"

namespace switcht5 {

struct ModelShape {
  int batch = 1;           // sequences per forward call (micro-batch)
  int inputs_length = 1;
  int targets_length = 1;
};

class Communicator;

// This process's share of the model.
// Expert parallelism: the Switch layers' experts are split over `expert_group` (size P), this
// process holding block sharding.expert_rank (E/P experts).
// Tensor model parallelism (Megatron-LM) over `model_group` (size M): attention heads and d_ff
// (of the dense FFNs and of every expert) are split M ways; each attention and FFN output, and
// each of their input gradients, is summed over the model group, so every model rank holds the
// full activations and identical copies of the other parameters.
struct ModelParallelism {
  Communicator* expert_group = nullptr;
  Communicator* model_group = nullptr;
  Sharding sharding;
};

struct LossWeights {
  double ce_scale = 1.0;      // multiplies the sum of per-token CE (and logit z-loss)
  double logit_z_loss = 0.0;  // T5X z_loss coefficient on the LM head's logsumexp^2
  double microbatches = 1.0;  // forward calls in the global batch
  // When set: ce_scale as a float in backend memory, which the cross-entropy backward reads when
  // it runs (a training step recorded once and replayed, train.cuda_graphs, sees each step's
  // value). It must hold float(ce_scale).
  const float* ce_scale_device = nullptr;
};

// A batch in backend memory: Batch's fields, the same layouts. A training step uploads its
// micro-batches before it issues any work, so that the work reads its inputs from backend
// memory only (a recorded step, train.cuda_graphs, replays reading the current step's batch).
struct DeviceBatch {
  DeviceArray<int32_t> enc_ids, dec_ids, labels;  // [B,Ti], [B,Tt], [B,Tt]
  DeviceArray<float> enc_mask, dec_mask;          // [B,Ti], [B,Tt]
  size_t bytes() const {
    return enc_ids.bytes() + dec_ids.bytes() + labels.bytes() + enc_mask.bytes() +
           dec_mask.bytes();
  }
};

// Statistics of forward calls (summed over the calls since the statistics array was zeroed).
struct ForwardStats {
  double ce_sum = 0.0;          // sum of CE over valid target tokens
  double logit_lse_sq_sum = 0.0;// sum of lse^2 over valid target tokens
  int64_t target_tokens = 0;
  std::vector<RouterStats> encoder_router;  // one per encoder Switch layer, in order
  std::vector<RouterStats> decoder_router;
};

// The statistics array a forward call adds to (backend memory, doubles): these entries, then
// router_stats_size(num_experts) per Switch layer (encoder first, in block order; see
// RouterStatsSlot in model/router.h).
enum ModelStatsSlot : int {
  kCeSum = 0,
  kLogitLseSqSum = 1,
  kTargetTokens = 2,
  kModelStatsFixed = 3,
};

class SwitchT5Model {
 public:
  // compute_dtype: the parameters' compute copy and the kept activations (ParamStore::
  // compute_dtype(); kBF16 for train.precision: bf16). Fixed for the model's lifetime.
  SwitchT5Model(Backend& be, const ModelConfig& cfg, ModelShape shape,
                ModelParallelism parallel = {}, DType compute_dtype = DType::kF32);
  ~SwitchT5Model();
  SwitchT5Model(const SwitchT5Model&) = delete;
  SwitchT5Model& operator=(const SwitchT5Model&) = delete;

  ParamStore& params() { return params_; }
  const ModelConfig& config() const { return cfg_; }
  const ModelShape& shape() const { return shape_; }

  // Runs the forward pass; `seed` keys dropout and router jitter (ignored when !training).
  // `first_row` is the global-batch index of the batch's first sequence: router jitter is
  // indexed by global position, so it does not depend on how the global batch is split.
  // Adds the call's losses and router statistics to `stats` [statistics_size()] in backend
  // memory (ModelStatsSlot): no host synchronisation, so a training step accumulates over its
  // micro-batches and reads the array back once.
  void forward_accumulate(const Batch& batch, bool training, RandomKey seed, uint64_t first_row,
                          double* stats);
  // The same on a batch already in backend memory (upload()); the forward copies it into the
  // model's own input buffers on the device, where the backward reads it.
  void forward_accumulate(const DeviceBatch& batch, bool training, RandomKey seed,
                          uint64_t first_row, double* stats);
  // A DeviceBatch of this model's batch shape, and a host batch checked (shape, token ids and
  // labels in the vocabulary) and copied into one.
  DeviceBatch make_device_batch();
  void upload(const Batch& batch, DeviceBatch& dst);
  int64_t statistics_size() const;
  // ForwardStats from a host copy of a statistics array.
  ForwardStats decode_statistics(const double* stats) const;
  // forward_accumulate into a zeroed array of the model's own, read back: the statistics of
  // this one call (tests, evaluation tools). Valid until the next forward.
  const ForwardStats& forward(const Batch& batch, bool training, RandomKey seed,
                              uint64_t first_row = 0);
  // Accumulates dJ/dparams into params().grads() for the last forward call. An evaluation
  // forward (training = false) keeps nothing for the Switch layers' backward (they evaluate
  // at the larger evaluation capacity in the shared scratch), so with Switch layers the last
  // forward must be a training one.
  // `ready` (optional) hears, as the pass goes, which gradients are final: each block's
  // parameters once its backward is done (last block first), a stack's relative-position bias
  // and final norm, the LM head, and the shared embedding at the very end. Report only from the
  // backward that completes the gradients (the last micro-batch).
  void backward(const LossWeights& w, GradientReadyListener* ready = nullptr);
  // J for `stats` (the value whose gradient backward computes).
  double objective(const ForwardStats& stats, const LossWeights& w) const;

  // Bytes sent to other processes by the expert all-to-all exchanges so far.
  int64_t alltoall_bytes_sent() const;
  // "encoder.block.1", ...: the Switch blocks, encoder first, in the order of ForwardStats.
  std::vector<std::string> switch_layer_names() const;
  // The first Switch block (same order) whose last router logits are not finite, or "".
  std::string first_nonfinite_router_logits() const;

  // [batch * targets_length, vocab] logits of the last forward (overwritten by backward).
  const float* logits() const;
  // Bytes of activation and scratch memory held (for the memory report): the kept activations
  // plus the workspace of a pass (the layers' shared scratch, gradient buffers).
  size_t activation_bytes() const;
  // Bytes of what forward keeps for backward: in the compute dtype, but for what stays fp32 in
  // every dtype (norm statistics, the router, logits and the loss).
  size_t kept_activation_bytes() const;
  // Bytes of a pass's inputs on the device: the batch (token ids, masks, labels) and the
  // relative-position buckets. With the parameter store's arrays and activation_bytes(), all
  // the model allocates (`switcht5 plan` checks that the parts add up to what it counts).
  size_t input_bytes() const;

  struct Stack;  // encoder or decoder (model.cpp)

 private:
  Backend& be_;
  ModelConfig cfg_;
  ModelShape shape_;
  ModelParallelism parallel_;
  ParamStore params_;
  const ParamInfo* head_ = nullptr;  // the LM head's weight: shared.weight (tied) or lm_head.weight
  std::unique_ptr<Stack> encoder_, decoder_;
  DeviceArray<float> scratch_;
  DeviceBatch in_;  // the batch of the last forward, read by the backward
  DeviceArray<double> stats_acc_;    // [statistics_size()] for forward()
  std::vector<double> host_stats_;
  ForwardStats stats_;
  // Head.
  ActivationBuffer head_in_;     // [B*Tt, D] decoder output (scaled when tied)
  DeviceArray<float> logits_;    // [B*Tt, V] fp32 in every compute dtype: the CE runs in fp32
  DeviceArray<float> token_loss_, token_lse_;  // [B*Tt] fp32: loss statistics
  RandomKey seed_;
  bool training_ = false;
};

// Whether block `layer_index` (0-based) of a stack with sparse step `step` is a Switch (MoE)
// block. HuggingFace's rule: step > 0 && (step == 1 || layer_index % step == 1), so step 2
// makes blocks 1, 3, 5, ... sparse and step 0 makes the stack dense.
bool is_sparse_layer(int step, int layer_index);

// Registers every parameter of a model with this config (names, shapes, init rules) without
// building activations: used by `plan` and by checkpoint tools.
void register_model_params(ParamStore& ps, const ModelConfig& cfg, const Sharding& sharding = {});

}  // namespace switcht5
