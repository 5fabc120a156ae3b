#include "train/memory_plan.h"

#include <algorithm>
#include <memory>
#include <span>
#include <string>

#include "backend/cuda/cuda_memory.h"
#include "backend/device_arena.h"
#include "backend/sizing_backend.h"
#include "comm/communicator.h"
#include "comm/data_plane.h"
#include "core/check.h"
#include "model/model.h"
#include "train/optimizer.h"
#include "train/trainer.h"

namespace switcht5 {
namespace {

// Rank 0 of a group of `size`, for constructors that read a group's size and rank; any
// communication is an internal error.
class SizeOnlyCommunicator final : public Communicator {
 public:
  explicit SizeOnlyCommunicator(int size) : size_(size) {}
  int rank() const override { return 0; }
  int size() const override { return size_; }
  void all_reduce_sum(float*, int64_t) override { refuse(); }
  void all_reduce_sum(double*, int64_t) override { refuse(); }
  void all_reduce_sum(int64_t*, int64_t) override { refuse(); }
  void all_reduce_max(int64_t*, int64_t) override { refuse(); }
  void reduce_scatter_sum(float*, const float*, int64_t) override { refuse(); }
  void all_gather(float*, const float*, int64_t) override { refuse(); }
  void all_to_all(float*, const float*, int64_t) override { refuse(); }
  void broadcast(float*, int64_t, int) override { refuse(); }
  void broadcast(std::string&, int) override { refuse(); }
  void barrier() override { refuse(); }
  std::unique_ptr<Communicator> split(int, int) const override { refuse(); }

 private:
  [[noreturn]] static void refuse() {
    throw Error("a size-only communicator (switcht5 plan) does not communicate");
  }
  int size_;
};

class SizeOnlyDataPlane final : public DataPlane {
 public:
  explicit SizeOnlyDataPlane(int size) : size_(size) {}
  int rank() const override { return 0; }
  int size() const override { return size_; }
  void all_reduce_sum(float*, int64_t) override { refuse(); }
  void reduce_scatter_sum(float*, std::span<const int64_t>) override { refuse(); }
  void all_gather(float*, std::span<const int64_t>) override { refuse(); }
  void all_to_all(float*, const float*, int64_t) override { refuse(); }
  void broadcast(float*, int64_t, int) override { refuse(); }
  void synchronize() override {}

 private:
  [[noreturn]] static void refuse() {
    throw Error("a size-only data plane (switcht5 plan) does not communicate");
  }
  int size_;
};

// Rank 0's step state of cfg's layout on a sizing backend, with size-only stand-ins for its
// groups (which must outlive the state: they are members).
struct SizedStep {
  explicit SizedStep(const RunConfig& cfg)
      : be(cfg.train.backend == "cuda" ? DeviceArena::kAlignment : 64),
        expert(cfg.parallel.expert), model(cfg.parallel.model), data(cfg.parallel.data),
        replica(cfg.parallel.data / cfg.parallel.expert),
        st(build_step_state(
            cfg, be, TrainerUse::kTrain,
            StepGroups{.expert = &expert, .model = &model, .data = &data, .replica = &replica,
                       .sharding = Sharding{cfg.parallel.expert, 0, cfg.parallel.model, 0},
                       .data_rank = 0})) {}
  SizingBackend be;
  SizeOnlyCommunicator expert, model;
  SizeOnlyDataPlane data, replica;
  StepState st;
};

}  // namespace

PlannedReduction plan_reduction(const RunConfig& cfg, int data_rank) {
  SizedStep sized(cfg);
  const GradientReducer& r = *sized.st.reducer;
  const ParamStore& ps = sized.st.model->params();
  PlannedReduction out;
  for (const GradientBucket& b : r.buckets()) out.buckets.push_back({b.end - b.begin, b.experts});
  out.zero1 = r.zero1();
  out.dense_floats = ps.expert_region_begin();
  // Adafactor under tensor parallelism gathers each model-split parameter it updates, and its
  // gradient (train/optimizer.cpp: AdafactorShape::split).
  if (cfg.train.optimizer == "adafactor" && cfg.parallel.model > 1)
    for (size_t i = 0; i < ps.infos().size(); ++i) {
      const ParamInfo& p = ps.infos()[i];
      const int owner = r.param_owner()[i];
      if (p.model_split_dim >= 0 && (owner < 0 || owner == data_rank))
        out.split_gathers.push_back(p.numel);
    }
  return out;
}

MemoryPlan plan_memory(const RunConfig& cfg, double device_memory_bytes) {
  const bool cuda = cfg.train.backend == "cuda";
  SizedStep sized(cfg);
  SizingBackend& be = sized.be;
  SizeOnlyCommunicator& model = sized.model;
  StepState& st = sized.st;

  MemoryPlan p;
  p.backend = cfg.train.backend;
  p.precision = cfg.train.precision;
  p.micro_batch = micro_batch_size(cfg);
  p.counted = int64_t(be.peak_requested_bytes());
  p.rounding = int64_t(be.peak_occupied_bytes()) - p.counted;

  ParamStore& ps = st.model->params();
  const int64_t numel = ps.total_numel();
  p.master_params = int64_t(sizeof(float)) * numel;
  p.gradients = int64_t(sizeof(float)) * numel;
  p.compute_copy = ps.compute_dtype() == DType::kBF16 ? int64_t(sizeof(uint16_t)) * numel : 0;
  p.kept_activations = int64_t(st.model->kept_activation_bytes());
  p.activation_workspace = int64_t(st.model->activation_bytes()) - p.kept_activations;
  p.inputs = int64_t(st.model->input_bytes() + st.step_input_bytes());
  p.statistics = int64_t(st.statistics.bytes());
  // The optimizer's allocation, measured: the state of the parameters this rank updates (and
  // Adafactor's gather buffers under tensor parallelism). Without ZeRO-1, for comparison: an
  // optimizer over every parameter, counted the same way and freed.
  {
    const size_t before = be.requested_bytes();
    st.optimizer.reset();
    p.optimizer_state = int64_t(before - be.requested_bytes());
    const size_t base = be.requested_bytes();
    OptimizerOptions oo;
    oo.name = cfg.train.optimizer;
    auto unsharded = make_optimizer(oo, be, ps, {}, &model);
    p.optimizer_unsharded = int64_t(be.requested_bytes() - base);
  }
  p.other = p.counted - (p.master_params + p.gradients + p.compute_copy + p.optimizer_state +
                         p.kept_activations + p.activation_workspace + p.inputs + p.statistics +
                         p.communication);
  if (cuda)
    p.backend_workspace = int64_t(DeviceArena::rounded(cuda::kWorkspaceBytes) +
                                  DeviceArena::rounded(cuda::kCublasWorkspaceBytes) +
                                  DeviceArena::rounded(cuda::kResultBytes));
  p.total = p.counted + p.rounding + p.backend_workspace;
  if (cuda) {
    // CudaBackend::reserve_arena with the default fraction, on a device whose memory is all free.
    const double m = device_memory_bytes > 0 ? device_memory_bytes : 141e9;
    p.device_memory = int64_t(m);
    p.arena_limit = int64_t(cuda::arena_bytes(size_t(m), cuda::kDefaultMemoryFraction));
    p.fits = p.total <= p.arena_limit;
  }
  return p;
}

}  // namespace switcht5
