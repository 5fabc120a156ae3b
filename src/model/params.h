// Parameters and their gradients, stored as two contiguous backend arrays with one table of
// (HF name, shape, offset). One contiguous buffer makes the optimizer, the global gradient norm
// and (later) the data-parallel all-reduce single calls.
//
// Names are the HuggingFace SwitchTransformers state_dict keys with HF's shapes, with ONE
// documented exception: the experts of a Switch layer are stored stacked,
//   internal  "<prefix>.mlp.experts.wi.weight"           [num_experts, d_ff, d_model]
//   HF        "<prefix>.mlp.experts.expert_{j}.wi.weight" [d_ff, d_model]       (j = 0..E-1)
// and likewise for wo ([E, d_model, d_ff]) and, for gated-gelu experts, wi_0 / wi_1.
// hf_names() expands that table; it is the one place where the mapping lives.
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"

namespace switcht5 {

// How a parameter was initialised and how optimizers treat it.
enum class ParamKind {
  kMatrix,     // [R, C] weight matrix (Adafactor factors it)
  kStacked,    // [E, R, C]: E independent matrices (stacked experts)
  kVector,     // [D] (RMSNorm scale): never factored, no weight decay
  kEmbedding,  // [V, D] token embedding / LM head: a matrix for Adafactor
};

struct ParamInfo {
  std::string name;            // internal name (HF key, except stacked experts, see above)
  std::vector<int64_t> shape;  // shape of the block this process holds
  int64_t offset = 0;          // into ParamStore::values() / grads(), in floats (set by allocate)
  int64_t numel = 0;
  ParamKind kind = ParamKind::kMatrix;
  double init_std = 0.0;       // truncated-normal std used at init (0 = constant init_value)
  float init_value = 0.0f;     // for kVector (RMSNorm scales start at 1)
  // A process may hold a block of the logical tensor (expert parallelism: experts
  // [slice_start[0], slice_start[0] + shape[0]) of full_shape[0]). Empty: the whole tensor.
  std::vector<int64_t> full_shape{};
  std::vector<int64_t> slice_start{};
  // Tensor (Megatron) model parallelism: the dimension split over the model group, or -1 when
  // every model rank holds the whole tensor (it is then replicated, with identical gradients).
  int model_split_dim = -1;

  // Matrices per tensor and their [rows, cols] as optimizers see them.
  int matrix_count() const { return kind == ParamKind::kStacked ? static_cast<int>(shape[0]) : 1; }
  int64_t rows() const { return shape.size() >= 2 ? shape[shape.size() - 2] : 1; }
  int64_t cols() const { return shape.back(); }
  const std::vector<int64_t>& logical_shape() const { return full_shape.empty() ? shape : full_shape; }
};

// How a process's parameters are cut out of the logical model.
struct Sharding {
  int expert_parallel = 1, expert_rank = 0;  // experts split over the expert group
  int model_parallel = 1, model_rank = 0;    // heads and d_ff split over the model group
};

// Makes `p` model rank `index`'s block of `parts` equal blocks along `dim` of its logical
// tensor (tensor parallelism); an existing block (expert shard) is cut further.
void split_over_model(ParamInfo& p, int dim, int parts, int index);

// Told during a backward pass which gradients are final, so that their reduction can start
// while the rest of the pass runs (train/gradient_reducer.h). Model code only reports.
class GradientReadyListener {
 public:
  virtual ~GradientReadyListener() = default;
  // The gradient of every parameter lying within [begin, end) of ParamStore::grads() is final.
  virtual void on_gradients_ready(int64_t begin, int64_t end) = 0;
};

class ParamStore {
 public:
  // Registers a parameter; returns its index. Call before allocate().
  int add(ParamInfo info);
  // Lays the parameters out and allocates values and grads (zeroed), in three contiguous
  // regions that are reduced and normed over different process groups, each one call:
  //   [0, model_split_region_begin())                        replicated on every model rank
  //   [model_split_region_begin(), expert_region_begin())    split over the model group
  //   [expert_region_begin(), total_numel())                 stacked experts
  // The first two are summed over the data group, the experts over their replicas.
  void allocate(Backend& be);
  int64_t model_split_region_begin() const { return model_split_begin_; }
  int64_t expert_region_begin() const { return expert_begin_; }

  const std::vector<ParamInfo>& infos() const { return infos_; }
  const ParamInfo& info(const std::string& name) const;
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  int64_t total_numel() const { return total_; }

  // Mixed precision. With a bf16 compute dtype the store also holds a bf16 copy of every
  // parameter (same layout as values()), which the forward and backward GEMMs read; the fp32
  // values stay the master weights. Whatever changes a master writes the copy: the optimizer
  // step in its own pass (compute_copy() is where its kernel writes), refresh_compute_copy()
  // after anything else (initialisation, checkpoint load, ZeRO-1's all-gather of the shards
  // other ranks updated). fp32: no copy, weight() is the master itself.
  void set_compute_dtype(Backend& be, DType dtype);
  DType compute_dtype() const { return compute_dtype_; }
  void refresh_compute_copy(Backend& be);
  // The copy of floats [begin, end) of values() only.
  void refresh_compute_copy(Backend& be, int64_t begin, int64_t end);
  // Where parameter p's bf16 compute copy lives (p's layout), or null in fp32.
  uint16_t* compute_copy(const ParamInfo& p) {
    return compute_dtype_ == DType::kBF16 ? compute_.data() + p.offset : nullptr;
  }
  // A parameter as the GEMMs read it: its compute copy, or the fp32 master.
  struct WeightView {
    const void* data;
    DType dtype;
  };
  WeightView weight(const ParamInfo& p) const {
    if (compute_dtype_ == DType::kBF16) return {compute_.data() + p.offset, DType::kBF16};
    return {values_.data() + p.offset, DType::kF32};
  }

