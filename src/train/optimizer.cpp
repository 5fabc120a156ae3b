#include "train/optimizer.h"

#include <cmath>
#include <limits>

#include "comm/communicator.h"
#include "core/check.h"

namespace switcht5 {

bool adafactor_factored(const ParamInfo& info) {
  return info.kind != ParamKind::kVector && info.rows() > 1 && info.cols() > 1;
}

namespace {

// The logical matrices Adafactor updates for a parameter: a block split over a model group of M
// ranks (model_split_dim >= 0) is gathered and updated as its whole logical tensor, whose
// factored statistics need every row and column.
struct AdafactorShape {
  bool split = false;     // model-split block: the update runs on the gathered matrix
  bool factored = false;
  int64_t count = 1, rows = 1, cols = 1;  // count matrices of [rows, cols]
  int64_t state_numel() const { return factored ? count * (rows + cols) : count * rows * cols; }
};

AdafactorShape adafactor_shape(const ParamInfo& p, int M) {
  std::vector<int64_t> shape = p.shape;
  AdafactorShape s;
  s.split = M > 1 && p.model_split_dim >= 0;
  if (s.split) shape[size_t(p.model_split_dim)] *= M;
  s.count = p.kind == ParamKind::kStacked ? shape[0] : 1;
  s.rows = shape.size() >= 2 ? shape[shape.size() - 2] : 1;
  s.cols = shape.back();
  // Decided on the logical matrix: a [32, 4] table split 4 ways is four [32, 1] blocks, but
  // it is factored like the [32, 4] it is.
  s.factored = adafactor_factored(p) ||
               (s.split && p.kind != ParamKind::kVector && s.rows > 1 && s.cols > 1);
  return s;
}

// The parameter table an optimizer was made for, to catch a step() on a different store.
struct Layout {
  std::vector<int64_t> offsets;
  int64_t total = 0;

  explicit Layout(const ParamStore& params) : total(params.total_numel()) {
    for (const ParamInfo& p : params.infos()) offsets.push_back(p.offset);
  }
  void check(const ParamStore& params) const {
    bool same = params.total_numel() == total && params.infos().size() == offsets.size();
    for (size_t i = 0; same && i < offsets.size(); ++i)
      same = params.infos()[i].offset == offsets[i];
    SWT_CHECK(same,
              "optimizer step on a ParamStore with a different layout ({} params, {} floats; "
              "made for {} params, {} floats)",
              params.infos().size(), params.total_numel(), offsets.size(), total);
  }
};

int to_int(int64_t x, const std::string& what) {
  SWT_CHECK(x >= 0 && x <= std::numeric_limits<int>::max(), "{} = {} does not fit an int", what, x);
  return static_cast<int>(x);
}

float weight_decay_for(const ParamInfo& p, double weight_decay) {
  return p.kind == ParamKind::kVector ? 0.0f : static_cast<float>(weight_decay);
}

// Which parameters this optimizer updates (ZeRO-1 gives each data rank a share); empty: all.
std::vector<bool> resolve_updates(const std::vector<bool>& updates, const ParamStore& params) {
  if (updates.empty()) return std::vector<bool>(params.infos().size(), true);
  SWT_CHECK(updates.size() == params.infos().size(), "update mask of {} for {} parameters",
            updates.size(), params.infos().size());
  return updates;
}

class AdamW final : public Optimizer {
 public:
  AdamW(const OptimizerOptions& o, Backend& be, const ParamStore& params,
        const std::vector<bool>& updates)
      : options_(o), layout_(params), infos_(params.infos()),
        updates_(resolve_updates(updates, params)) {
    // State only for the parameters this optimizer updates, packed.
    int64_t total = 0;
    for (size_t i = 0; i < infos_.size(); ++i) {
      state_offset_.push_back(total);
      if (updates_[i]) total += infos_[i].numel;
    }
    exp_avg_ = DeviceArray<float>(be, total);
    exp_avg_sq_ = DeviceArray<float>(be, total);
  }

