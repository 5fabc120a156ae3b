// The run configuration: one YAML file (configs/*.yaml) with optional sections
//   model, data, train, parallel, checkpoint, log
// each a map of key: value, plus `--set section.key=value` overrides from the command line.
//
// Every section and every key is optional; a missing key keeps the default written below.
// Every value is validated (type, range, allowed values, and rules across keys) and a bad one
// throws UserError with ONE line naming where it came from, the full key, the value and what
// is allowed, e.g.
//   configs/x.yaml:7: model.d_model: got "abc", expected an integer >= 1
//   --set model.num_heads=0: model.num_heads: got 0, expected an integer >= 1
// to_yaml() writes the resolved config (every key) so a run directory records exactly what ran;
// parse_config() reads it back to an equal RunConfig.
//
// The model keys are named as in HuggingFace SwitchTransformersConfig where HF has the key, so a
// config.json reads across; the keys HF lacks (capacity_factor, group_size, init_scale,
// expert_dropout) come from the Switch Transformer paper (Fedus et al. 2021) and flaxformer.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace switcht5 {

struct ModelConfig {
  int vocab_size = 32128;
  int d_model = 768;
  int d_ff = 2048;               // hidden size of each dense MLP and of each expert
  int d_kv = 64;                 // per-head size; attention inner size is num_heads * d_kv
  int num_heads = 12;
  int num_layers = 12;           // encoder blocks
  int num_decoder_layers = -1;   // decoder blocks; when absent from the file, = num_layers
  int num_experts = 8;           // may be 0 only for a dense model (both sparse steps 0)
  int expert_capacity = 0;       // tokens per expert per group; 0: from capacity_factor
  double router_jitter_noise = 0.01;  // router input *= U(1 - eps, 1 + eps) while training
  double router_z_loss_coef = 0.001;  // router z-loss weight (ST-MoE), 0 = off
  double router_aux_loss_coef = 0.01; // load-balancing loss alpha (Switch paper eq. 4)
  int encoder_sparse_step = 2;   // see is_sparse_layer(); 0 = dense stack
  int decoder_sparse_step = 2;
  int relative_attention_num_buckets = 32;
  int relative_attention_max_distance = 128;
  double dropout_rate = 0.1;
  std::string feed_forward_proj = "relu";  // "relu" or "gated-gelu"
  bool tie_word_embeddings = true;   // LM head = embedding^T, logits scaled by d_model^-0.5
  double layer_norm_epsilon = 1e-6;
  int pad_token_id = 0;
  int eos_token_id = 1;
  int decoder_start_token_id = 0;
  double capacity_factor = 1.0;       // training capacity factor
  double eval_capacity_factor = 2.0;  // evaluation capacity factor
  int group_size = 0;            // tokens per routing group; 0: one sequence per group
  double init_scale = 0.1;       // weight init std multiplier s (paper Sec 2.3: 0.1)
  double expert_dropout = 0.1;   // dropout inside the experts (paper Table 4)
  // Benchmarks only (Megatron-Core's moe_router_force_load_balancing): the router's logits are
  // replaced by uniform noise, so top-1 routing is uniform at random over the experts, as a
  // balanced trained router's is, whatever these weights would do. Not a way to train.
  bool router_force_balance = false;

  bool operator==(const ModelConfig&) const = default;
};

struct DataConfig {
  std::string source = "synthetic";  // "shards" (tokenized C4, span corruption) or "synthetic"
  std::string task = "reverse";      // synthetic task: "reverse", "copy" or "span_corruption"
  int inputs_length = 512;           // encoder tokens per sequence
  int targets_length = 114;          // decoder tokens per sequence
  int synthetic_vocab = 0;           // synthetic tokens drawn below this id; 0: whole vocab
  std::string train_glob = "";       // token shards for training (source: shards)
  std::string val_glob = "";         // token shards for validation ("": no validation data)
  double noise_density = 0.15;       // T5 span corruption: fraction of tokens masked
  double mean_noise_span_length = 3.0;
  int extra_ids = 100;               // sentinels <extra_id_0..N-1> above the SentencePiece ids
  int shuffle_window = 1024;         // pieces shuffled together (seeded, per epoch)
  int prefetch = 2;                  // batches prepared ahead by the loader thread; 0: inline
  bool verify_checksums = true;      // crc32 of every shard when it is opened

  bool operator==(const DataConfig&) const = default;
};

