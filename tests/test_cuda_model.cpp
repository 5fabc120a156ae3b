// The CUDA backend against the CPU backend on the whole model and whole runs (ctest label `gpu`):
//  (a) one forward + backward of SwitchT5Model: loss, logits and every parameter gradient, fp32
//      against fp32 and bf16 against the CPU's bf16 emulation (train.precision bf16);
//  (b) 50 training steps of configs/tiny-synthetic.yaml: CUDA losses equal the CPU's (1e-4
//      relative) at every step until a routing decision first differs, which may not happen in
//      the first 20 steps (expect_same_trajectory says why), and two CUDA runs are bitwise equal;
//  (c) a checkpoint saved on CUDA resumes on the CPU and one saved on the CPU resumes on CUDA,
//      continuing the run they came from (1e-4 relative, same routing, for 10 steps), and CUDA's
//      own resume is bitwise;
//  (d) the arena holds exactly what `switcht5 plan` counts (bench_gpu.sh checks the same at
//      switch-base-8 scale), its peak exceeding that only by the transient GEMM scratch.
// Compiled in every build. Without the CUDA backend (built without -DSWITCHT5_CUDA=ON) or
// without a usable GPU every test skips, printing why.
//
// Tolerances. The CUDA backend computes with the CPU backend's formulas and rounding points
// (backend/backend.h; fp32 GEMMs without TF32), so fp32 differs from the CPU only in summation
// order: about 1e-6 relative per tensor after a pass, held to 1e-4 (relative L2 per tensor, the
// measure of METHOD.md). bf16 stores activations and weights with 8 significant bits (unit
// roundoff 2^-9 = 2e-3); a different fp32 summation order before a rounding flips a value by
// one bf16 ulp (up to 2^-8 = 4e-3 relative) now and then, and such flips compound through the
// 5 blocks and the backward pass. Whole-tensor relative L2 differences then sit at a few 1e-3;
// 2e-2 on gradients and logits and 1e-2 on the loss leave room for that and still catch any
// wrong formula, index or mask, which is off by O(1). The routing (top-1 expert per token) is
// compared exactly, so a flipped routing decision, the one thing that would make bf16 differ by
// more than rounding, is named as such.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/backend.h"
#include "config/config.h"
#include "model/model.h"
#include "model_test_util.h"
#include "test_util.h"
#include "comm/process_grid.h"
#include "train/memory_plan.h"
#include "train/train_loop.h"
#include "train/trainer.h"

