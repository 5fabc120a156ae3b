// bench_step: steady-state cost of one training step (the exact Trainer::train_step that
// `switcht5 train` runs) for a config: ms/step, tokens/s, peak RSS, heap allocations per
// steady-state step, and the step's matmul GFLOP/s against this backend's measured GEMM peak:
// the executed FLOPs (on the cpu backend in one process, what it counted it ran: its expert
// products skip their buffers' empty rows; elsewhere the expert FFNs over every capacity slot,
// empty ones too) and the model's (each token through its top-1 expert once: what the Switch
// paper holds equal between models, the useful work). The JSON's step_flops is the executed
// count (step_flops_counted says which), capacity_flops the count over every capacity slot. On
// a host backend the FFN-shape peak is also sampled after every measured step, and each step's
// rate is set against the sample after it ("matmul, paired": the median over steps), which a
// drifting shared machine moves far less than a single peak measurement.
//
// Usage: [scripts/mpirun.sh -np N] bench_step CONFIG [--warmup N] [--steps N] [--json FILE]
//        [--gemm-shapes] [--set k=v ...] [--versus k=v ...]
// --versus (repeatable): a second model, the config with these settings on top, trained in the
// same process with its steps alternating with the first's (the order swapped every step), and
// the per-step ratios second / first reported (median over the step pairs): forward + backward,
// update and whole step. The comparisons the benchmarks hold to a ratio (8 -> 128 experts,
// switch-8 vs dense) then see the same machine at the same moment: on a shared VM, separate
// processes of the same binary differed by up to 1.7x. The first model's figures are its own
// (allocations are counted around its steps only); peak RSS covers both models.
// --gemm-shapes (cpu backend): times every GEMM of the measured steps by shape and prints where
// the matmul time goes: per shape its calls, milliseconds and GFLOP/s per step against the
// FFN-shape peak, and all GEMMs together against the rest of the step. (The timing wraps each
// dnnl_sgemm call: it adds two clock reads per call, nothing else.)
// --json writes the numbers as one JSON object too (scripts/bench_gpu.sh reads it). On a GPU
// backend (train.backend=cuda) the GEMM peak is measured on random operands of the step's own
// precision (bf16 with train.precision=bf16: the MFU denominator), the square case at 8192^3 to
// fill the chip, and the device memory peak is reported. Every backend that counts its memory
// (cpu, cuda: Backend::memory_counts) reports its peak, split into what `switcht5 plan` counts
// and transient op scratch; scripts/bench_gpu.sh holds it to the plan. On cuda, also what
// cudaMemGetInfo says of the whole device after the steps.
// Under MPI (parallel.data/expert set to match) it also reports the bytes each rank sends in the
// expert all-to-all exchanges per step, against the analytical count
//   routed tokens x d_model x 4 bytes x 2 (dispatch + combine) x 2 (forward + backward)
//   x (P-1)/P (the share that leaves the rank),
// which the capacity buffers exceed by about the capacity factor (padding slots travel too).
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <new>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "config/config.h"
#include "comm/communicator.h"
#include "comm/mpi_communicator.h"
#include "comm/process_grid.h"
#include "core/check.h"
#include "core/dtype.h"
#include "core/rng.h"
#include "backend/cpu/cpu_backend.h"
#include "model/flops.h"
#include "train/comm_plan.h"
#include "train/trainer.h"
#if SWITCHT5_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

// Counts every C++ heap allocation, so the benchmark can prove the steady-state step makes none
// on the hot path.
static std::atomic<int64_t> g_allocations{0};
void* operator new(std::size_t n) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

using namespace switcht5;

