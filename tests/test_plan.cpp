// `switcht5 plan`'s memory per rank (train/memory_plan.h) is what training allocates, exactly:
// a real Trainer on a counting backend, after training steps and an evaluation, holds the bytes
// the plan counted on its sizing backend, and the plan's parts add up to its count. Then the
// command as a user runs it: text, --json, and a layout it refuses.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/cuda_env.h"
#include "backend/cuda/cuda_memory.h"
#include "backend/sizing_backend.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "core/check.h"
#include "guarded_backend.h"
#include "model/flops.h"
#include "model/params.h"
#include "test_util.h"
#include "train/memory_plan.h"
#include "train/trainer.h"

namespace switcht5 {
namespace {

const std::string kConfigs = std::string(SWITCHT5_SOURCE_DIR) + "/configs/";
const std::string kBin = std::string(SWITCHT5_BINARY_DIR) + "/switcht5";

struct PlanCase {
  const char* name;
  const char* config;
  std::vector<std::string> sets;
};

// bench-small at a size a CPU steps in a second: its vocabulary and widths, shorter sequences
// and batch, router jitter on (a Switch layer then keeps a jittered copy of its input).
const std::vector<std::string> kBenchSmallish = {
    "train.batch_size=2", "data.inputs_length=64", "data.targets_length=16",
    "model.router_jitter_noise=0.01", "train.eval_batches=1", "train.eval_every=1"};

std::vector<PlanCase> plan_cases() {
  std::vector<PlanCase> cases = {
      {"tiny_fp32", "tiny-synthetic.yaml", {"train.precision=fp32"}},
      {"tiny_bf16_adamw_accum2", "tiny-synthetic.yaml",
       {"train.precision=bf16", "train.optimizer=adamw", "train.grad_accum_steps=2"}},
      {"bench_small_fp32", "bench-small.yaml", kBenchSmallish},
      {"bench_small_bf16", "bench-small.yaml", kBenchSmallish},
  };
  cases[2].sets.push_back("train.precision=fp32");
  cases[3].sets.push_back("train.precision=bf16");
  return cases;
}

class PlanMatchesTraining : public ::testing::TestWithParam<PlanCase> {};

TEST_P(PlanMatchesTraining, CountedBytesAreWhatATrainerAllocates) {
  const PlanCase& c = GetParam();
  const RunConfig cfg = load_config(kConfigs + c.config, c.sets);
  const MemoryPlan plan = plan_memory(cfg);
  EXPECT_EQ(plan.other, 0) << "an allocation of the step state is in no part of the plan";
  EXPECT_GT(plan.kept_activations, 0);
  EXPECT_GT(plan.optimizer_state, 0);
  EXPECT_EQ(plan.compute_copy, cfg.train.precision == "bf16" ? plan.master_params / 2 : 0);
  EXPECT_EQ(plan.total, plan.counted + plan.rounding);  // cpu: no backend workspaces

  ProcessGrid grid = ProcessGrid::create(make_self_communicator(), 1, 1, 1);
  Trainer trainer(cfg, grid, TrainerUse::kTrain, testing::guarded_backend_factory());
  auto& be = dynamic_cast<testing::GuardedBackend&>(trainer.backend());
  EXPECT_EQ(int64_t(be.requested_bytes()), plan.counted) << "after construction";
  for (int64_t step = 1; step <= 2; ++step) EXPECT_FALSE(trainer.train_step(step).skipped);
  ASSERT_TRUE(trainer.has_validation());
  trainer.evaluate();
  // A step allocates nothing of its own: what construction holds is the peak.
  EXPECT_EQ(int64_t(be.requested_bytes()), plan.counted) << "after training and evaluation";
  EXPECT_EQ(int64_t(be.peak_requested_bytes()), plan.counted);
}

// bench_step's memory check on the cpu backend (scripts/bench_gpu.sh, gpu_check.sh
// --cpu-dry-run): the backend's own count of its live 64-byte blocks (Backend::memory_counts) is
// the plan's total, rounding included, after construction and as the peak of training and an
// evaluation; the CPU backend has no transient blocks. (On cuda, test_cuda_model holds the arena
// to the plan the same way.)
TEST_P(PlanMatchesTraining, CpuBackendCountsThePlanTotal) {
  const PlanCase& c = GetParam();
  const RunConfig cfg = load_config(kConfigs + c.config, c.sets);
  ASSERT_EQ(cfg.train.backend, "cpu");
  const MemoryPlan plan = plan_memory(cfg);
  ProcessGrid grid = ProcessGrid::create(make_self_communicator(), 1, 1, 1);
  Trainer trainer(cfg, grid);
  Backend::MemoryCounts m = trainer.backend().memory_counts();
  ASSERT_TRUE(m.counted);
  EXPECT_EQ(m.block_bytes, 64);
  EXPECT_EQ(m.in_use, plan.total) << "after construction";
  for (int64_t step = 1; step <= 2; ++step) EXPECT_FALSE(trainer.train_step(step).skipped);
  trainer.evaluate();
  m = trainer.backend().memory_counts();
  EXPECT_EQ(m.in_use, plan.total) << "after training and evaluation";
  EXPECT_EQ(m.peak, plan.total);
  EXPECT_EQ(m.held_peak, plan.total);
  EXPECT_EQ(m.transient_peak, 0);
}

// bench_step --gemm-shapes' accounting (CpuBackend::set_gemm_profile): the products a training
// step runs, counted by shape, add up to the matmul FLOPs the trainer reports for the step (its
// MFU numerator, model/flops.h), and nothing is counted once the profile is unset.
TEST_P(PlanMatchesTraining, GemmProfileAddsUpToTheStepsMatmulFlops) {
  const PlanCase& c = GetParam();
  const RunConfig cfg = load_config(kConfigs + c.config, c.sets);
  ProcessGrid grid = ProcessGrid::create(make_self_communicator(), 1, 1, 1);
  Trainer trainer(cfg, grid);
  auto* cpu = dynamic_cast<CpuBackend*>(&trainer.backend());
  ASSERT_NE(cpu, nullptr);
  CpuBackend::GemmProfile profile;
  cpu->set_gemm_profile(&profile);
  ASSERT_FALSE(trainer.train_step(1).skipped);
  cpu->set_gemm_profile(nullptr);
  double flops = 0;
  int64_t calls = 0;
  for (const auto& [shape, time] : profile) {
    EXPECT_GT(time.calls, 0);
    EXPECT_GE(time.seconds, 0.0);
    flops += 2.0 * shape.M * shape.N * double(shape.K) * shape.batch * double(time.calls);
    calls += time.calls;
  }
  EXPECT_GT(profile.size(), 3u);
  EXPECT_NEAR(flops, trainer.step_flops(), 1e-9 * trainer.step_flops());
  ASSERT_FALSE(trainer.train_step(2).skipped);
  int64_t after = 0;
  for (const auto& [shape, time] : profile) after += time.calls;
  EXPECT_EQ(after, calls) << "counted with the profile unset";
}

INSTANTIATE_TEST_SUITE_P(Configs, PlanMatchesTraining, ::testing::ValuesIn(plan_cases()),
                         [](const auto& info) { return std::string(info.param.name); });

// Kept activations in bf16 are smaller than in fp32 (the fp32 parts: norm statistics, the
// router, logits and loss), and ZeRO-1 shrinks only the optimizer state.
TEST(Plan, PrecisionAndZero1ChangeTheirParts) {
  const std::string base = kConfigs + "bench-small.yaml";
  const MemoryPlan fp32 = plan_memory(load_config(base, {"train.precision=fp32"}));
  const MemoryPlan bf16 = plan_memory(load_config(base, {"train.precision=bf16"}));
  EXPECT_LT(bf16.kept_activations, fp32.kept_activations);
  EXPECT_GT(bf16.kept_activations, fp32.kept_activations / 2);
  EXPECT_EQ(bf16.master_params, fp32.master_params);
  const std::vector<std::string> dp = {"parallel.data=4", "train.batch_size=8"};
  std::vector<std::string> z = dp;
  z.push_back("parallel.zero1=true");
  const MemoryPlan plain = plan_memory(load_config(base, dp));
  const MemoryPlan zero1 = plan_memory(load_config(base, z));
  EXPECT_LT(zero1.optimizer_state, plain.optimizer_state);
  EXPECT_EQ(zero1.optimizer_unsharded, plain.optimizer_state);
  EXPECT_EQ(zero1.master_params, plain.master_params);
  EXPECT_EQ(zero1.kept_activations, plain.kept_activations);
}

// The sizing backend counts, hands out distinct aligned addresses it never backs, and refuses
// to compute.
// SWITCHT5_CUDA_MEMORY_FRACTION: unset is the default; a number in (0, 1] is taken; anything
// else is a UserError naming the variable and the value. (The CUDA backend reads it at start-up;
// the parse is plain C++, so it is tested in every build.)
TEST(Plan, CudaMemoryFractionIsValidated) {
  EXPECT_EQ(cuda::memory_fraction(nullptr), cuda::kDefaultMemoryFraction);
  EXPECT_EQ(cuda::memory_fraction("0.4"), 0.4);
  EXPECT_EQ(cuda::memory_fraction("1"), 1.0);
  for (const char* bad : {"", "0", "-0.5", "1.5", "abc", "0.4x", "nan", "inf", "1e999"}) {
    try {
      cuda::memory_fraction(bad);
      ADD_FAILURE() << "accepted \"" << bad << "\"";
    } catch (const UserError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("SWITCHT5_CUDA_MEMORY_FRACTION=\"" + std::string(bad) + "\""),
                std::string::npos) << msg;
      EXPECT_NE(msg.find("(0, 1]"), std::string::npos) << msg;
    }
  }
}

// The arena's size, which the backend reserves and plan checks against: the fraction of the free
// memory, at least 1 GiB left free, whole 2 MiB granules.
TEST(Plan, CudaArenaSizeRule) {
  const size_t GiB = size_t(1) << 30, granule = cuda::kArenaGranule;
  EXPECT_EQ(cuda::arena_bytes(100 * GiB, 0.5), 50 * GiB);           // the fraction
  EXPECT_EQ(cuda::arena_bytes(100 * GiB, 1.0), 99 * GiB);           // 1 GiB headroom
  EXPECT_EQ(cuda::arena_bytes(10 * GiB + 3, 0.9) % granule, 0u);    // whole granules
  EXPECT_LE(cuda::arena_bytes(10 * GiB + 3, 0.9), size_t(0.9 * double(10 * GiB + 3)));
  EXPECT_EQ(cuda::arena_bytes(GiB / 2, 0.5), GiB / 4);              // small devices: fraction only
}

TEST(Plan, SizingBackendCountsAndRefusesWork) {
  SizingBackend be(256);
  void* a = be.alloc_bytes(10);
  void* b = be.alloc_bytes(300);
  EXPECT_NE(a, b);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 64, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b) % 64, 0u);
  EXPECT_EQ(be.requested_bytes(), 310u);
  EXPECT_EQ(be.occupied_bytes(), 256u + 512u);
  be.free_bytes(a);
  EXPECT_EQ(be.requested_bytes(), 300u);
  EXPECT_EQ(be.peak_requested_bytes(), 310u);
  be.fill(static_cast<float*>(b), 1.0f, 75);  // construction's memory ops do nothing
  try {
    be.add(static_cast<float*>(b), static_cast<float*>(b), static_cast<float*>(b), 75);
    ADD_FAILURE() << "add on the sizing backend did not throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the sizing backend computes nothing: add"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(be.free_bytes(a), Error);
}