namespace switcht5 {
namespace {

using testing::download;
namespace fs = std::filesystem;

const std::string kTiny = std::string(SWITCHT5_SOURCE_DIR) + "/configs/tiny-synthetic.yaml";

// Why the CUDA backend cannot run here, or "" when it can. Built once: the first use makes a
// backend, allocates and copies a few bytes (a driver or device problem shows up there).
const std::string& cuda_unavailable() {
  static const std::string reason = []() -> std::string {
#if SWITCHT5_HAVE_CUDA
    try {
      std::unique_ptr<Backend> be = make_backend("cuda");
      if (be->name() != "cuda") return "make_backend(\"cuda\") returned backend " + be->name();
      DeviceArray<float> x(*be, 16);
      be->fill(x.data(), 1.0f, 16);
      std::vector<float> h = download(*be, x.data(), 16);
      if (h[15] != 1.0f) return "the CUDA backend's fill/copy_to_host does not work";
      return "";
    } catch (const std::exception& e) {
      return std::string("no usable GPU: ") + e.what();
    }
#else
    return "this build has no CUDA backend (configure with -DSWITCHT5_CUDA=ON where the CUDA "
           "toolkit is)";
#endif
  }();
  return reason;
}

#define SKIP_WITHOUT_CUDA()                                                          \
  do {                                                                               \
    if (!cuda_unavailable().empty()) {                                               \
      std::printf("skipped: %s\n", cuda_unavailable().c_str());                      \
      GTEST_SKIP() << cuda_unavailable();                                            \
    }                                                                                \
  } while (0)

// ||a - b|| / ||b|| in double; 0 when both are zero, infinity when only b is.
double relative_l2(const float* a, const float* b, int64_t n) {
  double diff = 0.0, ref = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = double(a[i]) - double(b[i]);
    diff += d * d;
    ref += double(b[i]) * double(b[i]);
  }
  if (ref == 0.0) return diff == 0.0 ? 0.0 : INFINITY;
  return std::sqrt(diff / ref);  // NaN in either gives NaN, which fails every <= check
}
double relative_l2(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  return relative_l2(a.data(), b.data(), int64_t(std::min(a.size(), b.size())));
}
double relative(double a, double b) { return std::fabs(a - b) / std::max(std::fabs(b), 1e-30); }

// ---- (a) one forward + backward of the model -------------------------------------------------

struct ModelCase {
  const char* name;
  int sparse_step;
  const char* ffn;
  bool tied;
};

struct PassResult {
  double ce_sum = 0.0;
  std::vector<RouterStats> router;  // encoder then decoder Switch layers
  std::vector<float> logits, grads;
  std::vector<ParamInfo> infos;
};

class CudaModel : public ::testing::TestWithParam<ModelCase> {
 protected:
  // The same parameters (seeded init) and batch on `backend` in `precision`.
  PassResult run(const std::string& backend, DType precision) {
    const ModelCase c = GetParam();
    const ModelConfig m = testing::tiny_model_config(c.sparse_step, c.ffn, c.tied);
    // Ti = 37: key lengths that are not a multiple of 32 (a warp) nor of 4; padded rows.
    const int B = 3, Ti = 37, Tt = 11;
    const Batch batch = testing::padded_batch(B, Ti, Tt, /*pad_per_row=*/5);
    const LossWeights w{1.0 / double(batch.target_tokens()), 1e-3, 1.0};
    auto be = make_backend(backend);
    SwitchT5Model model(*be, m, {B, Ti, Tt}, {}, precision);
    model.params().initialize(*be, 8);
    PassResult r;
    const ForwardStats& st = model.forward(batch, /*training=*/true, 1234);
    r.ce_sum = st.ce_sum;
    r.router = st.encoder_router;
    r.router.insert(r.router.end(), st.decoder_router.begin(), st.decoder_router.end());
    r.logits = download(*be, model.logits(), int64_t(B) * Tt * m.vocab_size);
    model.backward(w);
    r.grads = download(*be, model.params().grads(), model.params().total_numel());
    r.infos = model.params().infos();
    return r;
  }