// Best-of-5 GFLOP/s of C[M,N] = A[M,K] B[N,K]^T (the NT product of a linear layer) with A and B
// of type `type` on random data (never constants: they can run faster than real data), C fp32.
// Each timed round is `calls` back-to-back products, then one synchronisation.
double gemm_peak(Backend& be, int M, int N, int K, DType type) {
  const int64_t na = int64_t(M) * K, nb = int64_t(K) * N;
  DeviceArray<float> A(be, na), B(be, nb), C(be, int64_t(M) * N);
  std::vector<float> host(size_t(std::max(na, nb)));
  CounterRng rng(5);
  for (auto& x : host) x = float(rng.next_double() - 0.5);
  be.copy_to_device(A.data(), host.data(), A.bytes());
  be.copy_to_device(B.data(), host.data(), B.bytes());
  DeviceArray<uint16_t> A16, B16;
  const void *a = A.data(), *b = B.data();
  if (type == DType::kBF16) {
    A16 = DeviceArray<uint16_t>(be, na);
    B16 = DeviceArray<uint16_t>(be, nb);
    be.cast(A16.data(), DType::kBF16, A.data(), DType::kF32, na);
    be.cast(B16.data(), DType::kBF16, B.data(), DType::kF32, nb);
    a = A16.data();
    b = B16.data();
  }
  const int calls = be.host_accessible() ? 1 : 20;  // a GPU product takes about a millisecond
  double best = 1e30;
  for (int r = 0; r < 7; ++r) {
    be.synchronize();
    const auto t0 = std::chrono::steady_clock::now();
    for (int c = 0; c < calls; ++c)
      be.gemm_ex(false, true, M, N, K, 1.0f, a, type, K, 0, b, type, K, 0, 0.0f, C.data(),
                 DType::kF32, N, 0, 1);
    be.synchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r >= 2) best = std::min(best, s / calls);
  }
  return 2.0 * M * N * K / best * 1e-9;
}

// The FFN-shape GEMM peak sampled between steps on a host backend, so that each step's rate is
// compared with the machine's speed at that time: a shared machine drifts (the peak measured once
// after the steps moved between 163 and 312 GFLOP/s from run to run on one 2-vCPU VM). Host
// buffers, not the backend's memory, whose peak is held to `switcht5 plan`. A sample: one warm-up
// product, then the best of 3 (about 30 ms at bench-small's shape).
class HostGemmProbe {
 public:
  HostGemmProbe(int M, int N, int K, DType type) : M_(M), N_(N), K_(K), type_(type) {
    const size_t na = size_t(M) * K, nb = size_t(K) * N;
    CounterRng rng(6);
    a_.resize(na);
    b_.resize(nb);
    for (auto& x : a_) x = float(rng.next_double() - 0.5);
    for (auto& x : b_) x = float(rng.next_double() - 0.5);
    c_.resize(size_t(M) * N);
    if (type == DType::kBF16) {
      a16_.resize(na);
      b16_.resize(nb);
      for (size_t i = 0; i < na; ++i) a16_[i] = float_to_bf16(a_[i]);
      for (size_t i = 0; i < nb; ++i) b16_[i] = float_to_bf16(b_[i]);
    }
  }
  double sample(Backend& be) {
    const bool bf16 = type_ == DType::kBF16;
    const void* a = bf16 ? static_cast<const void*>(a16_.data()) : a_.data();
    const void* b = bf16 ? static_cast<const void*>(b16_.data()) : b_.data();
    double best = 1e30;
    for (int r = 0; r < 4; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      be.gemm_ex(false, true, M_, N_, K_, 1.0f, a, type_, K_, 0, b, type_, K_, 0, 0.0f,
                 c_.data(), DType::kF32, N_, 0, 1);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r >= 1) best = std::min(best, s);
    }
    return 2.0 * M_ * N_ * double(K_) / best * 1e-9;
  }

 private:
  int M_, N_, K_;
  DType type_;
  std::vector<float> a_, b_, c_;
  std::vector<uint16_t> a16_, b16_;
};

// Peak bytes of device memory (the CUDA arena's high-water mark), or -1 on a host backend (see
// peak RSS, and the backend's own count in backend_memory_json).
double device_peak_bytes(const Backend& be) {
#if SWITCHT5_HAVE_CUDA
  if (const auto* cuda = dynamic_cast<const CudaBackend*>(&be)) return double(cuda->peak_bytes());
#endif
  (void)be;
  return -1.0;
}

// The backend's memory counts (Backend::MemoryCounts: what `switcht5 plan` predicts, in the same
// blocks) as a JSON object, or null where the backend does not count.
std::string backend_memory_json(const Backend::MemoryCounts& m) {
  if (!m.counted) return "null";
  return fmt::format("{{\"block_bytes\": {}, \"in_use_bytes\": {}, \"live_blocks\": {}, "
                     "\"peak_bytes\": {}, \"held_peak_bytes\": {}, \"transient_peak_bytes\": {}}}",
                     m.block_bytes, m.in_use, m.live_blocks, m.peak, m.held_peak,
                     m.transient_peak);
}

