#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <string_view>

#include <unistd.h>

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "backend/backend.h"
#include "checkpoint/checkpoint.h"
#include "core/check.h"
#include "core/rng.h"
#include "model/flops.h"
#include "model/model.h"
#include "comm/communicator.h"
#include "train/grad_clip.h"

namespace switcht5 {

namespace {

// Colour the console's level names only where a person reads them: one process whose stdout is
// a terminal (TERM not "dumb", NO_COLOR unset: no-color.org). Under mpirun a rank's stdout is a
// pseudo-terminal even when mpirun's own output goes to a pipe or a file, so more than one
// process never colours: logs, pipes and SLURM output files stay plain text.
bool console_colours(const ProcessGrid& grid) {
  if (grid.world_size > 1 || ::isatty(STDOUT_FILENO) != 1) return false;
  // mpirun -np 1 (Open MPI; MPICH's hydra sets PMI_RANK): still a pseudo-terminal. Not
  // PMIX_RANK: Open MPI sets it in a process started without mpirun too.
  for (const char* launcher_var : {"OMPI_COMM_WORLD_SIZE", "PMI_RANK"})
    if (std::getenv(launcher_var) != nullptr) return false;
  if (std::getenv("NO_COLOR") != nullptr) return false;
  const char* term = std::getenv("TERM");
  return term != nullptr && std::string_view(term) != "dumb";
}

std::shared_ptr<spdlog::logger> make_logger(const RunConfig& cfg, const ProcessGrid& grid,
                                            const std::string& run_dir, bool append) {
  std::vector<spdlog::sink_ptr> sinks;
  if (grid.is_root()) {
    sinks.push_back(std::make_shared<spdlog::sinks::stdout_color_sink_mt>(
        console_colours(grid) ? spdlog::color_mode::always : spdlog::color_mode::never));
    sinks.push_back(
        std::make_shared<spdlog::sinks::basic_file_sink_mt>(run_dir + "/train.log", !append));
  }
  if (cfg.log.per_rank_files)
    sinks.push_back(std::make_shared<spdlog::sinks::basic_file_sink_mt>(
        fmt::format("{}/rank-{}.log", run_dir, grid.world_rank), !append));
  auto logger = std::make_shared<spdlog::logger>("switcht5", sinks.begin(), sinks.end());
  logger->set_level(spdlog::level::from_str(cfg.log.level));
  logger->set_pattern(grid.world_size > 1
                          ? fmt::format("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] [rank {}] %v",
                                        grid.world_rank)
                          : std::string("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v"));
  logger->flush_on(spdlog::level::info);
  return logger;
}

OptimizerOptions optimizer_options(const TrainConfig& tc) {
  OptimizerOptions oo;
  oo.name = tc.optimizer;
  oo.beta1 = tc.adam_beta1;
  oo.beta2 = tc.adam_beta2;
  oo.epsilon = tc.adam_epsilon;
  oo.weight_decay = tc.weight_decay;
  oo.decay_rate = tc.adafactor_decay_rate;
  oo.clipping_threshold = tc.adafactor_clipping_threshold;
  oo.epsilon1 = tc.adafactor_epsilon1;
  return oo;
}

// After the model's statistics (ModelStatsSlot, then RouterStatsSlot per Switch layer), the
// step's statistics array holds these sums of squares (backend memory, read back once a step):
enum StepStatsSlot : int {
  kLocalGradSq = 0,        // this rank's own gradients before the data-parallel sum: non-finite
                           // here means this rank produced the NaN/Inf
  kNormReplicated = 1,     // summed gradients of the three ParamStore regions
  kNormModelSplit = 2,
  kNormExperts = 3,
  kStepStatsExtra = 4,
};

}  // namespace

Trainer::Trainer(const RunConfig& cfg, ProcessGrid& grid, TrainerUse use,
                 const BackendFactory& make_backend_named)
    : cfg_(cfg), grid_(grid), local_rows_(cfg.train.batch_size / grid.data),
      micro_(local_rows_ / cfg.train.grad_accum_steps),
      be_(make_backend_named(cfg.train.backend)),
      schedule_({cfg.train.schedule, cfg.train.learning_rate, cfg.train.warmup_steps,
                 cfg.train.steps, cfg.train.min_learning_rate}),
      batches_(cfg.train.grad_accum_steps) {
  const ParallelConfig& pc = cfg.parallel;
  SWT_USER_CHECK(pc.data == grid.data && pc.model == grid.model && pc.expert == grid.expert,
                 "parallel = (data {}, model {}, expert {}) but the process grid is ({}, {}, {})",
                 pc.data, pc.model, pc.expert, grid.data, grid.model, grid.expert);
  SWT_CHECK(local_rows_ * grid.data == cfg.train.batch_size &&
                micro_ * cfg.train.grad_accum_steps == local_rows_,
            "batch {} does not split over {} data ranks x {} micro-batches",
            cfg.train.batch_size, grid.data, cfg.train.grad_accum_steps);
  const int Ti = cfg.data.inputs_length, Tt = cfg.data.targets_length;
  ModelParallelism mp;
  mp.expert_group = grid.expert_group.get();
  mp.model_group = grid.model_group.get();
  mp.sharding = Sharding{grid.expert, grid.expert_rank, grid.model, grid.model_rank};
  model_ = std::make_unique<SwitchT5Model>(*be_, cfg.model, ModelShape{micro_, Ti, Tt}, mp);
  ParamStore& ps = model_->params();
  ps.initialize(*be_, cfg.train.seed);
  if (cfg.train.precision == "bf16") ps.set_compute_dtype(*be_, DType::kBF16);

  // ZeRO-1: each replicated parameter is updated (and its optimizer state kept) by one data
  // rank, chosen greedily by size; the owner broadcasts the new values after the step. Expert
  // parameters are updated by every replica.
  owner_.assign(ps.infos().size(), -1);
  std::vector<bool> updates(ps.infos().size(), true);
  if (pc.zero1 && grid.data > 1) {
    std::vector<int64_t> load(grid.data, 0);
    for (size_t i = 0; i < ps.infos().size(); ++i) {
      if (ps.infos()[i].kind == ParamKind::kStacked) continue;
      const int r = int(std::min_element(load.begin(), load.end()) - load.begin());
      owner_[i] = r;
      load[r] += ps.infos()[i].numel;
      updates[i] = r == grid.data_rank;
    }
  }
  if (use == TrainerUse::kTrain) {
    optimizer_ = make_optimizer(optimizer_options(cfg.train), *be_, ps, updates,
                                grid.model_group.get());
    train_source_ = make_train_source(cfg, grid.data_rank, grid.data);
  }
  val_source_ = make_validation_source(cfg, grid.data_rank, grid.data);
  switch_layers_ = model_->switch_layer_names();
  step_stats_ = DeviceArray<double>(*be_, model_->statistics_size() + kStepStatsExtra);
  host_stats_.assign(step_stats_.size(), 0.0);
  step_flops_ = 3.0 * forward_matmul_flops(cfg.model, cfg.train.batch_size, Ti, Tt, true);
  if (const char* env = std::getenv("SWITCHT5_INJECT_NAN")) {
    long long s = -1;
    int r = -1;
    SWT_USER_CHECK(std::sscanf(env, "%lld:%d", &s, &r) == 2,
                   "SWITCHT5_INJECT_NAN=\"{}\": expected STEP:RANK", env);
    inject_nan(s, r);
  }
}

Trainer::~Trainer() = default;

TrainingState Trainer::checkpoint_state(int64_t step) {
  TrainingState s{.config = cfg_, .grid = grid_, .backend = *be_, .params = model_->params()};
  s.param_owner = owner_;
  s.step = step;
  s.consecutive_skips = consecutive_skips_;
  if (optimizer_) {
    s.optimizer_state = optimizer_->state();
    s.optimizer_steps = optimizer_->steps_taken();
  }
  if (train_source_) s.loader_state = train_source_->state();
  return s;
}

void Trainer::restore(const TrainingState& s) {
  SWT_CHECK(optimizer_ && train_source_, "restore: a trainer built for evaluation has no "
                                         "training state");
  optimizer_->set_steps_taken(s.optimizer_steps);
  consecutive_skips_ = s.consecutive_skips;
  train_source_->restore(s.loader_state);
}

double Trainer::evaluate() {
  const TrainConfig& tc = cfg_.train;
  if (!val_source_) return std::numeric_limits<double>::quiet_NaN();
  be_->zero_bytes(step_stats_.data(), step_stats_.bytes());
  val_source_->rewind();
  for (int e = 0; e < tc.eval_batches; ++e) {
    val_source_->next(local_);
    for (int m = 0; m < tc.grad_accum_steps; ++m) {
      local_.slice_rows(m * micro_, micro_, eval_batch_);
      model_->forward_accumulate(eval_batch_, /*training=*/false, 0, 0, step_stats_.data());
    }
  }
  be_->copy_to_host(host_stats_.data(), step_stats_.data(), step_stats_.bytes());
  double sums[2] = {host_stats_[kCeSum], host_stats_[kTargetTokens]};
  grid_.data_group->all_reduce_sum(sums, 2);
  return sums[1] > 0 ? sums[0] / sums[1] : 0.0;
}

void Trainer::sync_gradients() {
  ParamStore& ps = model_->params();
  const int64_t expert_begin = ps.expert_region_begin();
  // Non-expert gradients: summed over every data rank. Expert gradients: only over the ranks
  // holding the same experts (each expert group member holds different experts).
  if (grid_.data > 1) grid_.data_group->all_reduce_sum(ps.grads(), expert_begin);
  if (grid_.expert_replica_group->size() > 1)
    grid_.expert_replica_group->all_reduce_sum(ps.grads() + expert_begin,
                                               ps.total_numel() - expert_begin);
}

void Trainer::accumulate_grad_norm_squares(double* extra) {
  // After sync, a gradient is identical on the ranks that hold the same block: one sum of
  // squares per ParamStore region, combined over the right groups in global_grad_norm.
  ParamStore& ps = model_->params();
  const int64_t split = ps.model_split_region_begin(), experts = ps.expert_region_begin();
  be_->accumulate_sum_squares(extra + kNormReplicated, ps.grads(), split);
  be_->accumulate_sum_squares(extra + kNormModelSplit, ps.grads() + split, experts - split);
  be_->accumulate_sum_squares(extra + kNormExperts, ps.grads() + experts,
                              ps.total_numel() - experts);
}

double Trainer::global_grad_norm(const double* extra) {
  // Replicated tensors count once; model-split blocks are summed over the model group, experts
  // over the expert group (and the model group when split).
  double sq[3] = {extra[kNormReplicated], extra[kNormModelSplit], extra[kNormExperts]};
  grid_.expert_group->all_reduce_sum(&sq[2], 1);
  grid_.model_group->all_reduce_sum(&sq[1], 2);
  return std::sqrt(sq[0] + sq[1] + sq[2]);
}

std::string Trainer::first_nonfinite() {
  // Router logits first (a router blowing up is the usual first sign), then the gradients in
  // parameter order.
  std::string what = model_->first_nonfinite_router_logits();
  if (!what.empty()) return what + " router logits";
  ParamStore& ps = model_->params();
  for (const ParamInfo& p : ps.infos())
    if (be_->count_nonfinite(ps.grads() + p.offset, p.numel) > 0) return p.name + " gradient";
  return "loss";
}

StepMetrics Trainer::train_step(int64_t step) {
  const TrainConfig& tc = cfg_.train;
  const auto t0 = std::chrono::steady_clock::now();
  ParamStore& ps = model_->params();
  train_source_->next(local_);
  int64_t tokens = 0;
  for (int m = 0; m < tc.grad_accum_steps; ++m) {
    local_.slice_rows(m * micro_, micro_, batches_[m]);
    tokens += batches_[m].target_tokens();
  }
  grid_.data_group->all_reduce_sum(&tokens, 1);
  // Weights that make the sum over micro-batches and data ranks the global-batch objective.
  LossWeights w;
  w.ce_scale = tokens > 0 ? 1.0 / double(tokens) : 0.0;
  w.logit_z_loss = tc.z_loss;
  w.microbatches = double(tc.grad_accum_steps) * grid_.data;
  ps.zero_grads(*be_);
  const size_t layers = switch_layers_.size();
  const int E = cfg_.model.num_experts;
  const int64_t stride = router_stats_size(E);
  const int64_t model_stats = model_->statistics_size();
  be_->zero_bytes(step_stats_.data(), step_stats_.bytes());
  const uint64_t seed = derive_seed(derive_seed(tc.seed, 0xD80u), uint64_t(step));
  for (int m = 0; m < tc.grad_accum_steps; ++m) {
    const uint64_t first_row = uint64_t(grid_.data_rank) * local_rows_ + uint64_t(m) * micro_;
    model_->forward_accumulate(batches_[m], /*training=*/true, seed, first_row,
                               step_stats_.data());
    model_->backward(w);
  }
  if (step == inject_step_ && grid_.world_rank == inject_rank_) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    be_->copy_to_device(ps.grads(), &nan, sizeof(float));
  }
  // Whether this rank's own gradients went non-finite, before the sums spread it.
  double* extra = step_stats_.data() + model_stats;
  be_->accumulate_sum_squares(extra + kLocalGradSq, ps.grads(), ps.total_numel());
  sync_gradients();
  accumulate_grad_norm_squares(extra);
  // The step's one read-back: losses, router statistics, non-finite check, norm partials.
  be_->copy_to_host(host_stats_.data(), step_stats_.data(), step_stats_.bytes());
  const double* host_extra = host_stats_.data() + model_stats;
  const bool local_bad =
      !std::isfinite(host_stats_[kCeSum]) || !std::isfinite(host_extra[kLocalGradSq]);
  // Named now, before the router statistics are summed; only on a bad step (the search reads
  // tensors back one by one). Gradients are already summed here: a rank that was bad on its
  // own names the first non-finite tensor it then holds.
  std::string what = local_bad ? first_nonfinite() : std::string();
  grid_.data_group->all_reduce_sum(host_stats_.data(), model_stats);
  const double loss = w.ce_scale * host_stats_[kCeSum];
  double grad_norm = global_grad_norm(host_extra);