  void step(Backend& be, ParamStore& params, float lr) override {
    layout_.check(params);
    const int64_t t = ++steps_taken_;
    const double bc1 = 1.0 - std::pow(options_.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(options_.beta2, static_cast<double>(t));
    for (size_t i = 0; i < infos_.size(); ++i) {
      if (!updates_[i]) continue;
      const ParamInfo& p = infos_[i];
      const int64_t so = state_offset_[i];
      be.adamw_update(params.values() + p.offset, params.compute_copy(p), params.grads() + p.offset,
                      exp_avg_.data() + so, exp_avg_sq_.data() + so, p.numel, lr,
                      static_cast<float>(options_.beta1), static_cast<float>(options_.beta2),
                      static_cast<float>(options_.epsilon),
                      weight_decay_for(p, options_.weight_decay), static_cast<float>(bc1),
                      static_cast<float>(bc2));
    }
  }

  std::vector<StateTensor> state() override {
    std::vector<StateTensor> out;
    for (size_t i = 0; i < infos_.size(); ++i) {
      const ParamInfo& p = infos_[i];
      float* so = updates_[i] ? exp_avg_.data() + state_offset_[i] : nullptr;
      float* so2 = updates_[i] ? exp_avg_sq_.data() + state_offset_[i] : nullptr;
      // Elementwise state: placed exactly as the parameter block.
      const std::vector<int64_t> start =
          p.slice_start.empty() ? std::vector<int64_t>(p.shape.size(), 0) : p.slice_start;
      out.push_back({p.name + ".exp_avg", p.shape, so, p.logical_shape(), start,
                     p.model_split_dim, int(i)});
      out.push_back({p.name + ".exp_avg_sq", p.shape, so2, p.logical_shape(), start,
                     p.model_split_dim, int(i)});
    }
    return out;
  }

 private:
  OptimizerOptions options_;
  Layout layout_;
  std::vector<ParamInfo> infos_;
  std::vector<bool> updates_;
  std::vector<int64_t> state_offset_;  // per parameter, into the packed state
  DeviceArray<float> exp_avg_;         // m of the updated parameters, packed
  DeviceArray<float> exp_avg_sq_;      // v
};

class Adafactor final : public Optimizer {
 public:
  Adafactor(const OptimizerOptions& o, Backend& be, const ParamStore& params,
            const std::vector<bool>& updates, Communicator* model_group)
      : options_(o), layout_(params), infos_(params.infos()),
        updates_(resolve_updates(updates, params)), model_group_(model_group),
        M_(model_group ? model_group->size() : 1) {
    // One contiguous state array; per updated parameter either row and column statistics
    // ([count, R] then [count, C]) or a full second moment (numel). A parameter split over the
    // model group has the statistics of its whole logical matrix: its factored second moments
    // need every row and column, so each model rank gathers the matrix, runs the same update,
    // and keeps its block (see step()).
    int64_t total = 0, gather = 0;
    for (size_t i = 0; i < infos_.size(); ++i) {
      const ParamInfo& p = infos_[i];
      Slot s{adafactor_shape(p, M_), /*offset=*/total};
      if (s.split) gather = std::max(gather, p.numel * M_);
      // Checked once here so that step() builds no strings (it runs allocation-free).
      to_int(s.count, p.name + " count");
      to_int(s.rows, p.name + " rows");
      to_int(s.cols, p.name + " cols");
      SWT_CHECK(s.count * s.rows * s.cols == p.numel * (s.split ? M_ : 1),
                "parameter {}: {} matrices of [{}, {}] != numel {}", p.name, s.count, s.rows,
                s.cols, p.numel);
      if (updates_[i]) total += s.state_numel();
      slots_.push_back(s);
    }
    state_ = DeviceArray<float>(be, total);
    if (gather > 0) {
      full_value_ = DeviceArray<float>(be, gather);
      full_grad_ = DeviceArray<float>(be, gather);
      gathered_ = DeviceArray<float>(be, gather);
    }
  }