  // A parameter's fp32 master values.
  const float* master(const ParamInfo& p) const { return values_.data() + p.offset; }

  // Gradients (fp32, accumulated by backward) are zeroed lazily. zero_grads() marks every
  // parameter's gradient pending (to be zero) without touching memory; then each parameter's
  // first writer of the step either
  //   - overwrites all of it: grad_target(), for the weight-gradient GEMMs, gives beta = 0 (do not
  //     read C) when pending and 1 after, so a fresh gradient is neither filled with zeros nor
  //     read back; or
  //   - adds to it: grad(), for every other writer (embedding scatter, norm weights, relative
  //     position tables), fills a pending gradient with zeros first.
  // finish_grads() zeroes what is still pending; SwitchT5Model::backward ends with it and reports
  // nothing pending to a GradientReadyListener, so whoever reads grads() after a backward sees
  // the same values as with an eager fill. Per step this saves a write of every gradient and a
  // read of every GEMM-written one (the experts' gradients are most of the parameters): the
  // order of the writes, hence the values, are unchanged (0 * beta + x = x exactly).
  float* grad(const ParamInfo& p);
  float* grad(const std::string& name) { return grad(info(name)); }
  struct GradTarget {
    float* data;
    float beta;  // 0: the step's first write (nothing to add to), 1: accumulate
    // Non-null: this write makes the gradient final; the writer adds the squares of every float
    // it stores to sum_squares[0] (Backend::gemm_ex_sum_squares). See square_final_writes().
    double* sum_squares = nullptr;
  };
  // For a writer that stores every one of p's `floats` (checked: floats == p.numel).
  GradTarget grad_target(const ParamInfo& p, int64_t floats);
  // Zeroes p's gradient if still pending (nothing wrote it): it is final, as is.
  void finish_grad(const ParamInfo& p);
  // Zeroes every gradient still pending (no-op when every parameter was written).
  void finish_grads();

  // The gradient norm's squares, taken where the gradients are made final. The caller promises
  // that, until the next finish_grads() (the end of the backward), each grad_target() write to
  // a parameter lying wholly in floats [begin, end) is the parameter's last write of the step
  // and nothing changes it before the norm (the step's last backward, in a region no process
  // group reduces): such a write is handed `acc` (backend memory) to add its squares to, while
  // the gradient is still in cache, and the parameter is marked squared() until zero_grads().
  // Any later write to it is an internal error. A parameter of the range not written that way
  // (never written, or written through grad()) is not squared: the caller sums those itself.
  void square_final_writes(int64_t begin, int64_t end, double* acc);
  bool squared(const ParamInfo& p) const { return grad_squared_[index_of(p)] != 0; }

  float* value(const std::string& name) { return values_.data() + info(name).offset; }
  float* values() { return values_.data(); }
  float* grads() { return grads_.data(); }
  const float* values() const { return values_.data(); }
  const float* grads() const { return grads_.data(); }

  // Fills every parameter from its init rule. Element i of the logical tensor is drawn from a
  // counter-based RNG keyed by (seed, name, i), so values do not depend on registration order,
  // on the process layout or on which block of a tensor this process holds.
  void initialize(Backend& be, uint64_t seed);
  // Marks every gradient pending (see grad()); the memory is zeroed by its first writer.
  void zero_grads(Backend& be);

  // HF state_dict view of the tensors THIS process holds: (HF key, internal name, offset within
  // that parameter, shape of the block held). Under expert parallelism the expert numbers are
  // global; under model parallelism a split tensor appears with this rank's block shape (its
  // place in the logical tensor is ParamInfo::slice_start), so a complete state dict is the
  // union over the model group.
  struct HfEntry {
    std::string hf_name;
    std::string internal_name;
    int64_t inner_offset;
    std::vector<int64_t> hf_shape;
  };
  std::vector<HfEntry> hf_names() const;

 private:
  std::vector<ParamInfo> infos_;
  std::unordered_map<std::string, int> index_;
  int64_t total_ = 0;
  int64_t model_split_begin_ = 0;
  int64_t expert_begin_ = 0;
  DeviceArray<float> values_;
  DeviceArray<float> grads_;
  Backend* be_ = nullptr;                 // grads_' backend (set by allocate), for lazy zeroing
  std::vector<uint8_t> grad_pending_;     // per parameter: zero_grads() since its last write
  std::vector<uint8_t> grad_squared_;     // per parameter: its final write added its squares
  double* square_acc_ = nullptr;          // square_final_writes()' range and sum, until
  int64_t square_begin_ = 0, square_end_ = 0;  // finish_grads()
  size_t index_of(const ParamInfo& p) const;
  // Index of p, checked not squared(): a write after the final one would miss the norm.
  size_t writable_index(const ParamInfo& p) const;
  DType compute_dtype_ = DType::kF32;
  DeviceArray<uint16_t> compute_;  // bf16 compute copy [total_] (bf16 compute dtype only)
};

}  // namespace switcht5