  StepMetrics m;
  m.step = step;
  m.loss = loss;
  m.lr = schedule_.lr(step);
  m.grad_norm = grad_norm;
  // Every rank decides together: skip when any rank saw a non-finite value.
  int64_t bad = (std::isfinite(loss) && std::isfinite(grad_norm)) ? 0 : 1;
  grid_.world->all_reduce_max(&bad, 1);
  if (bad) {
    // Report the first rank (in world order) whose own values were non-finite, and what.
    int64_t key = local_bad ? int64_t(grid_.world_size - grid_.world_rank) : -1;
    grid_.world->all_reduce_max(&key, 1);
    const int root = key > 0 ? int(grid_.world_size - key) : 0;
    if (key <= 0) what = "gradient norm (overflow in the sum)";
    grid_.world->broadcast(what, root);
    m.skipped = true;
    m.nonfinite = fmt::format("{} (rank {})", what, root);
    ++consecutive_skips_;
    SWT_CHECK(consecutive_skips_ <= tc.max_skipped_steps,
              "{} consecutive steps had a non-finite loss or gradient (train.max_skipped_steps = "
              "{}); the last, step {}, first at {}",
              consecutive_skips_, tc.max_skipped_steps, step, m.nonfinite);
  } else {
    consecutive_skips_ = 0;
    clip_grad_norm_scaled(*be_, ps, grad_norm, tc.max_grad_norm);
    optimizer_->step(*be_, ps, float(m.lr));
    // ZeRO-1: owners broadcast the parameters they updated.
    for (size_t i = 0; i < ps.infos().size(); ++i)
      if (owner_[i] >= 0)
        grid_.data_group->broadcast(ps.values() + ps.infos()[i].offset, ps.infos()[i].numel,
                                    owner_[i]);
    ps.refresh_compute_copy(*be_);  // bf16: the GEMMs' copy of the new master weights
  }
  be_->synchronize();
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  double routed = 0.0, dropped = 0.0;
  for (size_t l = 0; l < layers; ++l) {
    const double* a = host_stats_.data() + kModelStatsFixed + int64_t(l) * stride;
    const double calls = a[kRouterCalls], tokens = a[kRouterTokens];
    LayerRouting r;
    r.layer = switch_layers_[l];
    r.aux_loss = a[kRouterBalanceSum] / calls;
    r.z_loss = a[kRouterZSum] / calls;
    r.dropped_fraction = tokens > 0 ? a[kRouterDropped] / tokens : 0.0;
    for (int e = 0; e < E; ++e)
      r.expert_fraction.push_back(tokens > 0 ? a[kRouterStatsFixed + e] / tokens : 0.0);
    m.aux_loss += r.aux_loss / double(layers);
    m.z_loss += r.z_loss / double(layers);
    routed += tokens;
    dropped += a[kRouterDropped];
    m.routing.push_back(std::move(r));
  }
  m.dropped_fraction = routed > 0 ? dropped / routed : 0.0;
  m.step_ms = secs * 1e3;
  m.tokens_per_s =
      double(tc.batch_size) * (cfg_.data.inputs_length + cfg_.data.targets_length) / secs;
  return m;
}