  void step(Backend& be, ParamStore& params, float lr) override {
    layout_.check(params);
    const int64_t t = ++steps_taken_;
    const float beta2t =
        static_cast<float>(1.0 - std::pow(static_cast<double>(t), -options_.decay_rate));
    for (size_t i = 0; i < infos_.size(); ++i) {
      if (!updates_[i]) continue;
      const ParamInfo& p = infos_[i];
      const Slot& s = slots_[i];
      float* base = state_.data() + s.offset;
      float* vr = s.factored ? base : nullptr;
      float* vc = s.factored ? base + s.count * s.rows : nullptr;
      float* v = s.factored ? nullptr : base;
      float* value = params.values() + p.offset;
      const float* grad = params.grads() + p.offset;
      if (s.split) {
        gather_split(be, p, value, full_value_.data());
        gather_split(be, p, grad, full_grad_.data());
        value = full_value_.data();
        grad = full_grad_.data();
      }
      // The bf16 compute copy is written in the update's pass, except for a gathered split
      // parameter, whose block is cast once it is back in place.
      uint16_t* copy = s.split ? nullptr : params.compute_copy(p);
      be.adafactor_update(value, copy, grad, vr, vc, v, s.factored, int(s.count), int(s.rows),
                          int(s.cols), lr, beta2t, static_cast<float>(options_.epsilon1),
                          static_cast<float>(options_.clipping_threshold),
                          weight_decay_for(p, options_.weight_decay),
                          options_.scale_parameter ? static_cast<float>(options_.epsilon2) : 0.0f);
      if (s.split) {
        scatter_split(be, p, value, params.values() + p.offset);
        params.refresh_compute_copy(be, p.offset, p.offset + p.numel);
      }
    }
  }

  // HF's names: exp_avg_sq_row [.., R] and exp_avg_sq_col [.., C] (leading E for stacked
  // experts), or exp_avg_sq with the parameter's shape. A model-split parameter's state covers
  // its whole logical matrix and is the same on every model rank; an expert shard's state covers
  // its experts only.
  std::vector<StateTensor> state() override {
    std::vector<StateTensor> out;
    for (size_t i = 0; i < infos_.size(); ++i) {
      const ParamInfo& p = infos_[i];
      const Slot& s = slots_[i];
      float* base = updates_[i] ? state_.data() + s.offset : nullptr;
      const bool stacked = p.kind == ParamKind::kStacked;
      const int64_t e0 = stacked && !p.slice_start.empty() ? p.slice_start[0] : 0;
      const int64_t E = stacked ? p.logical_shape()[0] : 1;
      if (!s.factored) {
        std::vector<int64_t> shape = p.shape;
        if (s.split) shape[size_t(p.model_split_dim)] *= M_;
        std::vector<int64_t> start(shape.size(), 0);
        if (stacked) start[0] = e0;
        out.push_back({p.name + ".exp_avg_sq", shape, base, p.logical_shape(), start, -1, int(i)});
        continue;
      }
      std::vector<int64_t> row_shape{s.rows}, col_shape{s.cols}, row_full{s.rows},
          col_full{s.cols}, start{0};
      if (stacked) {
        row_shape.insert(row_shape.begin(), s.count);
        col_shape.insert(col_shape.begin(), s.count);
        row_full.insert(row_full.begin(), E);
        col_full.insert(col_full.begin(), E);
        start = {e0, 0};
      }
      out.push_back({p.name + ".exp_avg_sq_row", row_shape, base, row_full, start, -1, int(i)});
      out.push_back({p.name + ".exp_avg_sq_col", col_shape,
                     base ? base + s.count * s.rows : nullptr, col_full, start, -1, int(i)});
    }
    return out;
  }