using Result = testing::CommandResult;
Result run(const std::string& args) { return testing::run_command(kBin + " " + args); }

double mb_after(const std::string& text, const std::string& label) {
  const size_t at = text.find(label);
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + label.size()));
}

TEST(PlanCli, SwitchBase8OnCudaInBf16) {
  const std::string cfg = kConfigs + "switch-base-8.yaml --set train.backend=cuda";
  const Result bf16 = run("plan --config " + cfg + " --set train.precision=bf16");
  const Result fp32 = run("plan --config " + cfg + " --set train.precision=fp32");
  ASSERT_EQ(bf16.code, 0) << bf16.output;
  ASSERT_EQ(fp32.code, 0) << fp32.output;
  for (const Result* r : {&bf16, &fp32}) {
    // The lines that were there before the memory plan stay.
    EXPECT_NE(r->output.find("per rank (data 1 x model 1, experts over 1): parameters 2477.4 MB"),
              std::string::npos) << r->output;
    for (const char* label : {"activations kept for backward", "activation workspace",
                              "  total", "CUDA backend workspaces"})
      EXPECT_GT(mb_after(r->output, label), 0.0) << label << "\n" << r->output;
    EXPECT_NE(r->output.find("device: 141.0 GB"), std::string::npos) << r->output;
  }
  EXPECT_GT(mb_after(bf16.output, "compute copy (bf16)"), 0.0) << bf16.output;
  EXPECT_LT(mb_after(bf16.output, "activations kept for backward"),
            mb_after(fp32.output, "activations kept for backward"));
  // A device too small for it.
  const Result small = run("plan --config " + cfg + " --device-memory-gb 16");
  EXPECT_EQ(small.code, 0) << small.output;
  EXPECT_NE(small.output.find("DOES NOT FIT"), std::string::npos) << small.output;
}