namespace {

// JSON has no NaN or Infinity: a non-finite number (a skipped step's loss or gradient norm) is
// written as null.
std::string json_number(double v, const char* format = "{:.9g}") {
  return std::isfinite(v) ? fmt::format(fmt::runtime(format), v) : std::string("null");
}

std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      out += fmt::format("\\u{:04x}", int(c));
      continue;
    }
    out += c;
  }
  return out + "\"";
}

}  // namespace

std::string metrics_json(const StepMetrics& m) {
  std::string s = fmt::format(
      "{{\"step\": {}, \"loss\": {}, \"aux_loss\": {}, \"z_loss\": {}, \"lr\": {}, "
      "\"grad_norm\": {}, \"tokens_per_s\": {}, \"dropped_fraction\": {}, \"step_ms\": {}",
      m.step, json_number(m.loss), json_number(m.aux_loss), json_number(m.z_loss),
      json_number(m.lr), json_number(m.grad_norm), json_number(m.tokens_per_s, "{:.6g}"),
      json_number(m.dropped_fraction), json_number(m.step_ms, "{:.6g}"));
  if (m.skipped) s += ", \"skipped\": true, \"nonfinite\": " + json_string(m.nonfinite);
  if (m.has_val) s += ", \"val_loss\": " + json_number(m.val_loss);
  if (!m.routing.empty()) {
    s += ", \"router\": [";
    for (size_t i = 0; i < m.routing.size(); ++i) {
      const LayerRouting& r = m.routing[i];
      std::string fractions;
      for (size_t e = 0; e < r.expert_fraction.size(); ++e)
        fractions += (e ? ", " : "") + json_number(r.expert_fraction[e], "{:.6g}");
      s += fmt::format("{}{{\"layer\": {}, \"aux_loss\": {}, \"z_loss\": {}, "
                       "\"dropped_fraction\": {}, \"expert_fraction\": [{}]}}",
                       i ? ", " : "", json_string(r.layer), json_number(r.aux_loss, "{:.6g}"),
                       json_number(r.z_loss, "{:.6g}"), json_number(r.dropped_fraction, "{:.6g}"),
                       fractions);
    }
    s += "]";
  }
  return s + "}";
}

