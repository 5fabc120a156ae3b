#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "backend/backend.h"
#include "core/check.h"
#include "core/rng.h"
#include "model/flops.h"
#include "model/model.h"
#include "train/grad_clip.h"

namespace switcht5 {

namespace {

// Accumulates routing statistics over micro-batches and Switch layers.
struct RouterTotals {
  double balance = 0.0, z = 0.0;
  int64_t layer_calls = 0, tokens = 0, dropped = 0;
  void add(const ForwardStats& st) {
    for (const auto* layers : {&st.encoder_router, &st.decoder_router})
      for (const RouterStats& r : *layers) {
        balance += r.balance_loss;
        z += r.z_loss;
        tokens += r.tokens;
        dropped += r.dropped;
        ++layer_calls;
      }
  }
};

std::shared_ptr<spdlog::logger> make_logger(const std::string& run_dir, const std::string& level) {
  auto console = std::make_shared<spdlog::sinks::stdout_color_sink_mt>();
  auto file = std::make_shared<spdlog::sinks::basic_file_sink_mt>(run_dir + "/train.log", true);
  auto logger = std::make_shared<spdlog::logger>("switcht5", spdlog::sinks_init_list{console, file});
  logger->set_level(spdlog::level::from_str(level));
  logger->set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");
  logger->flush_on(spdlog::level::info);
  return logger;
}

}  // namespace

std::string metrics_json(const StepMetrics& m) {
  std::string s = fmt::format(
      "{{\"step\": {}, \"loss\": {:.9g}, \"aux_loss\": {:.9g}, \"z_loss\": {:.9g}, \"lr\": {:.9g}, "
      "\"grad_norm\": {:.9g}, \"tokens_per_s\": {:.6g}, \"dropped_fraction\": {:.9g}, "
      "\"step_ms\": {:.6g}",
      m.step, m.loss, m.aux_loss, m.z_loss, m.lr, m.grad_norm, m.tokens_per_s,
      m.dropped_fraction, m.step_ms);
  if (m.has_val) s += fmt::format(", \"val_loss\": {:.9g}", m.val_loss);
  return s + "}";
}

static OptimizerOptions optimizer_options(const TrainConfig& tc) {
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

Trainer::Trainer(const RunConfig& cfg)
    : cfg_(cfg), micro_(cfg.train.batch_size / cfg.train.grad_accum_steps),
      be_(make_backend(cfg.train.backend)),
      schedule_({cfg.train.schedule, cfg.train.learning_rate, cfg.train.warmup_steps,
                 cfg.train.steps, cfg.train.min_learning_rate}),
      train_source_(make_train_source(cfg, /*rank=*/0, /*ranks=*/1)),
      val_source_(make_validation_source(cfg, 0, 1)), batches_(cfg.train.grad_accum_steps) {
  const int Ti = cfg.data.inputs_length, Tt = cfg.data.targets_length;
  model_ = std::make_unique<SwitchT5Model>(*be_, cfg.model, ModelShape{micro_, Ti, Tt});
  model_->params().initialize(*be_, cfg.train.seed);
  optimizer_ = make_optimizer(optimizer_options(cfg.train), *be_, model_->params());
  step_flops_ = 3.0 * forward_matmul_flops(cfg.model, cfg.train.batch_size, Ti, Tt, true);
}

Trainer::~Trainer() = default;

double Trainer::evaluate() {
  const TrainConfig& tc = cfg_.train;
  if (!val_source_) return std::numeric_limits<double>::quiet_NaN();
  double ce = 0.0;
  int64_t tokens = 0;
  val_source_->rewind();
  for (int e = 0; e < tc.eval_batches; ++e) {
    val_source_->next(local_);
    for (int m = 0; m < tc.grad_accum_steps; ++m) {
      local_.slice_rows(m * micro_, micro_, eval_batch_);
      const ForwardStats& st = model_->forward(eval_batch_, /*training=*/false, 0);
      ce += st.ce_sum;
      tokens += st.target_tokens;
    }
  }
  return tokens > 0 ? ce / tokens : 0.0;
}

StepMetrics Trainer::train_step(int64_t step) {
  const TrainConfig& tc = cfg_.train;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t global_tokens = 0;
  train_source_->next(local_);
  for (int m = 0; m < tc.grad_accum_steps; ++m) {
    local_.slice_rows(m * micro_, micro_, batches_[m]);
    global_tokens += batches_[m].target_tokens();
  }
  // Weights that make the sum over micro-batches the global-batch objective (model.h).
  LossWeights w;
  w.ce_scale = global_tokens > 0 ? 1.0 / double(global_tokens) : 0.0;
  w.logit_z_loss = tc.z_loss;
  w.microbatches = tc.grad_accum_steps;
  model_->params().zero_grads(*be_);
  double ce = 0.0;
  RouterTotals router;
  for (int m = 0; m < tc.grad_accum_steps; ++m) {
    const uint64_t seed = derive_seed(derive_seed(tc.seed, 0xD80u), uint64_t(step) * 4096 + m);
    const ForwardStats& st = model_->forward(batches_[m], /*training=*/true, seed);
    model_->backward(w);
    ce += st.ce_sum;
    router.add(st);
  }
  const double grad_norm = clip_grad_norm(*be_, model_->params(), tc.max_grad_norm);
  const double loss = w.ce_scale * ce;
  SWT_CHECK(std::isfinite(loss) && std::isfinite(grad_norm),
            "non-finite loss ({}) or gradient norm ({}) at step {}", loss, grad_norm, step);
  const double lr = schedule_.lr(step);
  optimizer_->step(*be_, model_->params(), float(lr));
  be_->synchronize();
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  StepMetrics m;
  m.step = step;
  m.loss = loss;
  m.aux_loss = router.layer_calls ? router.balance / router.layer_calls : 0.0;
  m.z_loss = router.layer_calls ? router.z / router.layer_calls : 0.0;
  m.lr = lr;
  m.grad_norm = grad_norm;
  m.step_ms = secs * 1e3;
  m.tokens_per_s =
      double(tc.batch_size) * (cfg_.data.inputs_length + cfg_.data.targets_length) / secs;
  m.dropped_fraction = router.tokens ? double(router.dropped) / router.tokens : 0.0;
  return m;
}

TrainResult train(const RunConfig& cfg, const std::string& run_dir) {
  std::filesystem::create_directories(run_dir);
  {
    std::ofstream f(run_dir + "/config.yaml");
    SWT_USER_CHECK(f.good(), "{}/config.yaml: cannot write to the run directory", run_dir);
    f << to_yaml(cfg);
  }
  auto log = make_logger(run_dir, cfg.log.level);
  SWT_USER_CHECK(cfg.parallel.data * cfg.parallel.model == 1,
                 "parallel.data x parallel.model = {} x {} = {}, but this run has 1 process",
                 cfg.parallel.data, cfg.parallel.model, cfg.parallel.data * cfg.parallel.model);
  log->info("switcht5 train: run dir {}, config {}", run_dir, cfg.source_path);
  log->info("resolved config:\n{}", to_yaml(cfg));

  const TrainConfig& tc = cfg.train;
  Trainer trainer(cfg);
  log->info("backend {}; {} parameters ({:.1f} MB fp32); micro-batch {} x ({} + {}) tokens, {} "
            "micro-batches per step; {:.3g} GFLOP of matmul per step",
            trainer.backend().name(), trainer.model().params().total_numel(),
            trainer.model().params().total_numel() * 4e-6, tc.batch_size / tc.grad_accum_steps,
            cfg.data.inputs_length, cfg.data.targets_length, tc.grad_accum_steps,
            trainer.step_flops() * 1e-9);

  std::ofstream metrics(run_dir + "/metrics.jsonl");
  SWT_USER_CHECK(metrics.good(), "{}/metrics.jsonl: cannot write to the run directory", run_dir);
  TrainResult result;
  for (int64_t step = 1; step <= tc.steps; ++step) {
    StepMetrics m = trainer.train_step(step);
    result.final_loss = m.loss;
    const bool do_eval = tc.eval_every > 0 && (step % tc.eval_every == 0 || step == tc.steps);
    const bool do_log = step % cfg.log.every == 0 || step == 1 || step == tc.steps || do_eval;
    if (!do_log) continue;
    if (do_eval && trainer.has_validation()) {
      m.has_val = true;
      m.val_loss = trainer.evaluate();
    }
    log->info("step {:>6} | loss {:.4f} | aux {:.4f} | z {:.4f} | lr {:.3e} | gnorm {:.3f} | "
              "drop {:.3f} | {:.1f} ms | {:.0f} tok/s | {:.1f} GFLOP/s{}",
              step, m.loss, m.aux_loss, m.z_loss, m.lr, m.grad_norm, m.dropped_fraction,
              m.step_ms, m.tokens_per_s, trainer.step_flops() / m.step_ms * 1e-6,
              m.has_val ? fmt::format(" | val_loss {:.4f}", m.val_loss) : "");
    metrics << metrics_json(m) << "\n";
    metrics.flush();
    result.logged.push_back(m);
  }
  log->info("done: {} steps, final loss {:.4f}", tc.steps, result.final_loss);
  spdlog::drop("switcht5");
  return result;
}

}  // namespace switcht5