  // Loss, routing, logits and every parameter's gradient of `gpu` against `cpu`.
  static void compare(const PassResult& gpu, const PassResult& cpu, double loss_tol,
                      double tensor_tol) {
    EXPECT_LE(relative(gpu.ce_sum, cpu.ce_sum), loss_tol)
        << "loss: cuda " << gpu.ce_sum << " cpu " << cpu.ce_sum;
    ASSERT_EQ(gpu.router.size(), cpu.router.size());
    for (size_t i = 0; i < cpu.router.size(); ++i) {
      EXPECT_EQ(gpu.router[i].dropped, cpu.router[i].dropped) << "Switch layer " << i;
      EXPECT_EQ(gpu.router[i].expert_fraction, cpu.router[i].expert_fraction)
          << "Switch layer " << i << ": tokens per expert differ (a flipped routing decision)";
      EXPECT_LE(relative(gpu.router[i].balance_loss, cpu.router[i].balance_loss), loss_tol)
          << "Switch layer " << i;
    }
    const double logits_err = relative_l2(gpu.logits, cpu.logits);
    EXPECT_LE(logits_err, tensor_tol) << "logits";
    ASSERT_EQ(gpu.grads.size(), cpu.grads.size());
    double worst = 0.0;
    std::string worst_name;
    for (const ParamInfo& p : cpu.infos) {
      const double e =
          relative_l2(gpu.grads.data() + p.offset, cpu.grads.data() + p.offset, p.numel);
      EXPECT_LE(e, tensor_tol) << "gradient of " << p.name;
      if (!(e <= worst)) { worst = e; worst_name = p.name; }
    }
    std::printf("loss rel %.3g, logits rel L2 %.3g, worst gradient rel L2 %.3g (%s) over %zu "
                "tensors\n",
                relative(gpu.ce_sum, cpu.ce_sum), logits_err, worst, worst_name.c_str(),
                cpu.infos.size());
  }
};

TEST_P(CudaModel, Fp32MatchesCpu) {
  SKIP_WITHOUT_CUDA();
  const PassResult cpu = run("cpu", DType::kF32), gpu = run("cuda", DType::kF32);
  compare(gpu, cpu, 1e-4, 1e-4);
}

TEST_P(CudaModel, Bf16MatchesCpuEmulation) {
  SKIP_WITHOUT_CUDA();
  const PassResult cpu = run("cpu", DType::kBF16), gpu = run("cuda", DType::kBF16);
  compare(gpu, cpu, 1e-2, 2e-2);
  // The bf16 path is really taken on the GPU: its loss is not fp32's.
  const PassResult gpu32 = run("cuda", DType::kF32);
  EXPECT_NE(gpu.ce_sum, gpu32.ce_sum) << "CUDA bf16 gave CUDA fp32's loss";
}

INSTANTIATE_TEST_SUITE_P(Tiny, CudaModel,
                         ::testing::Values(ModelCase{"dense_relu_tied", 0, "relu", true},
                                           ModelCase{"switch_relu_tied", 2, "relu", true},
                                           ModelCase{"switch_gated_untied", 1, "gated-gelu", false}),
                         [](const auto& info) { return std::string(info.param.name); });

// ---- (b), (c) training runs --------------------------------------------------------------------

std::string temp_dir(const std::string& name) {
  auto dir = fs::temp_directory_path() / ("switcht5_cuda_" + name);
  fs::remove_all(dir);
  return dir.string();
}

// tiny-synthetic with dropout, expert dropout and jitter off (their masks are bitwise equal on
// both backends, but off keeps this test about the arithmetic), every step logged.
RunConfig tiny(const std::string& backend, std::vector<std::string> sets) {
  std::vector<std::string> all = {"train.backend=" + backend, "log.every=1",
                                  "model.dropout_rate=0", "model.expert_dropout=0",
                                  "model.router_jitter_noise=0"};
  all.insert(all.end(), sets.begin(), sets.end());
  return load_config(kTiny, all);
}

// Whether two logged steps routed the same numbers of tokens to every expert of every layer.
bool same_routing(const StepMetrics& x, const StepMetrics& y) {
  if (x.routing.size() != y.routing.size()) return false;
  for (size_t i = 0; i < x.routing.size(); ++i)
    if (x.routing[i].expert_fraction != y.routing[i].expert_fraction ||
        x.routing[i].dropped_fraction != y.routing[i].dropped_fraction)
      return false;
  return true;
}

// Two runs of the same training on two backends follow the same trajectory. Top-1 routing is
// discontinuous: once fp32 summation-order differences (1e-8 .. 1e-6) flip one token's expert,
// the runs are two different trainings and their losses drift apart for good. Measured here with
// the reference backend against the CPU backend (both correct, differing only in summation
// order) on this test's 50 steps: losses agree to 2e-7 through step 37 and to 2e-5 through step
// 41, routing first differs at step 42, and by step 50 losses differ by 2.3e-3. So:
//  - every step before the first step whose routing differs: loss within `tol` (1e-4);
//  - routing identical for at least `min_same_routing` steps (a flip within them is more than a
//    rare near-tie: a router logit or capacity off by more than rounding);
//  - after routing differs: each loss within `after_tol` (5e-2), the two trainings still tracking.
// Returns the largest relative loss difference before routing differs.
double expect_same_trajectory(const TrainResult& a, const TrainResult& b, int64_t first,
                              int64_t last, double tol, int64_t min_same_routing,
                              double after_tol, const char* what) {
  double worst = 0.0;
  int64_t compared = 0, diverged_at = -1;
  for (const StepMetrics& x : a.logged) {
    if (x.step < first || x.step > last) continue;
    const auto y = std::find_if(b.logged.begin(), b.logged.end(),
                                [&](const StepMetrics& m) { return m.step == x.step; });
    if (y == b.logged.end()) {
      ADD_FAILURE() << what << ": step " << x.step << " missing";
      continue;
    }
    ++compared;
    EXPECT_FALSE(x.skipped || y->skipped) << what << ": step " << x.step << " skipped";
    if (diverged_at < 0 && !same_routing(x, *y)) diverged_at = x.step;
    const double e = relative(x.loss, y->loss);
    if (diverged_at < 0) {
      EXPECT_LE(e, tol) << what << ": step " << x.step << " loss " << x.loss << " vs " << y->loss;
      worst = std::max(worst, std::isnan(e) ? INFINITY : e);
    } else {
      EXPECT_LE(e, after_tol) << what << ": step " << x.step << " (routing differs since step "
                              << diverged_at << ") loss " << x.loss << " vs " << y->loss;
    }
  }
  EXPECT_EQ(compared, last - first + 1) << what;
  if (diverged_at >= 0) {
    EXPECT_GE(diverged_at - first, min_same_routing)
        << what << ": routing (tokens per expert) differs from step " << diverged_at;
  }
  std::printf("%s: steps %lld..%lld, routing %s, largest relative loss difference before that "
              "%.3g\n",
              what, (long long)first, (long long)last,
              diverged_at < 0 ? "identical throughout"
                              : ("first differs at step " + std::to_string(diverged_at)).c_str(),
              worst);
  return worst;
}

TEST(CudaTraining, FiftyStepsMatchCpuAndRepeatBitwise) {
  SKIP_WITHOUT_CUDA();
  const TrainResult cpu = train(tiny("cpu", {"train.steps=50"}), temp_dir("cpu50"));
  const TrainResult a = train(tiny("cuda", {"train.steps=50"}), temp_dir("cuda50_a"));
  const TrainResult b = train(tiny("cuda", {"train.steps=50"}), temp_dir("cuda50_b"));
  ASSERT_EQ(cpu.logged.size(), 50u);
  ASSERT_EQ(a.logged.size(), 50u);
  ASSERT_EQ(b.logged.size(), 50u);
  expect_same_trajectory(a, cpu, 1, 50, 1e-4, 20, 5e-2, "cuda vs cpu, 50 steps");
  // The task is being learned on the GPU (not a frozen or diverging run that happens to agree).
  EXPECT_LT(a.logged.back().loss, a.logged.front().loss);
  for (size_t i = 0; i < a.logged.size(); ++i) {
    EXPECT_EQ(a.logged[i].loss, b.logged[i].loss) << "step " << a.logged[i].step;
    EXPECT_EQ(a.logged[i].grad_norm, b.logged[i].grad_norm) << "step " << a.logged[i].step;
    EXPECT_EQ(a.logged[i].aux_loss, b.logged[i].aux_loss) << "step " << a.logged[i].step;
    EXPECT_EQ(a.logged[i].z_loss, b.logged[i].z_loss) << "step " << a.logged[i].step;
  }
}

// train.cuda_graphs: every step after the first replays one CUDA graph of the step's forward
// and backward. With dropout, expert dropout and jitter on (their masks keyed by the step
// counter in device memory), two micro-batches and a CE scale that changes every step, the run
// equals the eager one bit for bit (the same kernels on the same data in the same order). The
// same comparison runs on the CPU with a recording of CUDA graph semantics (test_device_memory).
TEST(CudaTraining, GraphsOnEqualGraphsOffBitwise) {
  SKIP_WITHOUT_CUDA();
  for (const char* precision : {"fp32", "bf16"}) {
    SCOPED_TRACE(precision);
    const std::vector<std::string> sets = {
        "train.steps=12", "train.grad_accum_steps=2", std::string("train.precision=") + precision,
        "model.dropout_rate=0.1", "model.expert_dropout=0.2", "model.router_jitter_noise=0.01"};
    std::vector<std::string> graph_sets = sets;
    graph_sets.push_back("train.cuda_graphs=true");
    const TrainResult off = train(tiny("cuda", sets), temp_dir(std::string("graphs_off_") + precision));
    const TrainResult on = train(tiny("cuda", graph_sets), temp_dir(std::string("graphs_on_") + precision));
    ASSERT_EQ(on.logged.size(), 12u);
    ASSERT_EQ(off.logged.size(), 12u);
    EXPECT_NE(on.logged[10].loss, on.logged[11].loss);
    for (size_t i = 0; i < on.logged.size(); ++i) {
      EXPECT_EQ(on.logged[i].loss, off.logged[i].loss) << "step " << on.logged[i].step;
      EXPECT_EQ(on.logged[i].grad_norm, off.logged[i].grad_norm) << "step " << on.logged[i].step;
      EXPECT_EQ(on.logged[i].aux_loss, off.logged[i].aux_loss) << "step " << on.logged[i].step;
      EXPECT_TRUE(same_routing(on.logged[i], off.logged[i])) << "step " << on.logged[i].step;
    }
  }
}

TEST(CudaTraining, CheckpointsResumeAcrossBackends) {
  SKIP_WITHOUT_CUDA();
  // Straight 20-step runs on each backend, checkpointing at 10 (and 20).
  const std::vector<std::string> straight = {"train.steps=20", "checkpoint.every=10"};
  const std::string cuda_dir = temp_dir("resume_cuda"), cpu_dir = temp_dir("resume_cpu");
  const TrainResult cuda = train(tiny("cuda", straight), cuda_dir);
  const TrainResult cpu = train(tiny("cpu", straight), cpu_dir);
  const std::string ckpt10 = "/checkpoints/ckpt-00000010.h5";
  ASSERT_TRUE(fs::exists(cuda_dir + ckpt10));
  ASSERT_TRUE(fs::exists(cpu_dir + ckpt10));

  // Steps 11..20 resumed from the other backend's step-10 checkpoint continue that run.
  TrainOptions from_cuda, from_cpu;
  from_cuda.resume = cuda_dir + ckpt10;
  from_cpu.resume = cpu_dir + ckpt10;
  const TrainResult cpu_from_cuda = train(tiny("cpu", straight), temp_dir("cpu_from_cuda"), from_cuda);
  const TrainResult cuda_from_cpu = train(tiny("cuda", straight), temp_dir("cuda_from_cpu"), from_cpu);
  EXPECT_EQ(cpu_from_cuda.start_step, 10);
  EXPECT_EQ(cuda_from_cpu.start_step, 10);
  // Ten steps: routing must agree on all of them (min_same_routing 10).
  expect_same_trajectory(cpu_from_cuda, cuda, 11, 20, 1e-4, 10, 0.0,
                         "CUDA checkpoint resumed on the CPU");
  expect_same_trajectory(cuda_from_cpu, cpu, 11, 20, 1e-4, 10, 0.0,
                         "CPU checkpoint resumed on CUDA");

  // CUDA resuming its own checkpoint is bitwise the straight run.
  const TrainResult cuda_again = train(tiny("cuda", straight), temp_dir("cuda_from_cuda"), from_cuda);
  ASSERT_EQ(cuda_again.logged.size(), 10u);
  for (const StepMetrics& x : cuda_again.logged) {
    const StepMetrics& y = cuda.logged[size_t(x.step - 1)];
    ASSERT_EQ(y.step, x.step);
    EXPECT_EQ(x.loss, y.loss) << "CUDA resume, step " << x.step;
    EXPECT_EQ(x.grad_norm, y.grad_norm) << "CUDA resume, step " << x.step;
  }
}

// ---- (d) memory against the plan ----------------------------------------------------------------

// The arena's blocks outside transient scratch (CudaBackend::memory_counts' held bytes) are the
// plan's total, rounding and the backend's workspaces included, after construction and through
// training and an evaluation; the peak lies between it and it plus the transient scratch, which
// bf16 needs (its backward GEMMs take fp32 dy with bf16 weights: the weights are widened).
TEST(CudaTraining, ArenaHoldsThePlannedBytes) {
  SKIP_WITHOUT_CUDA();
  for (const char* precision : {"fp32", "bf16"}) {
    SCOPED_TRACE(precision);
    const RunConfig cfg = tiny("cuda", {std::string("train.precision=") + precision,
                                        "train.eval_batches=1"});
    const MemoryPlan plan = plan_memory(cfg);
    ProcessGrid grid = ProcessGrid::create(make_self_communicator(), 1, 1, 1);
    Trainer trainer(cfg, grid);
    Backend::MemoryCounts m = trainer.backend().memory_counts();
    ASSERT_TRUE(m.counted);
    EXPECT_EQ(m.block_bytes, 256);
    EXPECT_EQ(m.in_use, plan.total) << "after construction";
    for (int64_t step = 1; step <= 2; ++step) EXPECT_FALSE(trainer.train_step(step).skipped);
    if (trainer.has_validation()) trainer.evaluate();
    m = trainer.backend().memory_counts();
    EXPECT_EQ(m.in_use, plan.total) << "after training";
    EXPECT_EQ(m.held_peak, plan.total);
    EXPECT_GE(m.peak, plan.total);
    EXPECT_LE(m.peak, plan.total + m.transient_peak);
    if (std::string(precision) == "bf16") {
      EXPECT_GT(m.transient_peak, 0);
    }
  }
}

}  // namespace
}  // namespace switcht5