 private:
  // The model-split block `local` of p -> the logical tensor `full`: an all_gather gives
  // [M, outer, inner] (outer = the dimensions before the split one, inner = the rest of the
  // block), which is the logical [outer, M, inner] after one permutation.
  void gather_split(Backend& be, const ParamInfo& p, const float* local, float* full) {
    int64_t outer = 1;
    for (int k = 0; k < p.model_split_dim; ++k) outer *= p.shape[size_t(k)];
    const int64_t inner = p.numel / outer;
    model_group_->all_gather(gathered_.data(), local, p.numel);
    be.permute_0213(full, gathered_.data(), 1, M_, int(outer), int(inner));
  }
  // The inverse for this rank's block.
  void scatter_split(Backend& be, const ParamInfo& p, const float* full, float* local) {
    int64_t outer = 1;
    for (int k = 0; k < p.model_split_dim; ++k) outer *= p.shape[size_t(k)];
    const int64_t inner = p.numel / outer;
    be.permute_0213(gathered_.data(), full, 1, int(outer), M_, int(inner));
    be.copy(local, gathered_.data() + int64_t(model_group_->rank()) * p.numel,
            sizeof(float) * p.numel);
  }

  struct Slot : AdafactorShape {
    int64_t offset = 0;  // into state_
  };
  OptimizerOptions options_;
  Layout layout_;
  std::vector<ParamInfo> infos_;
  std::vector<bool> updates_;
  Communicator* model_group_;
  int M_;
  std::vector<Slot> slots_;
  DeviceArray<float> full_value_, full_grad_, gathered_;  // largest gathered parameter
  DeviceArray<float> state_;
};

}  // namespace

int64_t optimizer_state_numel(const std::string& name, const ParamInfo& p, int model_parallel) {
  if (name == "adamw") return 2 * p.numel;  // exp_avg and exp_avg_sq, as the block
  if (name == "adafactor") return adafactor_shape(p, model_parallel).state_numel();
  throw UserError(fmt::format("unknown optimizer '{}' (allowed: adafactor, adamw)", name));
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
  oo.scale_parameter = tc.adafactor_scale_parameter;
  oo.epsilon2 = tc.adafactor_epsilon2;
  return oo;
}

std::unique_ptr<Optimizer> make_optimizer(const OptimizerOptions& options, Backend& be,
                                          const ParamStore& params,
                                          const std::vector<bool>& updates,
                                          Communicator* model_group) {
  SWT_USER_CHECK(options.weight_decay >= 0.0, "optimizer weight_decay must be >= 0, got {}",
                 options.weight_decay);
  if (options.name == "adamw") {
    SWT_USER_CHECK(options.beta1 >= 0.0 && options.beta1 < 1.0,
                   "adamw beta1 must be in [0, 1), got {}", options.beta1);
    SWT_USER_CHECK(options.beta2 >= 0.0 && options.beta2 < 1.0,
                   "adamw beta2 must be in [0, 1), got {}", options.beta2);
    SWT_USER_CHECK(options.epsilon > 0.0, "adamw epsilon must be > 0, got {}", options.epsilon);
    return std::make_unique<AdamW>(options, be, params, updates);
  }
  if (options.name == "adafactor") {
    SWT_USER_CHECK(
        options.decay_rate > 0.0 && options.decay_rate <= 1.0,
        "adafactor decay_rate must be in (0, 1] (beta2 at step t is 1 - t^-decay_rate), got {}",
        options.decay_rate);
    SWT_USER_CHECK(options.clipping_threshold > 0.0,
                   "adafactor clipping_threshold must be > 0, got {}", options.clipping_threshold);
    SWT_USER_CHECK(options.epsilon1 > 0.0, "adafactor epsilon1 must be > 0, got {}",
                   options.epsilon1);
    SWT_USER_CHECK(options.epsilon2 > 0.0, "adafactor epsilon2 must be > 0, got {}",
                   options.epsilon2);
    return std::make_unique<Adafactor>(options, be, params, updates, model_group);
  }
  throw UserError(fmt::format("unknown optimizer '{}' (allowed: adafactor, adamw)", options.name));
}

}  // namespace switcht5