// The whole device as cudaMemGetInfo sees it after the steps (the CUDA context, cuBLASLt's
// handle, the arena's reservation and any other process), as a JSON object and a line of text;
// "null" and "" on a host backend.
struct DeviceMemoryReport {
  std::string json = "null", line;
};
DeviceMemoryReport device_memory_report(const Backend& be) {
  DeviceMemoryReport r;
#if SWITCHT5_HAVE_CUDA
  if (const auto* cuda = dynamic_cast<const CudaBackend*>(&be)) {
    const CudaBackend::DeviceMemory m = cuda->device_memory();
    const size_t used = m.total - m.free, arena = cuda->arena_bytes();
    r.json = fmt::format("{{\"total_bytes\": {}, \"free_bytes\": {}, \"used_bytes\": {}, "
                         "\"arena_bytes\": {}}}",
                         m.total, m.free, used, arena);
    r.line = fmt::format("device (cudaMemGetInfo): {:.1f} MB used of {:.1f} MB: the arena's "
                         "reservation {:.1f} MB + {:.1f} MB outside it (CUDA context, modules, "
                         "cuBLASLt handle, other processes)",
                         used * 1e-6, m.total * 1e-6, arena * 1e-6,
                         (double(used) - double(arena)) * 1e-6);
  }
#endif
  (void)be;
  return r;
}

// Prints --gemm-shapes' table (slowest first) and returns it as a JSON array. Per step: a
// shape's calls, ms and GFLOP as run (an expert product's M or K is its buffer's capacity; the
// GFLOP counts the rows it ran); its GFLOP/s against `peak` (the FFN-shape peak measured above);
// and all GEMMs against the median step, whose remainder is everything that is not a GEMM.
std::string report_gemm_shapes(const CpuBackend::GemmProfile& profile, int steps,
                               double step_ms, double peak) {
  struct Row {
    CpuBackend::GemmShape shape;
    CpuBackend::GemmTime time;
    double flops;
  };
  std::vector<Row> rows;
  double total_s = 0, total_flops = 0;
  for (const auto& [shape, time] : profile) {
    const double flops = time.flops;  // as run: less the rows gemm_ex_rows skipped
    rows.push_back({shape, time, flops});
    total_s += time.seconds;
    total_flops += flops;
  }
  std::sort(rows.begin(), rows.end(),
            [](const Row& a, const Row& b) { return a.time.seconds > b.time.seconds; });
  const double gemm_ms = total_s * 1e3 / steps;
  fmt::print("gemm shapes (per step, over {} steps; C[M,N] = op(A) op(B), batch products each):\n",
             steps);
  fmt::print("  {:>2} {:>6} {:>6} {:>6} {:>5} {:>6} {:>9} {:>8} {:>9} {:>7}\n", "op", "M", "N",
             "K", "batch", "calls", "GFLOP", "ms", "GFLOP/s", "of peak");
  std::string json = "[";
  for (const Row& r : rows) {
    const double ms = r.time.seconds * 1e3 / steps, gflop = r.flops * 1e-9 / steps;
    const double rate = r.flops / r.time.seconds * 1e-9;
    const std::string op = std::string(r.shape.trans_a ? "T" : "N") + (r.shape.trans_b ? "T" : "N");
    fmt::print("  {:>2} {:>6} {:>6} {:>6} {:>5} {:>6.1f} {:>9.2f} {:>8.2f} {:>9.1f} {:>6.0f}%\n",
               op, r.shape.M, r.shape.N, r.shape.K, r.shape.batch, double(r.time.calls) / steps,
               gflop, ms, rate, 100.0 * rate / peak);
    json += fmt::format("{}{{\"op\": \"{}\", \"M\": {}, \"N\": {}, \"K\": {}, \"batch\": {}, "
                        "\"calls_per_step\": {:.2f}, \"gflop_per_step\": {:.4f}, "
                        "\"ms_per_step\": {:.4f}, \"gflops\": {:.2f}}}",
                        json.size() > 1 ? ", " : "", op, r.shape.M, r.shape.N, r.shape.K,
                        r.shape.batch, double(r.time.calls) / steps, gflop, ms, rate);
  }
  json += "]";
  const double rate = total_flops / total_s * 1e-9;
  fmt::print("gemm total: {:.1f} ms of the {:.1f} ms step ({:.0f}%) at {:.1f} GFLOP/s ({:.0f}% of "
             "the FFN-shape peak); everything else {:.1f} ms ({:.0f}%)\n",
             gemm_ms, step_ms, 100.0 * gemm_ms / step_ms, rate, 100.0 * rate / peak,
             step_ms - gemm_ms, 100.0 * (step_ms - gemm_ms) / step_ms);
  return fmt::format("{{\"gemm_ms_per_step\": {:.4f}, \"gemm_gflops\": {:.2f}, \"shapes\": {}}}",
                     gemm_ms, rate, json);
}

