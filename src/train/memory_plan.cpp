#include "train/memory_plan.h"

#include <algorithm>
#include <fstream>
#include <memory>
#include <sstream>
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
    auto unsharded = make_optimizer(optimizer_options(cfg.train), be, ps, {}, &model);
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


int64_t checkpoint_file_bytes(const RunConfig& cfg) {
  ParamStore ps;
  register_model_params(ps, cfg.model);
  int64_t floats = 0;
  for (const ParamInfo& p : ps.infos())
    floats += p.numel + optimizer_state_numel(cfg.train.optimizer, p, /*model_parallel=*/1);
  return 4 * floats;
}

namespace {

// The first number on the line of `file` that starts with `key` (e.g. "MemAvailable:"), or -1.
int64_t read_number_after(const std::string& file, const std::string& key) {
  std::ifstream f(file);
  for (std::string line; std::getline(f, line);)
    if (line.rfind(key, 0) == 0) {
      std::istringstream rest(line.substr(key.size()));
      int64_t v = -1;
      return rest >> v ? v : -1;
    }
  return -1;
}

// A cgroup v2 file holding one number ("max" or unreadable: -1).
int64_t read_cgroup_number(const std::string& path) {
  std::ifstream f(path);
  std::string word;
  if (!(f >> word) || word == "max") return -1;
  try {
    return std::stoll(word);
  } catch (const std::exception&) {
    return -1;
  }
}

}  // namespace

int64_t host_memory_available() {
  const int64_t kib = read_number_after("/proc/meminfo", "MemAvailable:");
  int64_t available = kib >= 0 ? kib * 1024 : -1;
  // cgroup v2: /proc/self/cgroup reads "0::/path"; the limit and usage are under
  // /sys/fs/cgroup/path.
  std::ifstream cg("/proc/self/cgroup");
  for (std::string line; std::getline(cg, line);)
    if (line.rfind("0::", 0) == 0) {
      const std::string dir = "/sys/fs/cgroup" + line.substr(3);
      const int64_t limit = read_cgroup_number(dir + "/memory.max");
      const int64_t used = read_cgroup_number(dir + "/memory.current");
      if (limit > 0 && used >= 0) {
        const int64_t left = std::max<int64_t>(0, limit - used);
        available = available < 0 ? left : std::min(available, left);
      }
    }
  return available;
}

int64_t process_peak_resident() {
  const int64_t kib = read_number_after("/proc/self/status", "VmHWM:");
  return kib >= 0 ? kib * 1024 : -1;
}

MemoryPlan require_memory_fits(const RunConfig& cfg, int64_t capacity, int ranks_on_node) {
  const MemoryPlan mp = plan_memory(cfg, double(capacity));
  const double gb = 1e-9;
  if (capacity > 0) {
    SWT_USER_CHECK(mp.total <= capacity,
                   "train.backend {}: one rank needs {:.2f} GB of device memory (switcht5 plan) "
                   "but the device gives this run {:.2f} GB; lower train.batch_size, raise "
                   "train.grad_accum_steps or spread the model over more ranks (parallel.expert, "
                   "parallel.model, parallel.zero1)",
                   cfg.train.backend, double(mp.total) * gb, double(capacity) * gb);
    return mp;
  }
  const int64_t available = host_memory_available();
  const int64_t need = mp.total * std::max(1, ranks_on_node);
  SWT_USER_CHECK(available < 0 || need <= available,
                 "train.backend {}: {} rank{} on this node need{} {:.2f} GB of host memory ({:.2f} "
                 "GB each, switcht5 plan) but {:.2f} GB is available (MemAvailable, or the "
                 "cgroup's limit); lower train.batch_size, raise train.grad_accum_steps or spread "
                 "the model over more ranks (parallel.expert, parallel.model, parallel.zero1)",
                 cfg.train.backend, ranks_on_node, ranks_on_node == 1 ? "" : "s",
                 ranks_on_node == 1 ? "s" : "", double(need) * gb, double(mp.total) * gb, double(available) * gb);
  return mp;
}

}  // namespace switcht5