TEST(PlanCli, JsonIsOneObject) {
  const std::string out =
      (std::filesystem::temp_directory_path() / "switcht5_plan.json").string();
  const Result r = run("plan --json --config " + kConfigs +
                       "switch-base-8.yaml --set train.backend=cuda --set train.precision=bf16"
                       " > " + out);
  ASSERT_EQ(r.code, 0) << r.output;
  // Parsed by Python's json (the scripts' reader); the sums hold in it.
  const Result py = testing::run_command(
      "python3 -c \"import json,sys; d=json.load(open(sys.argv[1])); "
      "parts=['master_params','compute_copy','gradients','optimizer_state','kept_activations',"
      "'activation_workspace','inputs','statistics','communication','other']; "
      "assert sum(d[p+'_bytes'] for p in parts)==d['counted_bytes']; "
      "assert d['total_bytes']==d['counted_bytes']+d['rounding_bytes']+d['backend_workspace_bytes']; "
      "assert d['fits'] is True and d['kept_activations_bytes']>0; print('ok')\" " + out);
  if (py.output.find("No such file") != std::string::npos || py.code == 127)
    GTEST_SKIP() << "no python3: " << py.output;
  EXPECT_EQ(py.code, 0) << py.output;
  EXPECT_NE(py.output.find("ok"), std::string::npos) << py.output;
}

