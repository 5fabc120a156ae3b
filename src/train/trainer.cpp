#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <memory>

#include "backend/backend.h"
#include "checkpoint/checkpoint.h"
#include "comm/communicator.h"
#include "core/check.h"
#include "core/rng.h"
#include "model/flops.h"
#include "model/model.h"
#include "train/grad_clip.h"
#include "train/memory_plan.h"

namespace switcht5 {

namespace {

// After the model's statistics (ModelStatsSlot, then RouterStatsSlot per Switch layer), the
// step's statistics array holds these sums of squares (backend memory, read back once a step):
enum StepStatsSlot : int {
  kLocalGradSq = 0,        // this rank's own gradients in the buckets it reduced, before the
                           // sum: non-finite here means this rank produced the NaN/Inf
  kNormReplicated = 1,     // summed gradients of the three ParamStore regions
  kNormModelSplit = 2,
  kNormExperts = 3,
  kStepStatsExtra = 4,
};

}  // namespace

int micro_batch_size(const RunConfig& cfg) {
  return cfg.train.batch_size / cfg.parallel.data / cfg.train.grad_accum_steps;
}

StepState build_step_state(const RunConfig& cfg, Backend& be, TrainerUse use,
                           const StepGroups& g) {
  StepState st;
  ModelParallelism mp;
  mp.expert_group = g.expert;
  mp.model_group = g.model;
  mp.sharding = g.sharding;
  const DType compute_dtype = cfg.train.precision == "bf16" ? DType::kBF16 : DType::kF32;
  st.model = std::make_unique<SwitchT5Model>(
      be, cfg.model, ModelShape{micro_batch_size(cfg), cfg.data.inputs_length,
                                cfg.data.targets_length},
      mp, compute_dtype);
  ParamStore& ps = st.model->params();
  if (use == TrainerUse::kTrain) {
    // Gradients travel on the data plane; ZeRO-1 gives this data rank the parameters of its
    // shard to update (expert parameters are updated by every replica).
    const ParallelConfig& pc = cfg.parallel;
    st.reducer = std::make_unique<GradientReducer>(be, ps, *g.data, *g.replica,
                                                   bucket_floats(pc.bucket_mb), pc.zero1);
    std::vector<bool> updates(ps.infos().size(), true);
    for (size_t i = 0; i < updates.size(); ++i)
      updates[i] = st.reducer->param_owner()[i] < 0 || st.reducer->param_owner()[i] == g.data_rank;
    st.optimizer = make_optimizer(optimizer_options(cfg.train), be, ps, updates, g.model);
  }
  st.statistics = DeviceArray<double>(be, st.model->statistics_size() + kStepStatsExtra);
  if (use == TrainerUse::kTrain) {
    for (int m = 0; m < cfg.train.grad_accum_steps; ++m)
      st.micro_batches.push_back(st.model->make_device_batch());
    st.rng_step = DeviceArray<uint64_t>(be, 1);
    st.ce_scale = DeviceArray<float>(be, 1);
  }
  return st;
}

size_t StepState::step_input_bytes() const {
  size_t n = rng_step.bytes() + ce_scale.bytes();
  for (const DeviceBatch& b : micro_batches) n += b.bytes();
  return n;
}

Trainer::Trainer(const RunConfig& cfg, ProcessGrid& grid, TrainerUse use,
                 const BackendFactory& make_backend_named)
    : cfg_(cfg), grid_(grid), local_rows_(cfg.train.batch_size / grid.data),
      micro_(local_rows_ / cfg.train.grad_accum_steps),
      be_(make_backend_named(cfg.train.backend, BackendOptions{.local_rank = grid.local_rank})),
      schedule_({cfg.train.schedule, cfg.train.learning_rate, cfg.train.warmup_steps,
                 cfg.train.steps, cfg.train.min_learning_rate}),
      batches_(cfg.train.grad_accum_steps) {
  const ParallelConfig& pc = cfg.parallel;
  SWT_USER_CHECK(pc.data == grid.data && pc.model == grid.model && pc.expert == grid.expert,
                 "parallel = (data {}, model {}, expert {}) but the process grid is ({}, {}, {})",
                 pc.data, pc.model, pc.expert, grid.data, grid.model, grid.expert);
  SWT_CHECK(local_rows_ * grid.data == cfg.train.batch_size &&
                micro_ * cfg.train.grad_accum_steps == local_rows_ &&
                micro_ == micro_batch_size(cfg),
            "batch {} does not split over {} data ranks x {} micro-batches",
            cfg.train.batch_size, grid.data, cfg.train.grad_accum_steps);
  // Memory preflight, before the model allocates anything: a run that cannot fit stops here with
  // the numbers instead of failing (or swapping) at its first step.
  if (use == TrainerUse::kTrain) require_memory_fits(cfg, be_->memory_capacity(), grid.local_size);
  const int Ti = cfg.data.inputs_length, Tt = cfg.data.targets_length;
  // Every rank makes the planes in this order (with NCCL: one communicator each, collective
  // over its group).
  const DataPlaneKind plane_kind = data_plane_kind(pc.data_plane);
  expert_plane_ = make_data_plane(*grid.expert_group, *be_, plane_kind);
  model_plane_ = make_data_plane(*grid.model_group, *be_, plane_kind);
  expert_comm_ = make_backend_communicator(*expert_plane_, *grid.expert_group, *be_);
  model_comm_ = make_backend_communicator(*model_plane_, *grid.model_group, *be_);
  if (use == TrainerUse::kTrain) {
    data_plane_ = make_data_plane(*grid.data_group, *be_, plane_kind);
    replica_plane_ = make_data_plane(*grid.expert_replica_group, *be_, plane_kind);
  }
  StepState st = build_step_state(
      cfg, *be_, use,
      StepGroups{.expert = expert_comm_.get(), .model = model_comm_.get(),
                 .data = data_plane_.get(), .replica = replica_plane_.get(),
                 .sharding = Sharding{grid.expert, grid.expert_rank, grid.model, grid.model_rank},
                 .data_rank = grid.data_rank});
  model_ = std::move(st.model);
  reducer_ = std::move(st.reducer);
  optimizer_ = std::move(st.optimizer);
  step_stats_ = std::move(st.statistics);
  if (grid.watchdog)
    for (DataPlane* plane : {expert_plane_.get(), model_plane_.get(), data_plane_.get(),
                             replica_plane_.get()})
      if (plane) plane_aborts_.push_back(grid.watchdog->on_abort([plane] { plane->abort(); }));
  device_batches_ = std::move(st.micro_batches);
  rng_step_ = std::move(st.rng_step);
  ce_scale_ = std::move(st.ce_scale);
  if (cfg.train.cuda_graphs && use == TrainerUse::kTrain) {
    SWT_USER_CHECK(be_->can_record(),
                   "train.cuda_graphs: true needs train.backend: cuda (backend '{}' cannot record "
                   "a step)",
                   be_->name());
    // Several ranks exchange tokens and gradients through MPI on the host inside the step,
    // which a graph cannot hold; NCCL's collectives can be captured (the multi-GPU data plane).
    SWT_USER_CHECK(grid.world_size == 1,
                   "train.cuda_graphs: true runs on one process for now; this run has {} (set "
                   "train.cuda_graphs: false)",
                   grid.world_size);
  }
  model_->params().initialize(*be_, cfg.train.seed);
  if (use == TrainerUse::kTrain) train_source_ = make_train_source(cfg, grid.data_rank, grid.data);
  val_source_ = make_validation_source(cfg, grid.data_rank, grid.data);
  switch_layers_ = model_->switch_layer_names();
  host_stats_.assign(step_stats_.size(), 0.0);
  step_flops_ = 3.0 * forward_matmul_flops(cfg.model, cfg.train.batch_size, Ti, Tt, true);
  if (const char* env = std::getenv("SWITCHT5_INJECT_NAN")) {
    long long s = -1;
    int r = -1;
    SWT_USER_CHECK(std::sscanf(env, "%lld:%d", &s, &r) == 2,
                   "SWITCHT5_INJECT_NAN=\"{}\": expected STEP:RANK", env);
    inject_nan(s, r);
  }
  stall_ = StallHook::from_env();
}

Trainer::~Trainer() = default;

TrainingState Trainer::checkpoint_state(int64_t step) {
  TrainingState s{.config = cfg_, .grid = grid_, .backend = *be_, .params = model_->params()};
  if (reducer_) s.param_owner = reducer_->param_owner();
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
    {
      Watchdog::Watch wait(grid_.watchdog.get(), CommCall::kDataWait, "validation batch");
      val_source_->next(local_);
    }
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

void Trainer::accumulate_grad_norm_squares(double* extra) {
  // After the reduction, a gradient is identical on the ranks that hold the same block: one sum
  // of squares per ParamStore region, combined over the right groups in global_grad_norm. Under
  // ZeRO-1 this rank holds the summed dense gradients of its shard [lo, hi) only.
  ParamStore& ps = model_->params();
  const int64_t split = ps.model_split_region_begin(), experts = ps.expert_region_begin();
  const int64_t lo = reducer_->shard_begin(), hi = reducer_->shard_end();
  auto add_squares = [&](int slot, int64_t begin, int64_t end) {
    if (end > begin) be_->accumulate_sum_squares(extra + slot, ps.grads() + begin, end - begin);
  };
  add_squares(kNormReplicated, lo, std::min(hi, split));
  add_squares(kNormModelSplit, std::max(lo, split), std::min(hi, experts));
  // Expert gradients the last backward squared as it made them final are in already
  // (issue_forward_backward); the others are read here.
  for (const ParamInfo& p : ps.infos())
    if (p.offset >= experts && !ps.squared(p))
      add_squares(kNormExperts, p.offset, p.offset + p.numel);
}

double Trainer::global_grad_norm(const double* extra) {
  // Replicated tensors count once; model-split blocks are summed over the model group, experts
  // over the expert group (and the model group when split); ZeRO-1 shards over the data group.
  double sq[3] = {extra[kNormReplicated], extra[kNormModelSplit], extra[kNormExperts]};
  if (reducer_->zero1()) grid_.data_group->all_reduce_sum(sq, 2);
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

void Trainer::issue_forward_backward(int64_t step, const LossWeights& w, RandomKey seed) {
  const TrainConfig& tc = cfg_.train;
  ParamStore& ps = model_->params();
  ps.zero_grads(*be_);
  const int64_t model_stats = model_->statistics_size();
  be_->zero_bytes(step_stats_.data(), step_stats_.bytes());
  double* extra = step_stats_.data() + model_stats;
  for (int m = 0; m < tc.grad_accum_steps; ++m) {
    const uint64_t first_row = uint64_t(grid_.data_rank) * local_rows_ + uint64_t(m) * micro_;
    model_->forward_accumulate(device_batches_[m], /*training=*/true, seed, first_row,
                               step_stats_.data());
    // The last backward makes the gradients final and reports them to the reducer, which
    // launches each bucket's reduction as soon as it is complete. The reducer also sums the
    // squares of this rank's own gradients before reducing them: non-finite there means this
    // rank produced it.
    const bool last = m + 1 == tc.grad_accum_steps;
    if (last) {
      reducer_->begin_step(extra + kLocalGradSq);
      // Test hook: gradients accumulate, so a NaN put in before the last backward stays in.
      if (step == inject_step_ && grid_.world_rank == inject_rank_) {
        ps.finish_grads();  // in memory now, so that the backward adds to the NaN
        const float nan = std::numeric_limits<float>::quiet_NaN();
        SWT_CHECK(inject_offset_ >= 0 && inject_offset_ < ps.total_numel(),
                  "inject_nan: offset {} outside the {} gradient floats", inject_offset_,
                  ps.total_numel());
        be_->copy_to_device(ps.grads() + inject_offset_, &nan, sizeof(float));
      }
      // Expert gradients that no group reduces are final where the last backward writes them:
      // their weight-gradient GEMMs add their squares to the norm then, from cache, instead of
      // accumulate_grad_norm_squares reading them back (1.1 GB with 128 experts on bench-small).
      if (!reducer_->reduces_experts())
        ps.square_final_writes(ps.expert_region_begin(), ps.total_numel(),
                               extra + kNormExperts);
    }
    model_->backward(w, last ? reducer_.get() : nullptr);
  }
  reducer_->finish();  // buckets not yet launched (none when every parameter was reported)
  accumulate_grad_norm_squares(extra);
}

std::vector<std::vector<double>> Trainer::expert_grad_norms() {
  const int E = cfg_.model.num_experts;
  const int64_t layers = int64_t(switch_layers_.size());
  std::vector<double> sq(size_t(layers * E), 0.0);
  if (layers == 0) return {};
  DeviceArray<double> acc(*be_, layers * E);
  be_->zero_bytes(acc.data(), acc.bytes());
  ParamStore& ps = model_->params();
  for (const ParamInfo& p : ps.infos()) {
    if (p.kind != ParamKind::kStacked) continue;
    // A block not split over the model group is the same on every model rank: counted once.
    if (p.model_split_dim < 0 && grid_.model_rank != 0) continue;
    int64_t l = 0;
    while (l < layers && p.name.rfind(switch_layers_[size_t(l)] + ".", 0) != 0) ++l;
    SWT_CHECK(l < layers, "stacked parameter {} belongs to no Switch layer", p.name);
    const int64_t first = p.slice_start.empty() ? 0 : p.slice_start[0];
    const int64_t per_expert = p.numel / p.shape[0];
    for (int64_t j = 0; j < p.shape[0]; ++j)
      be_->accumulate_sum_squares(acc.data() + l * E + first + j,
                                  ps.grads() + p.offset + j * per_expert, per_expert);
  }
  be_->copy_to_host(sq.data(), acc.data(), acc.bytes());
  // Each expert-group rank holds its own experts, each model rank its split of them.
  grid_.expert_group->all_reduce_sum(sq.data(), int64_t(sq.size()));
  grid_.model_group->all_reduce_sum(sq.data(), int64_t(sq.size()));
  std::vector<std::vector<double>> norms(static_cast<size_t>(layers));
  for (int64_t l = 0; l < layers; ++l)
    for (int e = 0; e < E; ++e) norms[size_t(l)].push_back(std::sqrt(sq[size_t(l * E + e)]));
  return norms;
}

PlaneTraffic Trainer::traffic(const std::string& group) const {
  const DataPlane* plane = group == "data"             ? data_plane_.get()
                           : group == "expert_replica" ? replica_plane_.get()
                           : group == "expert"         ? expert_plane_.get()
                           : group == "model"          ? model_plane_.get()
                                                       : nullptr;
  SWT_CHECK(group == "data" || group == "expert_replica" || group == "expert" || group == "model",
            "no process group \"{}\"", group);
  return plane ? plane->traffic() : PlaneTraffic{};
}

StepMetrics Trainer::train_step(int64_t step, bool expert_norms) {
  const TrainConfig& tc = cfg_.train;
  const auto t0 = std::chrono::steady_clock::now();
  if (grid_.watchdog) grid_.watchdog->set_step(step);
  ParamStore& ps = model_->params();
  {
    // A loader that never delivers (a stalled filesystem under the prefetch thread) would hang
    // the job: the wait has the watchdog's deadline.
    Watchdog::Watch wait(grid_.watchdog.get(), CommCall::kDataWait, "training batch");
    stall_.at("data", step, grid_.world_rank);
    train_source_->next(local_);
  }
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
  // The step's inputs in backend memory before any of its work is issued: the micro-batches,
  // the step (dropout and jitter masks are keyed by it, RandomKey) and 1 / target tokens.
  for (int m = 0; m < tc.grad_accum_steps; ++m) model_->upload(batches_[m], device_batches_[m]);
  const uint64_t step_counter = uint64_t(step);
  const float ce_scale = float(w.ce_scale);
  be_->copy_to_device(rng_step_.data(), &step_counter, sizeof step_counter);
  be_->copy_to_device(ce_scale_.data(), &ce_scale, sizeof ce_scale);
  w.ce_scale_device = ce_scale_.data();
  const RandomKey seed(derive_seed(tc.seed, 0xD80u), rng_step_.data());
  if (step_recorded_) {
    be_->replay();
    ++replayed_steps_;
  } else if (tc.cuda_graphs && eager_steps_ > 0) {
    // train.cuda_graphs: after one eager step (lazy allocations made, GEMM plans chosen), record
    // the step's work once; recording does not run it, so replay it now and on every later step.
    SWT_CHECK(inject_step_ < 0, "the NaN-injection test hook needs train.cuda_graphs: false");
    be_->begin_recording();
    issue_forward_backward(step, w, seed);
    be_->end_recording();
    step_recorded_ = true;
    be_->replay();
    ++replayed_steps_;
  } else {
    issue_forward_backward(step, w, seed);
    ++eager_steps_;
  }
  const int64_t model_stats = model_->statistics_size();
  // The step's one read-back: losses, router statistics, non-finite check, norm partials. On a
  // device backend the host waits here for the step's kernels and its NCCL collectives, so the
  // wait has the collectives' deadline (a stopped peer leaves NCCL waiting, comm/watchdog.h).
  {
    std::optional<Watchdog::Watch> wait;
    if (grid_.watchdog && !be_->host_accessible())
      wait.emplace(grid_.watchdog.get(), grid_.watchdog->trace("device"), "device", 1,
                   CollectiveTrace::Entry{CommCall::kDeviceWait, ElementType::kNone, 0});
    be_->copy_to_host(host_stats_.data(), step_stats_.data(), step_stats_.bytes());
  }
  const double* host_extra = host_stats_.data() + model_stats;
  // This rank's own gradients: the buckets it reduced (summed before the reduction), and the
  // regions it did not reduce, whose final sums are its own (GradientReducer::begin_step).
  const bool own_dense_bad = !reducer_->reduces_dense() &&
                             !(std::isfinite(host_extra[kNormReplicated]) &&
                               std::isfinite(host_extra[kNormModelSplit]));
  const bool own_experts_bad =
      !reducer_->reduces_experts() && !std::isfinite(host_extra[kNormExperts]);
  const bool local_bad = !std::isfinite(host_stats_[kCeSum]) ||
                         !std::isfinite(host_extra[kLocalGradSq]) || own_dense_bad ||
                         own_experts_bad;
  // Named now, before the router statistics are summed; only on a bad step (the search reads
  // tensors back one by one). Gradients are already reduced here (under ZeRO-1 only this rank's
  // shard; the rest are its own): a rank that was bad on its own names the first non-finite
  // tensor it then holds.
  std::string what = local_bad ? first_nonfinite() : std::string();
  grid_.data_group->all_reduce_sum(host_stats_.data(), model_stats);
  const double loss = w.ce_scale * host_stats_[kCeSum];
  double grad_norm = global_grad_norm(host_extra);

  StepMetrics m;
  auto t_update = std::chrono::steady_clock::now();
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
    if (expert_norms) expert_norms_ = expert_grad_norms();  // before clipping scales them
    // The gradients are complete here: the host read the step's statistics back above, which on
    // a device backend waits for the forward, backward and their collectives.
    t_update = std::chrono::steady_clock::now();
    clip_grad_norm_scaled(*be_, ps, grad_norm, tc.max_grad_norm);
    optimizer_->step(*be_, ps, float(m.lr));  // masters and their bf16 compute copies
    reducer_->all_gather_parameters();  // ZeRO-1: every shard's new values to every data rank
  }
  be_->synchronize();
  const auto t1 = std::chrono::steady_clock::now();
  const double secs = std::chrono::duration<double>(t1 - t0).count();
  if (!m.skipped) m.optimizer_ms = std::chrono::duration<double, std::milli>(t1 - t_update).count();

  decode_routing(m, host_stats_.data(), switch_layers_, cfg_.model.num_experts);
  if (expert_norms && !m.skipped)
    for (size_t l = 0; l < m.routing.size(); ++l)
      m.routing[l].expert_grad_norm = std::move(expert_norms_[l]);
  // What the watchdog reports should a later collective hang: the step's routing is on the host.
  if (grid_.watchdog) grid_.watchdog->set_completed_step(step, describe_expert_tokens(m));
  m.step_ms = secs * 1e3;
  m.tokens_per_s =
      double(tc.batch_size) * (cfg_.data.inputs_length + cfg_.data.targets_length) / secs;
  return m;
}

}  // namespace switcht5