int run(int argc, char** argv) {
  SWT_USER_CHECK(argc >= 2,
                 "usage: bench_step CONFIG [--warmup N] [--steps N] [--json FILE] [--gemm-shapes] "
                 "[--set k=v ...] [--versus k=v ...]");
  std::string config = argv[1], json_path;
  int warmup = 2, steps = 5;
  bool gemm_shapes = false;
  std::vector<std::string> sets, versus;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--gemm-shapes") {
      gemm_shapes = true;
      continue;
    }
    SWT_USER_CHECK(i + 1 < argc, "{} needs a value", a);
    // A count: digits only, at least `min`.
    auto count = [&](const char* v, int min) {
      const std::string t = v;
      const bool digits = !t.empty() && t.size() < 9 &&
                          std::all_of(t.begin(), t.end(), [](char c) { return c >= '0' && c <= '9'; });
      SWT_USER_CHECK(digits && std::atoi(v) >= min, "{} {}: expected an integer >= {}", a, t, min);
      return std::atoi(v);
    };
    if (a == "--warmup") warmup = count(argv[++i], 0);
    else if (a == "--steps") steps = count(argv[++i], 1);
    else if (a == "--set") sets.push_back(argv[++i]);
    else if (a == "--versus") versus.push_back(argv[++i]);
    else if (a == "--json") json_path = argv[++i];
    else SWT_USER_CHECK(false, "unknown option {}", a);
  }
  RunConfig cfg = load_config(config, sets);
  cfg.train.steps = warmup + steps;
  ProcessGrid grid = ProcessGrid::create(mpi_world(), cfg.parallel.data, cfg.parallel.model,
                                         cfg.parallel.expert, cfg.parallel.timeout_s);
  Trainer trainer(cfg, grid);
  // The --versus model: its own Trainer (and backend) on the same grid. Host backends only: the
  // device memory report and the plan's memory check count one model.
  std::optional<Trainer> other;
  if (!versus.empty()) {
    SWT_USER_CHECK(trainer.backend().host_accessible(),
                   "--versus trains two models in one process on a host backend (cpu, "
                   "reference); this run's backend is {}",
                   trainer.backend().name());
    std::vector<std::string> other_sets = sets;
    other_sets.insert(other_sets.end(), versus.begin(), versus.end());
    try {
      RunConfig other_cfg = load_config(config, other_sets);
      other_cfg.train.steps = warmup + steps;
      other.emplace(other_cfg, grid);
    } catch (const UserError& e) {
      throw UserError(fmt::format("the --versus model: {}", e.what()));
    }
  }
  auto* cpu = dynamic_cast<CpuBackend*>(&trainer.backend());
  SWT_USER_CHECK(!gemm_shapes || cpu != nullptr,
                 "--gemm-shapes times the cpu backend's GEMMs; this run's backend is {}",
                 trainer.backend().name());
  CpuBackend::GemmProfile gemm_profile;
  for (int s = 1; s <= warmup; ++s) {
    trainer.train_step(s);
    if (other) other->train_step(s);
  }
  if (gemm_shapes) cpu->set_gemm_profile(&gemm_profile);
  std::vector<double> ms;
  const int64_t alloc0 = g_allocations.load();
  const int64_t syncs0 = trainer.backend().host_syncs();
  const int64_t bytes0 = trainer.model().alltoall_bytes_sent();
  const std::vector<std::string> groups = {"data", "expert_replica", "expert", "model"};
  auto payload_floats = [&] {
    int64_t n = 0;
    for (const std::string& g : groups)
      for (int64_t f : trainer.traffic(g).floats) n += f;
    return n;
  };
  const int64_t payload0 = payload_floats();
  // Per step: the whole step, and its update phase (clipping, optimizer, ZeRO-1 gather) apart;
  // on a host backend, the GEMM peak sampled after it (not timed, not profiled).
  const DType gemm_type = cfg.train.precision == "bf16" ? DType::kBF16 : DType::kF32;
  const int D = cfg.model.d_model, F = cfg.model.d_ff;
  const int rows = cfg.train.batch_size / cfg.train.grad_accum_steps * cfg.data.inputs_length;
  std::optional<HostGemmProbe> probe;
  if (trainer.backend().host_accessible()) probe.emplace(rows, F, D, gemm_type);
  std::vector<double> opt_ms, fb_ms, peak_samples, peak_fractions;
  // --versus: the other model's step s, its allocations left out of the first model's count
  // (the loaders' prefetch threads allocate whenever they refill, so either count may include a
  // refill of the other's). A pair with a skipped step (non-finite, no update) gives no ratio.
  std::vector<double> other_ms, other_opt_ms, other_fb_ms, ratio_ms, ratio_opt, ratio_fb;
  int64_t other_allocs = 0;
  StepMetrics om;
  auto other_step = [&](int s) {
    const int64_t a0 = g_allocations.load();
    om = other->train_step(s);
    other_allocs += g_allocations.load() - a0;
    other_ms.push_back(om.step_ms);
    other_opt_ms.push_back(om.optimizer_ms);
    other_fb_ms.push_back(om.step_ms - om.optimizer_ms);
  };
  // The step's matmul FLOPs as executed: on the cpu backend in one process, what it counted
  // (CpuBackend::executed_gemm_flops: the experts' products skip their buffers' empty rows, so
  // this varies with the routing); elsewhere flops.h's count over the whole capacity buffers.
  const bool counted_flops = cpu != nullptr && grid.world_size == 1;
  double executed_total = 0.0;
  std::vector<double> dropped;  // per step: tokens past capacity / routed, all Switch layers
  for (int s = warmup + 1; s <= warmup + steps; ++s) {
    // The order within a pair swaps every step; the GEMM peak is sampled right after this
    // model's step either way.
    const bool other_first = other && s % 2 == 0;
    if (other_first) other_step(s);
    const double flops0 = counted_flops ? cpu->executed_gemm_flops() : 0.0;
    const StepMetrics sm = trainer.train_step(s);
    const double step_flops =
        counted_flops ? cpu->executed_gemm_flops() - flops0 : trainer.step_flops();
    executed_total += step_flops;
    dropped.push_back(sm.dropped_fraction);
    ms.push_back(sm.step_ms);
    opt_ms.push_back(sm.optimizer_ms);
    fb_ms.push_back(sm.step_ms - sm.optimizer_ms);
    if (probe) {
      if (gemm_shapes) cpu->set_gemm_profile(nullptr);
      const double p = probe->sample(trainer.backend());
      if (gemm_shapes) cpu->set_gemm_profile(&gemm_profile);
      peak_samples.push_back(p);
      peak_fractions.push_back(step_flops / (sm.step_ms * 1e-3) * 1e-9 / p);
    }
    if (other && !other_first) other_step(s);
    if (other && !sm.skipped && !om.skipped && sm.optimizer_ms > 0 && om.optimizer_ms > 0) {
      ratio_ms.push_back(om.step_ms / sm.step_ms);
      ratio_opt.push_back(om.optimizer_ms / sm.optimizer_ms);
      ratio_fb.push_back((om.step_ms - om.optimizer_ms) / (sm.step_ms - sm.optimizer_ms));
    }
  }
  if (gemm_shapes) cpu->set_gemm_profile(nullptr);
  const int64_t allocs = g_allocations.load() - alloc0 - other_allocs;
  const double syncs = double(trainer.backend().host_syncs() - syncs0) / steps;
  const double a2a_bytes = double(trainer.model().alltoall_bytes_sent() - bytes0) / steps;
  // Data-plane payload per step (DataPlane::traffic) and what `switcht5 plan` predicts for it.
  const double payload = 4.0 * double(payload_floats() - payload0) / steps;
  const CommPlan cplan = plan_communication(cfg, {}, grid.data_rank);
  double planned_payload = 0;
  for (const PlannedCollective& c : cplan.collectives) planned_payload += 4.0 * double(c.floats);
  SWT_CHECK(!ms.empty(), "bench_step: no measured step (--steps {})", steps);
  std::sort(ms.begin(), ms.end());
  std::sort(opt_ms.begin(), opt_ms.end());
  std::sort(fb_ms.begin(), fb_ms.end());
  const double median = ms[ms.size() / 2];
  const double opt_median = opt_ms[opt_ms.size() / 2], fb_median = fb_ms[fb_ms.size() / 2];
  int64_t opt_floats = 0;
  for (const auto& t : trainer.optimizer().state()) {
    if (!t.data) continue;  // ZeRO-1: another rank's share
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    opt_floats += n;
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  const double tokens = double(cfg.train.batch_size) *
                        (cfg.data.inputs_length + cfg.data.targets_length);
  const double executed = executed_total / steps;  // per step, the mean over measured steps
  std::sort(dropped.begin(), dropped.end());
  const double achieved = executed / (median * 1e-3) * 1e-9;
  // Memory after the steps, before gemm_peak's buffers: what the plan of this config counts.
  const double device_peak = device_peak_bytes(trainer.backend());
  const Backend::MemoryCounts mem = trainer.backend().memory_counts();
  const std::string mem_json = backend_memory_json(mem);
  const DeviceMemoryReport device = device_memory_report(trainer.backend());
  const int square = trainer.backend().host_accessible() ? 2048 : 8192;
  const double peak = gemm_peak(trainer.backend(), rows, F, D, gemm_type);
  const double peak_square = gemm_peak(trainer.backend(), square, square, square, gemm_type);
  if (!grid.is_root()) return 0;  // rank 0 reports (its own rank's numbers)
  fmt::print("config {} | backend {} | batch {} x ({} + {}) tokens\n", cfg.source_path,
             trainer.backend().name(), cfg.train.batch_size, cfg.data.inputs_length,
             cfg.data.targets_length);
  fmt::print("step: median {:.1f} ms (min {:.1f}, max {:.1f}, {} steps after {} warmup)\n", median,
             ms.front(), ms.back(), steps, warmup);
  fmt::print("phases: data + forward + backward + reductions median {:.1f} ms; update (clip, "
             "optimizer, gather) median {:.1f} ms = {:.2f} ns per parameter\n",
             fb_median, opt_median,
             opt_median * 1e6 / double(trainer.model().params().total_numel()));
  fmt::print("throughput: {:.0f} tokens/s (encoder + decoder tokens)\n", tokens / (median * 1e-3));
  fmt::print("matmul: {:.2f} GFLOP/step -> {:.1f} GFLOP/s achieved; {} GEMM peak {:.1f} GFLOP/s "
             "({}x{}x{} FFN shape), {:.1f} GFLOP/s ({}^3): {:.0f}% of the FFN-shape peak\n",
             executed * 1e-9, achieved, dtype_name(gemm_type), peak, rows, F, D,
             peak_square, square, 100.0 * achieved / peak);
  // The drift-robust figure on a host backend: each step's rate against the peak sampled right
  // after it, the median over steps.
  double paired_fraction = -1.0;
  if (!peak_fractions.empty()) {
    std::sort(peak_samples.begin(), peak_samples.end());
    std::sort(peak_fractions.begin(), peak_fractions.end());
    paired_fraction = peak_fractions[peak_fractions.size() / 2];
    fmt::print("matmul, paired: each step against the FFN-shape peak sampled after it: median "
               "{:.0f}% (steps {:.0f}-{:.0f}%); the samples {:.1f} GFLOP/s median "
               "({:.1f}-{:.1f})\n",
               100.0 * paired_fraction, 100.0 * peak_fractions.front(),
               100.0 * peak_fractions.back(), peak_samples[peak_samples.size() / 2],
               peak_samples.front(), peak_samples.back());
  }
  // The useful work: every token through its top-1 expert once (flops.h, executed = false).
  const double model_flops =
      3.0 * forward_matmul_flops(cfg.model, cfg.train.batch_size, cfg.data.inputs_length,
                                 cfg.data.targets_length, /*training=*/true, /*executed=*/false);
  const double useful = model_flops / (median * 1e-3) * 1e-9;
  fmt::print("model FLOPs (each token through its top-1 expert once): {:.2f} GFLOP/step -> "
             "{:.1f} GFLOP/s useful, {:.0f}% of the FFN-shape peak; executed / model {:.3f}x "
             "({}); the capacity buffers whole: {:.3f}x\n",
             model_flops * 1e-9, useful, 100.0 * useful / peak, executed / model_flops,
             counted_flops ? "as the backend ran them: less the empty slots it skipped and the "
                             "dropped tokens"
                           : "empty capacity slots included",
             trainer.step_flops() / model_flops);
  if (cfg.model.num_experts > 1)
    fmt::print("routing: {:.1f}% of the routed tokens dropped (median over steps; {:.1f}-{:.1f}%): "
               "the expert products' work on the cpu backend follows the routing\n",
               100.0 * dropped[dropped.size() / 2], 100.0 * dropped.front(),
               100.0 * dropped.back());
  fmt::print("memory: peak RSS {:.1f} MB{}; parameters {:.1f} MB; optimizer state {:.2f} MB; "
             "activations {:.1f} MB ({:.1f} MB kept for backward, {} compute dtype)\n",
             ru.ru_maxrss / 1024.0, other ? " (both models)" : "",
             trainer.model().params().total_numel() * 4e-6,
             opt_floats * 4e-6, double(trainer.model().activation_bytes()) * 1e-6,
             double(trainer.model().kept_activation_bytes()) * 1e-6,
             dtype_name(trainer.model().params().compute_dtype()));
  if (mem.counted)
    fmt::print("backend memory: peak {:.1f} MB = held {:.1f} MB (what `switcht5 plan` counts) + "
               "up to {:.1f} MB transient op scratch; {} live blocks of {}-byte granules\n",
               mem.peak * 1e-6, mem.held_peak * 1e-6, mem.transient_peak * 1e-6, mem.live_blocks,
               mem.block_bytes);
  if (device_peak >= 0) fmt::print("device memory: arena peak {:.1f} MB\n", device_peak * 1e-6);
  if (!device.line.empty()) fmt::print("{}\n", device.line);
  fmt::print("heap allocations in {} steady-state steps: {} ({:.1f} per step)\n", steps, allocs,
             double(allocs) / steps);
  std::string shapes_json = "null";
  if (gemm_shapes) shapes_json = report_gemm_shapes(gemm_profile, steps, median, peak);
  // Backend calls that hand data to the host (copy_to_host, sum, sum_squares, count_nonfinite):
  // each waits for the device on a GPU backend.
  fmt::print("host synchronisations: {:.1f} per step\n", syncs);
  if (grid.expert > 1) {
    // Routed tokens per rank per step: every Switch layer routes the rank's encoder or decoder
    // tokens once.
    const int P = grid.expert;
    const double rows = double(cfg.train.batch_size) / grid.data;
    double routed = 0;
    for (const std::string& layer : trainer.model().switch_layer_names())
      routed += rows * (layer.rfind("encoder", 0) == 0 ? cfg.data.inputs_length
                                                       : cfg.data.targets_length);
    const double analytical = routed * D * 4.0 * 2 * 2 * (P - 1) / P;
    fmt::print("all-to-all: {:.2f} MB sent per rank per step; analytical {:.2f} MB (ratio {:.3f}; "
               "capacity factor {})\n",
               a2a_bytes * 1e-6, analytical * 1e-6, a2a_bytes / analytical,
               cfg.model.capacity_factor);
  }
  if (grid.world_size > 1) {
    fmt::print("data plane: {:.2f} MB payload per rank per step; `switcht5 plan` predicts {:.2f} MB\n",
               payload * 1e-6, planned_payload * 1e-6);
    fmt::print("ranks: {} (this report is rank {}'s)\n", grid.describe(), grid.world_rank);
  }
  std::string versus_json = "null";
  if (other && ratio_ms.empty()) {
    fmt::print("versus: no step pair without a skipped step, so no ratios\n");
    versus_json = "{\"pairs\": 0}";
  } else if (other) {
    auto median_of = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    auto range = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return fmt::format("{:.3f}-{:.3f}", v.front(), v.back());
    };
    std::string what;
    for (const std::string& v : versus) what += (what.empty() ? "" : " ") + v;
    const double r_fb = median_of(ratio_fb), r_opt = median_of(ratio_opt), r_ms = median_of(ratio_ms);
    fmt::print("versus [{}], in this process, steps alternating: per-step ratios versus / this "
               "model, median over {} pairs: forward + backward {:.3f}x ({}), update {:.3f}x "
               "({}), step {:.3f}x ({}); the versus model's medians: step {:.1f} ms, forward + "
               "backward {:.1f} ms, update {:.1f} ms\n",
               what, ratio_ms.size(), r_fb, range(ratio_fb), r_opt, range(ratio_opt), r_ms,
               range(ratio_ms), median_of(other_ms), median_of(other_fb_ms),
               median_of(other_opt_ms));
    std::string sets_json;
    for (const std::string& v : versus) {
      std::string escaped;
      for (char c : v) {
        if (c == '"' || c == '\\') escaped += '\\';
        escaped += c;
      }
      sets_json += fmt::format("{}\"{}\"", sets_json.empty() ? "" : ", ", escaped);
    }
    versus_json = fmt::format(
        "{{\"sets\": [{}], \"pairs\": {}, \"forward_backward_ratio_median\": {:.4f}, "
        "\"optimizer_ratio_median\": {:.4f}, \"step_ratio_median\": {:.4f}, "
        "\"ms_median\": {:.4f}, \"forward_backward_ms_median\": {:.4f}, "
        "\"optimizer_ms_median\": {:.4f}}}",
        sets_json, ratio_ms.size(), r_fb, r_opt, r_ms, median_of(other_ms),
        median_of(other_fb_ms), median_of(other_opt_ms));
  }
  if (!json_path.empty()) {
    std::FILE* f = std::fopen(json_path.c_str(), "w");
    SWT_USER_CHECK(f != nullptr, "cannot write {}", json_path);
    fmt::print(f,
               "{{\"config\": \"{}\", \"backend\": \"{}\", \"precision\": \"{}\", "
               "\"batch\": {}, \"inputs_length\": {}, \"targets_length\": {}, \"steps\": {}, "
               "\"warmup\": {}, \"ms_median\": {:.4f}, \"ms_min\": {:.4f}, \"ms_max\": {:.4f}, "
               "\"forward_backward_ms_median\": {:.4f}, \"optimizer_ms_median\": {:.4f}, "
               "\"tokens_per_s\": {:.1f}, \"step_flops\": {:.6e}, \"capacity_flops\": {:.6e}, "
               "\"step_flops_counted\": {}, \"achieved_gflops\": {:.2f}, "
               "\"model_flops\": {:.6e}, \"useful_gflops\": {:.2f}, "
               "\"paired_peak_fraction\": {:.4f}, "
               "\"gemm_type\": \"{}\", \"gemm_ffn_gflops\": {:.2f}, \"gemm_ffn_shape\": [{}, {}, {}], "
               "\"gemm_square_gflops\": {:.2f}, \"gemm_square\": {}, \"peak_rss_mb\": {:.1f}, "
               "\"device_peak_mb\": {:.1f}, \"params\": {}, \"host_syncs_per_step\": {:.2f}, "
               "\"heap_allocs_per_step\": {:.2f}, \"backend_memory\": {}, "
               "\"device_memory\": {}, \"world_size\": {}, \"data_plane_bytes_per_step\": {:.0f}, "
               "\"planned_data_plane_bytes_per_step\": {:.0f}, \"gemm_shapes\": {}, "
               "\"versus\": {}}}\n",
               cfg.source_path, trainer.backend().name(), cfg.train.precision,
               cfg.train.batch_size, cfg.data.inputs_length, cfg.data.targets_length, steps, warmup,
               median, ms.front(), ms.back(), fb_median, opt_median, tokens / (median * 1e-3),
               executed, trainer.step_flops(), counted_flops ? "true" : "false",
               achieved, model_flops, useful, paired_fraction, dtype_name(gemm_type), peak, rows, F, D, peak_square, square,
               ru.ru_maxrss / 1024.0, device_peak >= 0 ? device_peak * 1e-6 : -1.0, trainer.model().params().total_numel(),
               syncs, double(allocs) / steps, mem_json, device.json, grid.world_size, payload,
               planned_payload, shapes_json, versus_json);
    std::fclose(f);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_step: error: %s\n", e.what());
    return 2;
  }
}
