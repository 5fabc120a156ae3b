// What each config key means, one line each, for the README's config reference
// (config_reference_markdown in config/config.h). Kept beside the key table (for_each_field in
// config.cpp): tests/test_config.cpp fails when a key has no line here or a line names no key.
#pragma once
#include <string_view>

namespace switcht5 {

struct ConfigKeyDoc {
  std::string_view key;      // "section.key"
  std::string_view meaning;  // markdown, one line
};

inline constexpr ConfigKeyDoc kConfigKeyDocs[] = {
    {"model.vocab_size", "embedding rows: SentencePiece ids + sentinels, padded (T5: 32128)"},
    {"model.d_model", "hidden size of every block"},
    {"model.d_ff", "hidden size of each dense MLP and of each expert"},
    {"model.d_kv", "per-head size; attention's inner size is num_heads x d_kv"},
    {"model.num_heads", "attention heads"},
    {"model.num_layers", "encoder blocks"},
    {"model.num_decoder_layers", "decoder blocks (absent: num_layers)"},
    {"model.num_experts", "experts per Switch layer; 0 only for a dense model (both sparse steps 0)"},
    {"model.expert_capacity", "tokens each expert takes per routing group; 0: from capacity_factor"},
    {"model.router_jitter_noise", "router input x U(1 - eps, 1 + eps) while training"},
    {"model.router_z_loss_coef", "router z-loss weight (ST-MoE); 0: off"},
    {"model.router_aux_loss_coef", "load-balancing loss weight alpha (Switch paper eq. 4)"},
    {"model.encoder_sparse_step", "every step-th encoder block is a Switch block (HF's rule); 0: dense"},
    {"model.decoder_sparse_step", "the same for the decoder"},
    {"model.relative_attention_num_buckets", "T5 relative-position buckets"},
    {"model.relative_attention_max_distance", "distance beyond which buckets are shared"},
    {"model.dropout_rate", "dropout on attention, residuals and dense MLPs"},
    {"model.feed_forward_proj", "MLP activation: ReLU (T5 1.0, Switch) or gated GELU (T5 1.1)"},
    {"model.tie_word_embeddings", "LM head = embedding^T with logits scaled by d_model^-0.5"},
    {"model.layer_norm_epsilon", "RMSNorm epsilon"},
    {"model.pad_token_id", "padding id (masked out of attention and the loss)"},
    {"model.eos_token_id", "end-of-sequence id"},
    {"model.decoder_start_token_id", "first decoder input token"},
    {"model.capacity_factor", "expert capacity factor while training"},
    {"model.eval_capacity_factor", "expert capacity factor in evaluation"},
    {"model.group_size", "tokens per routing group; 0: one sequence per group"},
    {"model.init_scale", "weight-init standard deviation multiplier (paper Sec. 2.3: 0.1)"},
    {"model.expert_dropout", "dropout inside the experts (paper Table 4)"},
    {"model.router_force_balance", "benchmarks only: router logits replaced by uniform noise, so "
                                   "top-1 is uniform over the experts (Megatron-Core's "
                                   "moe_router_force_load_balancing); not a way to train"},
    {"data.source", "`shards` (tokenized C4 with T5 span corruption) or `synthetic` tasks"},
    {"data.task", "the synthetic task: `copy`/`reverse` (learnable; the encoder holds at most "
                  "targets_length tokens, the rest padding) or `span_corruption` (random "
                  "tokens through T5 span corruption: full encoder, T5's target length; "
                  "for benchmarks)"},
    {"data.inputs_length", "encoder tokens per sequence"},
    {"data.targets_length", "decoder tokens per sequence"},
    {"data.synthetic_vocab", "synthetic tokens are drawn below this id; 0: the whole vocabulary"},
    {"data.train_glob", "token shards to train on (`switcht5-data tokenize`)"},
    {"data.val_glob", "token shards to validate on; empty: no validation"},
    {"data.noise_density", "span corruption: fraction of tokens masked"},
    {"data.mean_noise_span_length", "span corruption: mean masked span length"},
    {"data.extra_ids", "sentinels `<extra_id_0..N-1>` above the SentencePiece ids (synthetic "
                       "`span_corruption`: the top ids below the vocabulary)"},
    {"data.shuffle_window", "pieces shuffled together (seeded, per epoch)"},
    {"data.prefetch", "batches the loader thread prepares ahead; 0: inline"},
    {"data.verify_checksums", "check every shard's checksum when it is opened"},
    {"train.steps", "optimizer steps"},
    {"train.batch_size", "global batch in sequences per optimizer step (all ranks)"},
    {"train.grad_accum_steps", "micro-batches per step (micro-batch = batch / data ranks / this)"},
    {"train.optimizer", "Adafactor (factored, as T5X) or AdamW"},
    {"train.learning_rate", "peak learning rate; for rsqrt the base of base / sqrt(max(step, warmup))"},
    {"train.schedule", "learning-rate schedule"},
    {"train.warmup_steps", "linear warm-up steps"},
    {"train.min_learning_rate", "floor reached by cosine and linear decay"},
    {"train.weight_decay", "decoupled weight decay (AdamW)"},
    {"train.adam_beta1", "AdamW beta1"},
    {"train.adam_beta2", "AdamW beta2"},
    {"train.adam_epsilon", "AdamW epsilon"},
    {"train.adafactor_decay_rate", "c in beta2_t = 1 - t^-c (T5X's sign)"},
    {"train.adafactor_clipping_threshold", "Adafactor update clipping"},
    {"train.adafactor_epsilon1", "Adafactor epsilon of the second moment"},
    {"train.adafactor_scale_parameter", "Adafactor steps each matrix by lr * max(epsilon2, rms of "
                                        "the matrix): T5X's multiply_by_parameter_scale, HF's "
                                        "scale_parameter; T5's lr 1/sqrt(step) assumes it"},
    {"train.adafactor_epsilon2", "Adafactor's floor on the parameter scale"},
    {"train.max_grad_norm", "global gradient-norm clipping; 0: off"},
    {"train.z_loss", "logit z-loss weight on log(Z)^2; 0: off"},
    {"train.seed", "seeds initialization, data order, dropout and jitter"},
    {"train.eval_every", "steps between validations; 0: never"},
    {"train.eval_batches", "global batches per validation"},
    {"train.backend", "`cpu` (oneDNN), `reference` (the oracle, slow) or `cuda`"},
    {"train.precision", "`bf16`: bf16 weight copies and activations, fp32 masters, router and losses"},
    {"train.cuda_graphs", "record the step as a CUDA graph and replay it (cuda, one process)"},
    {"train.max_skipped_steps", "consecutive non-finite steps skipped before the run stops"},
    {"parallel.data", "data-parallel ranks (ranks = data x model)"},
    {"parallel.model", "tensor-parallel ranks per model replica"},
    {"parallel.expert", "ranks the experts are sharded over (divides data)"},
    {"parallel.zero1", "shard the optimizer state of replicated parameters over data ranks"},
    {"parallel.bucket_mb", "MiB of gradients per reduction, launched during backward"},
    {"parallel.data_plane", "what carries tensors between ranks: MPI, or NCCL for GPU buffers"},
    {"parallel.timeout_s", "watchdog deadline of a collective, checkpoint I/O or data wait; exit 3"},
    {"checkpoint.every", "steps between checkpoints; 0: only at the end and on a stop signal"},
    {"checkpoint.keep", "newest checkpoints kept"},
    {"checkpoint.dir", "where checkpoints go; empty: RUN_DIR/checkpoints"},
    {"log.every", "steps between log lines and metrics.jsonl lines"},
    {"log.level", "console and train.log level"},
    {"log.run_dir", "run directory when --run-dir is not given; empty: runs/<config name>"},
    {"log.per_rank_files", "every rank also logs to RUN_DIR/rank-<r>.log"},
    {"log.collapse_share", "routing collapse warning: one expert over this share of a layer's tokens; 0: off"},
    {"log.collapse_logs", "... at this many logged steps in a row"},
    {"log.dead_expert_steps", "... or an expert no token chose for this many steps in a row"},
};

}  // namespace switcht5