namespace {

// The stop request of a SIGTERM / SIGUSR1 handler. A signal handler can only reach a global: this
// is the one global of the trainer, written by the handler and read by train() between steps.
volatile std::sig_atomic_t g_stop_signal = 0;

extern "C" void on_stop_signal(int signo) { g_stop_signal = signo; }

// Installs the handlers for the duration of train() and restores the previous ones after.
class StopSignals {
 public:
  StopSignals() {
    g_stop_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, &old_term_);
    sigaction(SIGUSR1, &sa, &old_usr1_);
  }
  ~StopSignals() {
    sigaction(SIGTERM, &old_term_, nullptr);
    sigaction(SIGUSR1, &old_usr1_, nullptr);
  }
  // The signal any rank received, agreed by every rank (collective).
  static int agreed(Communicator& world) {
    int64_t s = g_stop_signal;
    world.all_reduce_max(&s, 1);
    return int(s);
  }

 private:
  struct sigaction old_term_ {}, old_usr1_ {};
};

}  // namespace

TrainResult train(const RunConfig& cfg, ProcessGrid& grid, const std::string& run_dir,
                  const TrainOptions& options) {
  const std::string ckpt_dir = checkpoint_dir(cfg, run_dir);
  // Which checkpoint to resume from, decided by rank 0 (it may be the only one to see the
  // directory first) and shared.
  std::string resume_path;
  if (!options.resume.empty()) {
    if (grid.is_root()) resume_path = resolve_resume(options.resume, ckpt_dir);
    grid.world->broadcast(resume_path, 0);
  }
  const bool resuming = !resume_path.empty();
  if (grid.is_root()) std::filesystem::create_directories(run_dir);
  grid.world->barrier();  // the run directory exists before any rank opens a log in it
  if (cfg.log.per_rank_files) std::filesystem::create_directories(run_dir);
  auto log = make_logger(cfg, grid, run_dir, /*append=*/resuming);
  log->info("switcht5 train: run dir {}, config {}", run_dir, cfg.source_path);
  log->info("resolved config:\n{}", to_yaml(cfg));

  const TrainConfig& tc = cfg.train;
  Trainer trainer(cfg, grid, TrainerUse::kTrain, options.make_backend_named);
  log->info("{} processes: data {} x model {}, experts over groups of {}{}; backend {}; {} "
            "parameters on this rank ({:.1f} MB fp32); micro-batch {} x ({} + {}) tokens, {} "
            "micro-batches per step; {:.3g} GFLOP of matmul per global step",
            grid.world_size, grid.data, grid.model, grid.expert,
            cfg.parallel.zero1 ? ", ZeRO-1 optimizer sharding" : "", trainer.backend().name(),
            trainer.model().params().total_numel(), trainer.model().params().total_numel() * 4e-6,
            tc.batch_size / (grid.data * tc.grad_accum_steps), cfg.data.inputs_length,
            cfg.data.targets_length, tc.grad_accum_steps, trainer.step_flops() * 1e-9);

  TrainResult result;
  if (resuming) {
    TrainingState state = trainer.checkpoint_state();
    const LoadResult lr = load_checkpoint(state, resume_path, /*training_state=*/true);
    if (lr.training_state) trainer.restore(state);
    result.start_step = lr.step;
    log->info("resumed from {} (step {}, saved with {}){}", resume_path, lr.step, lr.layout,
              lr.training_state ? ""
                                : "; it holds parameters only: fresh optimizer state and data "
                                  "position");
  } else if (options.resume == "auto") {
    log->info("--resume auto: no checkpoint in {}; starting from step 0", ckpt_dir);
  }

  // Written only now, so that a failed resume leaves the run directory as it was.
  std::ofstream metrics;
  if (grid.is_root()) {
    std::ofstream f(run_dir + "/config.yaml");
    SWT_USER_CHECK(f.good(), "{}/config.yaml: cannot write to the run directory", run_dir);
    f << to_yaml(cfg);
    metrics.open(run_dir + "/metrics.jsonl", resuming ? std::ios::app : std::ios::trunc);
    SWT_USER_CHECK(metrics.good(), "{}/metrics.jsonl: cannot write to the run directory", run_dir);
  }
  auto save = [&](int64_t step, const char* why) {
    const SaveResult s = save_checkpoint(trainer.checkpoint_state(step), ckpt_dir);
    log->info("checkpoint {} ({}): {:.1f} MB in {:.2f} s", s.path, why, s.bytes * 1e-6, s.seconds);
    result.checkpoints.push_back(s.path);
  };
  StopSignals signals;
  int64_t saved_step = -1;
  for (int64_t step = result.start_step + 1; step <= tc.steps; ++step) {
    StepMetrics m = trainer.train_step(step);
    result.final_loss = m.loss;
    result.last_step = step;
    if (m.skipped)
      log->warn("step {}: non-finite loss or gradient, update skipped on every rank; first "
                "non-finite: {}",
                step, m.nonfinite);
    const bool do_eval = tc.eval_every > 0 && (step % tc.eval_every == 0 || step == tc.steps);
    const bool do_log =
        step % cfg.log.every == 0 || step == 1 || step == tc.steps || do_eval || m.skipped;
    if (do_log) {
      if (do_eval && trainer.has_validation()) {
        m.has_val = true;
        m.val_loss = trainer.evaluate();
      }
      log->info("step {:>6} | loss {:.4f} | aux {:.4f} | z {:.4f} | lr {:.3e} | gnorm {:.3f} | "
                "drop {:.3f} | {:.1f} ms | {:.0f} tok/s | {:.1f} GFLOP/s{}",
                step, m.loss, m.aux_loss, m.z_loss, m.lr, m.grad_norm, m.dropped_fraction,
                m.step_ms, m.tokens_per_s, trainer.step_flops() / m.step_ms * 1e-6,
                m.has_val ? fmt::format(" | val_loss {:.4f}", m.val_loss) : "");
      if (grid.is_root()) {
        metrics << metrics_json(m) << "\n";
        metrics.flush();
      }
      result.logged.push_back(std::move(m));
    }
    if (cfg.checkpoint.every > 0 && step % cfg.checkpoint.every == 0) {
      save(step, "every checkpoint.every steps");
      saved_step = step;
    }
    // A signal during the last step changes nothing: the end-of-training save follows.
    if (const int sig = step < tc.steps ? StopSignals::agreed(*grid.world) : 0) {
      log->warn("received {}: saving a checkpoint after step {} and stopping",
                sig == SIGTERM ? "SIGTERM" : sig == SIGUSR1 ? "SIGUSR1" : "a signal", step);
      if (saved_step != step) save(step, "stop signal");
      result.stop_signal = sig;
      log->info("stopped at step {} of {}; continue with --resume auto", step, tc.steps);
      spdlog::drop("switcht5");
      return result;
    }
  }
  if (result.last_step > 0 && saved_step != result.last_step) save(result.last_step, "end of training");
  if (result.last_step == 0)
    log->info("nothing to train: the checkpoint is at step {} of train.steps = {}",
              result.start_step, tc.steps);
  log->info("done: {} steps, final loss {:.4f}", tc.steps, result.final_loss);
  spdlog::drop("switcht5");
  return result;
}

TrainResult train(const RunConfig& cfg, const std::string& run_dir, const TrainOptions& options) {
  ProcessGrid grid = ProcessGrid::create(make_self_communicator(), cfg.parallel.data,
                                         cfg.parallel.model, cfg.parallel.expert);
  return train(cfg, grid, run_dir, options);
}

}  // namespace switcht5