struct TrainConfig {
  int64_t steps = 1000;
  int batch_size = 8;              // global batch, in sequences, per optimizer step
  int grad_accum_steps = 1;        // microbatch = batch_size / grad_accum_steps sequences
  std::string optimizer = "adafactor";  // "adafactor" or "adamw"
  double learning_rate = 0.01;     // peak lr; for rsqrt the base: lr = base / sqrt(max(step, warmup))
  std::string schedule = "rsqrt";  // "rsqrt", "cosine", "linear" or "constant"
  int64_t warmup_steps = 0;
  double min_learning_rate = 0.0;  // floor reached by cosine / linear decay
  double weight_decay = 0.0;
  double adam_beta1 = 0.9;
  double adam_beta2 = 0.999;
  double adam_epsilon = 1e-8;
  double adafactor_decay_rate = 0.8;  // c in beta2_t = 1 - t^(-c) (t5x sign; HF writes -0.8)
  double adafactor_clipping_threshold = 1.0;
  double adafactor_epsilon1 = 1e-30;
  bool adafactor_scale_parameter = false;  // step lr * max(epsilon2, rms(p)): T5X's default
  double adafactor_epsilon2 = 1e-3;
  double max_grad_norm = 0.0;      // global-norm clipping, 0 = off
  double z_loss = 1e-4;            // logit z-loss weight on log(Z)^2, 0 = off
  uint64_t seed = 0;
  int64_t eval_every = 0;          // steps between evaluations, 0 = never
  int eval_batches = 1;
  std::string backend = "cpu";     // "cpu", "reference" or "cuda"
  // "fp32", or "bf16": fp32 master weights, gradients and optimizer state; bf16 compute copies
  // of the weights and bf16 activations; router, losses and normalisation statistics in fp32.
  std::string precision = "fp32";
  int max_skipped_steps = 5;       // consecutive non-finite steps skipped before the run stops
  // Record the step's forward and backward as a CUDA graph after one eager step and replay it
  // (backend cuda, one process): fewer kernel launches, the same results bitwise.
  bool cuda_graphs = false;

  bool operator==(const TrainConfig&) const = default;
};

// Degrees of parallelism. The trainer checks that they multiply to the number of ranks.
struct ParallelConfig {
  int data = 1;
  int model = 1;
  int expert = 1;
  bool zero1 = false;  // shard optimizer state of replicated parameters over the data ranks
  double bucket_mb = 25.0;  // MiB of gradients per data-plane reduction (train/gradient_reducer.h)
  // What carries backend buffers between ranks (comm/data_plane.h): "mpi" (any backend; device
  // memory staged through the host) or "nccl" (train.backend cuda, a build with NCCL). The
  // default stays mpi for cuda too: it runs everywhere, and NCCL is asked for where it exists.
  std::string data_plane = "mpi";
  // Seconds one collective may take; past it the watchdog ends the job on every rank with one
  // message (exit code 3; comm/watchdog.h).
  double timeout_s = 600.0;

  bool operator==(const ParallelConfig&) const = default;
};

struct CheckpointConfig {
  int64_t every = 0;     // steps between checkpoints; 0: only at the end (and on SIGTERM/SIGUSR1)
  int keep = 3;          // newest checkpoints kept
  std::string dir = "";  // "": <log.run_dir>/checkpoints

  bool operator==(const CheckpointConfig&) const = default;
};

struct LogConfig {
  int64_t every = 10;           // steps between log lines
  std::string level = "info";   // "trace", "debug", "info", "warn" or "error"
  std::string run_dir = "";     // "": chosen by the trainer
  bool per_rank_files = false;  // every rank also logs to <run_dir>/rank-<r>.log
  // Routing collapse warning (train/telemetry.h): one expert over collapse_share of a Switch
  // layer's tokens at collapse_logs logged steps in a row (0: off), or an expert no token chose
  // for dead_expert_steps steps in a row.
  double collapse_share = 0.8;
  int collapse_logs = 3;
  int64_t dead_expert_steps = 100;

  bool operator==(const LogConfig&) const = default;
};

struct RunConfig {
  ModelConfig model;
  DataConfig data;
  TrainConfig train;
  ParallelConfig parallel;
  CheckpointConfig checkpoint;
  LogConfig log;
  std::string source_path;  // the file (or source name) this config was read from

  bool operator==(const RunConfig&) const = default;
};

// The largest config file read (1 MiB): real ones are a few KB, and a larger file is refused
// before it is read.
inline constexpr uint64_t kMaxConfigBytes = uint64_t(1) << 20;

// Reads and validates the YAML file at `path` (a regular file of at most kMaxConfigBytes), then
// applies `overrides` ("section.key=value" strings from --set, in order; a later one wins).
// Throws UserError on any bad input.
RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides);

// As load_config, from text; `source_name` stands for the file name in messages.
RunConfig parse_config(const std::string& yaml_text, const std::string& source_name,
                       const std::vector<std::string>& overrides);

// The full resolved config, every key of every section, as YAML that parse_config reads back to
// an equal RunConfig (given the same source name).
std::string to_yaml(const RunConfig& config);

// The README's config reference: a markdown table of every key (section.key, type, default,
// allowed values, meaning) from the key table and its rules (config.cpp) and the meanings in
// config/config_docs.h. `switcht5 config-reference` prints it; tests/test_config.cpp compares it
// with the README.
std::string config_reference_markdown();

}  // namespace switcht5