TEST(PlanCli, ImpossibleLayoutsAreOneLineUserErrors) {
  const std::string cfg = kConfigs + "switch-base-8.yaml";
  for (const char* sets : {"--set parallel.expert=3",                     // 8 experts
                           "--set parallel.data=3",                       // batch 256
                           "--set parallel.model=5"}) {                   // 12 heads
    const Result r = run("plan --config " + cfg + " " + sets);
    EXPECT_EQ(r.code, 2) << sets << "\n" << r.output;
    EXPECT_NE(r.output.find("switcht5: error:"), std::string::npos) << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  }
}

// The model's FLOPs and active parameters (top-1 routing): a Switch model differs from the dense
// model of the same dimensions by its routers alone, and each token uses one expert.
TEST(PlanModelCounts, SwitchIsTheDenseModelPlusItsRouters) {
  const RunConfig sw = load_config(kConfigs + "switch-base-8.yaml", {});
  const RunConfig dense = load_config(kConfigs + "switch-base-8.yaml",
                                      {"model.encoder_sparse_step=0", "model.decoder_sparse_step=0"});
  const ModelConfig& m = sw.model;
  const int Ti = sw.data.inputs_length, Tt = sw.data.targets_length;
  const double D = m.d_model, E = m.num_experts;
  const int switch_layers = 6 + 6;  // blocks 1, 3, ..., 11 of each stack
  const double router_flops = 2.0 * D * E * (6.0 * Ti + 6.0 * Tt);
  EXPECT_DOUBLE_EQ(forward_matmul_flops(m, 1, Ti, Tt, true, /*executed=*/false),
                   forward_matmul_flops(dense.model, 1, Ti, Tt, true) + router_flops);
  // Executed: every capacity slot (capacity factor 1.25 > 1) costs more than the top-1 count.
  EXPECT_GT(forward_matmul_flops(m, 1, Ti, Tt, true), forward_matmul_flops(m, 1, Ti, Tt, true, false));
  ParamStore ps;
  register_model_params(ps, dense.model);
  int64_t dense_params = 0;
  for (const ParamInfo& p : ps.infos()) dense_params += p.numel;
  EXPECT_EQ(active_parameters(m), dense_params + int64_t(switch_layers) * m.num_experts * m.d_model);
  EXPECT_EQ(active_parameters(dense.model), dense_params);
}

}  // namespace
}  // namespace switcht5
