// Every op of backend/backend.h, on every backend:
//  1. ReferenceOps: the reference backend against hand-computed values and finite differences.
//  2. BackendVsReference: each backend of kBackendsUnderTest against the reference (the oracle:
//     plain loops, double accumulation) over several shapes, odd sizes included. Inputs are
//     random, every output is poisoned before every call, tolerances come from tolerance_for().
//  3. EveryBackend: what each backend, the reference included, must do on its own (memory,
//     NaN in C with beta = 0, dropout and jitter statistics, count_nonfinite, make_backend).
//  4. CpuThreads: the CPU backend's non-GEMM ops bitwise equal under different OpenMP thread
//     counts.
// The optimizer updates are also checked against a host model over several steps in
// test_optimizer.cpp.
//
// Where each Backend method is checked against the reference (section 2); a new method adds a
// case and a line here:
//   alloc_bytes free_bytes            EveryBackend.AllocIsZeroedAndAligned
//   copy_to_host copy_to_device copy  EveryBackend.CopiesRoundTrip, Copy
//   zero_bytes                        EveryBackend.ZeroBytes
//   accumulate_sum_squares accumulate_loss_statistics accumulate_router_statistics
//                                     test_statistics_ops.cpp (every backend vs host sums)
//   host_syncs                        test_training.cpp OneHostSynchronisationPerStep
//   relu_dropout_forward/backward     ReluDropout; on the CPU also bitwise the composition:
//                                     CpuActivation.ReluDropoutIsBitwiseTheComposition
//   fill add axpy scale relu_* gated_gelu_* dropout uniform_jitter   Elementwise; dropout also
//                                     EveryBackend.DropoutMaskIsTheCounterRngsAtEveryLength
//   gemm                              Gemm
//   gemm_ex cast                      GemmMixedPrecision, Cast (fp32 / bf16)
//   gemm_ex_sum_squares               GemmSumSquares; on the CPU also thread-count independent
//   gemm_ex_rows                      GemmExRows; on the CPU also thread-count independent, and
//                                     CpuGemmRows.SkipsTheRowsPastTheCounts
//                                     (CpuThreads.OpsBitwiseIndependentOfThreadCount)
//   sum sum_squares sum_over_batch    Reductions;  count_nonfinite: EveryBackend.CountNonfinite
//   permute_0213                      Permute
//   embedding_forward/backward        Embedding
//   rmsnorm_forward/backward          Rmsnorm
//   attention_softmax_forward softmax_backward   AttentionSoftmax
//   attention_softmax_dropout_forward/backward   AttentionSoftmaxDropout; on the CPU also bitwise
//                                     the composition: CpuAttention.FusedIsBitwiseTheComposition
//   attention_core_forward/backward   AttentionCore; on the CPU also bitwise the composition it
//                                     replaces: CpuAttention.CoreByProblemIsBitwiseTheComposition
//   relpos_bias_forward/backward      RelposBias
//   cross_entropy_forward/backward    CrossEntropy
//   router_forward router_balance_loss router_backward moe_dispatch(_backward)
//   moe_combine(_backward)            RouterAndDispatch
//   adamw_update adafactor_update     AdamW, Adafactor; their bf16 compute copy:
//                                     EveryBackend.OptimizerWritesTheBf16ComputeCopy
//   synchronize                       no output of its own (host backends: a no-op)
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <utility>
#include <string>
#include <tuple>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/reference/reference_backend.h"
#include "core/check.h"
#include "core/dtype.h"
#include "core/rng.h"
#include "test_util.h"

namespace switcht5 {
namespace {

using testing::all_close;
using testing::download;
using testing::random_int_vector;
using testing::random_vector;
using testing::upload;

// ---- the backends under test --------------------------------------------------------------------
// Each backend named here runs every case of section 2 against the reference backend, and every
// case of section 3: "cpu", and "cuda" in a build with the CUDA backend (its instances skip,
// with the reason, where no GPU is visible; ctest runs them under the label gpu).
const std::vector<std::string> kBackendsUnderTest = testing::backends_under_test();

// The reference and every backend under test.
std::vector<std::string> all_backends() {
  std::vector<std::string> names = {"reference"};
  names.insert(names.end(), kBackendsUnderTest.begin(), kBackendsUnderTest.end());
  return names;
}

std::string param_name(const ::testing::TestParamInfo<std::string>& info) { return info.param; }

// ---- tolerances per dtype, against the double-accumulating reference ----------------------------
// The dtypes are core/dtype.h's. Every op computes in fp32; gemm_ex and cast also take and
// produce bf16 (the bf16 cases below widen bf16 outputs to float to compare).
struct Tolerance {
  double rtol, atol;
};

struct DTypeTolerance {
  Tolerance elementwise;   // elementwise ops and short reductions
  double atol_per_term;    // an output that sums `terms` O(1) products carries rounding error up
                           // to about terms * unit roundoff times its magnitude
};

// The one table of tolerances (as TransformerEngine's getTolerances). Every comparison with the
// reference in section 2 derives its tolerance from here.
DTypeTolerance tolerance_for(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return {{1e-5, 1e-6}, 6e-8};  // 6e-8 ~ 2^-24, fp32's unit roundoff
    case DType::kBF16:
      // A bf16 output is the fp32 result rounded once. The backend's fp32 sum and the
      // reference's double sum can fall on either side of a rounding boundary: one bf16 ulp
      // apart, at most 2^-7 relative (just above a power of two). Sums still accumulate in fp32.
      return {{0x1p-7, 1e-6}, 6e-8};
    case DType::kI32:
      break;
  }
  throw std::logic_error("tolerance_for: no entry for this dtype");
}

Tolerance elementwise_tolerance(DType dtype) { return tolerance_for(dtype).elementwise; }

// For outputs that sum `terms` O(1) products: atol grows with the number of terms.
Tolerance sum_tolerance(DType dtype, int64_t terms) {
  const DTypeTolerance t = tolerance_for(dtype);
  return {t.elementwise.rtol, t.elementwise.atol + t.atol_per_term * double(terms)};
}

// Pure data movement (permute, copy) is exact in every dtype.
constexpr Tolerance kExact{0, 0};

// Finite differences on the reference (central, step kFdStep, float outputs).
constexpr Tolerance kFiniteDifference{2e-3, 2e-3};
constexpr float kFdStep = 1e-2f;

// ---- poisoned outputs ---------------------------------------------------------------------------
// Before every call, each output an op must assign is filled with a NaN bit pattern (kPoisonInt
// for int32 outputs) rather than left as alloc_bytes' zeros: an op that skips part of its output
// would otherwise still pass wherever the right answer is 0. all_close fails on any NaN, and
// to_float maps kPoisonInt to NaN, so an unwritten entry fails the comparison even when the
// reference leaves it unwritten too.
constexpr uint32_t kPoisonBits = 0x7FC0DEADu;  // a quiet NaN with a recognisable payload
constexpr int32_t kPoisonInt = int32_t(kPoisonBits);

template <class T>
void poison(Backend& be, T* ptr, int64_t n) {
  static_assert(sizeof(T) == sizeof(uint32_t));
  const std::vector<uint32_t> bits(n, kPoisonBits);
  if (n > 0) be.copy_to_device(ptr, bits.data(), sizeof(uint32_t) * n);
}

// A poisoned output array of n elements.
template <class T>
DeviceArray<T> poisoned(Backend& be, int64_t n) {
  DeviceArray<T> a(be, n);
  poison(be, a.data(), n);
  return a;
}

const float kPoisonFloat = std::bit_cast<float>(kPoisonBits);

using Outputs = std::vector<std::vector<float>>;

std::vector<float> to_float(const std::vector<int32_t>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    f[i] = v[i] == kPoisonInt ? std::numeric_limits<float>::quiet_NaN() : float(v[i]);
  return f;
}

// Positive random values in [lo, hi) (second moments, Adafactor statistics).
std::vector<float> random_positive(int64_t n, uint64_t seed, float lo = 0.1f, float hi = 2.0f) {
  return random_vector(n, seed, lo, hi);
}

// ================================================================================================
// 1. The reference against hand-computed values
// ================================================================================================

class ReferenceOps : public ::testing::Test {
 protected:
  ReferenceBackend ref_;
};

TEST_F(ReferenceOps, Gemm2x2EveryTranspose) {
  // A = [1 2; 3 4], B = [5 6; 7 8]
  const std::vector<float> a = {1, 2, 3, 4}, b = {5, 6, 7, 8};
  struct Case {
    bool ta, tb;
    std::vector<float> expected;
  };
  const std::vector<Case> cases = {
      {false, false, {19, 22, 43, 50}},  // A B
      {false, true, {17, 23, 39, 53}},   // A B^T
      {true, false, {26, 30, 38, 44}},   // A^T B
      {true, true, {23, 31, 34, 46}},    // A^T B^T
  };
  for (const Case& c : cases) {
    auto A = upload(ref_, a), B = upload(ref_, b);
    auto C = upload(ref_, std::vector<float>{1, 1, 1, 1});
    ref_.gemm(c.ta, c.tb, 2, 2, 2, 1.0f, A.data(), 2, 0, B.data(), 2, 0, 0.0f, C.data(), 2, 0, 1);
    EXPECT_EQ(download(ref_, C.data(), 4), c.expected) << "trans " << c.ta << c.tb;
    // alpha = 2, beta = 0.5 on C = 1: 2 op(A) op(B) + 0.5.
    ref_.fill(C.data(), 1.0f, 4);
    ref_.gemm(c.ta, c.tb, 2, 2, 2, 2.0f, A.data(), 2, 0, B.data(), 2, 0, 0.5f, C.data(), 2, 0, 1);
    std::vector<float> scaled(4);
    for (int i = 0; i < 4; ++i) scaled[i] = 2 * c.expected[i] + 0.5f;
    EXPECT_EQ(download(ref_, C.data(), 4), scaled) << "trans " << c.ta << c.tb << " alpha/beta";
  }
}


TEST_F(ReferenceOps, AttentionSoftmaxMaskedAndCausal) {
  // B=2, H=1, Tq=3, Tk=3. Batch 0 masks key 1; batch 1 masks every key.
  // clang-format off
  const std::vector<float> scores = {0.0f, 5.0f, std::log(3.0f),   // batch 0
                                     1.0f, 2.0f, 3.0f,
                                     0.0f, 9.0f, std::log(3.0f),
                                     1.0f, 2.0f, 3.0f,             // batch 1
                                     1.0f, 2.0f, 3.0f,
                                     1.0f, 2.0f, 3.0f};
  // clang-format on
  const std::vector<float> key_mask = {1, 0, 1, 0, 0, 0};
  auto S = upload(ref_, scores), M = upload(ref_, key_mask);
  auto P = upload(ref_, std::vector<float>(18));

  // Not causal: rows of batch 0 are a softmax over keys {0, 2}.
  ref_.attention_softmax_forward(P.data(), S.data(), nullptr, M.data(), 2, 1, 3, 3, false);
  auto p = download(ref_, P.data(), 18);
  // clang-format off
  const std::vector<float> expected_noncausal = {
      0.25f, 0.0f, 0.75f,                                                      // e^0 : e^ln3
      float(1 / (1 + std::exp(2.0))), 0.0f, float(1 / (1 + std::exp(-2.0))),  // e^1 : e^3
      0.25f, 0.0f, 0.75f,
      0, 0, 0,  0, 0, 0,  0, 0, 0};                                            // no allowed key
  // clang-format on
  EXPECT_TRUE(all_close(p, expected_noncausal, 1e-6, 1e-7));

  // Causal: row 0 sees key 0 only, row 1 keys {0} (1 is masked), row 2 keys {0, 2}. In place.
  auto SP = upload(ref_, scores);
  ref_.attention_softmax_forward(SP.data(), SP.data(), nullptr, M.data(), 2, 1, 3, 3, true);
  p = download(ref_, SP.data(), 18);
  // clang-format off
  const std::vector<float> expected_causal = {1, 0, 0,  1, 0, 0,  0.25f, 0, 0.75f,
                                              0, 0, 0,  0, 0, 0,  0, 0, 0};
  // clang-format on
  EXPECT_TRUE(all_close(p, expected_causal, 1e-6, 1e-7));

  // A bias shifts the logits before the softmax: bias [H=1,3,3] adds ln 3 to key 0 of row 0.
  std::vector<float> bias(9, 0.0f);
  bias[0] = std::log(3.0f);
  auto Bi = upload(ref_, bias);
  ref_.attention_softmax_forward(P.data(), S.data(), Bi.data(), M.data(), 1, 1, 1, 3, false);
  p = download(ref_, P.data(), 3);
  EXPECT_TRUE(all_close(p, {0.5f, 0.0f, 0.5f}, 1e-6, 1e-7));
}

TEST_F(ReferenceOps, RouterSlotsAndDropping) {
  // G=2 groups of S=4 tokens, E=3 experts. Top-1 experts: group 0 -> 0,1,0,0; group 1 ->
  // 2,2,0,2 where token 2 of group 1 ties experts 0 and 1 (lowest index wins).
  // clang-format off
  const std::vector<float> logits = {
      2, 0, 0,   0, 3, 1,   1, 0, 0,   5, 1, 1,  // group 0
      0, 0, 1,   1, 0, 4,   2, 2, 1,   0, 1, 2,  // group 1
  };
  // clang-format on
  const std::vector<int32_t> expected_expert = {0, 1, 0, 0, 2, 2, 0, 2};
  const std::vector<float> expected_counts = {3, 1, 0, 1, 0, 3};  // [G,E], before dropping
  for (int C : {1, 2}) {
    auto L = upload(ref_, logits);
    DeviceArray<float> probs(ref_, 24), lse(ref_, 8), gate(ref_, 8), counts(ref_, 6);
    DeviceArray<int32_t> expert(ref_, 8), slot(ref_, 8), rows(ref_, 3);
    ref_.router_forward(probs.data(), lse.data(), expert.data(), slot.data(), rows.data(),
                        gate.data(), counts.data(), L.data(), 2, 4, 3, C);
    EXPECT_EQ(download(ref_, expert.data(), 8), expected_expert);
    EXPECT_EQ(download(ref_, counts.data(), 6), expected_counts);
    const std::vector<int32_t> slot_code = download(ref_, slot.data(), 8);
    // By hand (position = earlier same-expert tokens of the group; slot = the kept tokens of
    // the same expert in earlier groups + position): group 0 experts 0,1,0,0 have positions
    // 0,0,1,2; group 1 experts 2,2,0,2 have 0,1,0,2. C = 1: expert 0 keeps t0 (group 0) and
    // t6 (group 1, after t0: row 1); C = 2 it keeps t0, t2 and t6 (row 2).
    const std::vector<int32_t> by_hand = C == 1 ? std::vector<int32_t>{0, 0, -1, -1, 0, -1, 1, -1}
                                                : std::vector<int32_t>{0, 0, 1, -1, 0, 1, 2, -1};
    EXPECT_EQ(slot_code, by_hand) << "capacity " << C;
    const std::vector<int32_t> rows_by_hand =
        C == 1 ? std::vector<int32_t>{2, 1, 1} : std::vector<int32_t>{3, 1, 2};
    EXPECT_EQ(download(ref_, rows.data(), 3), rows_by_hand) << "capacity " << C;
    // The same rule applied by a counting loop to the expected experts.
    std::vector<int32_t> counted(8), kept(3, 0);
    for (int t = 0; t < 8; ++t) {
      int position = 0;
      for (int u = (t / 4) * 4; u < t; ++u) position += expected_expert[u] == expected_expert[t];
      counted[t] = position < C ? kept[expected_expert[t]]++ : -1;
    }
    EXPECT_EQ(slot_code, counted) << "capacity " << C;
    EXPECT_EQ(download(ref_, rows.data(), 3), kept) << "capacity " << C;
    // Token 0: softmax(2,0,0) = e^2 / (e^2 + 2); lse = log(e^2 + 2).
    auto g = download(ref_, gate.data(), 8);
    auto l = download(ref_, lse.data(), 8);
    EXPECT_NEAR(g[0], std::exp(2.0) / (std::exp(2.0) + 2), 1e-7);
    EXPECT_NEAR(l[0], std::log(std::exp(2.0) + 2), 1e-6);
    EXPECT_NEAR(g[6], std::exp(2.0) / (2 * std::exp(2.0) + std::exp(1.0)), 1e-7);
  }
}

TEST_F(ReferenceOps, RouterBalanceLossUniformIsOne) {
  // Uniform probabilities and a balanced assignment give lb = E * sum_e (1/E)(1/E) = 1.
  const int G = 1, S = 4, E = 4;
  auto probs = upload(ref_, std::vector<float>(S * E, 0.25f));
  auto counts = upload(ref_, std::vector<float>{1, 1, 1, 1});
  DeviceArray<float> lb(ref_, G);
  ref_.router_balance_loss(lb.data(), probs.data(), counts.data(), G, S, E);
  EXPECT_NEAR(download(ref_, lb.data(), 1)[0], 1.0f, 1e-7);
  // All tokens to expert 0 with probability 1 there: lb = E * 1 * 1 = E.
  std::vector<float> onehot(S * E, 0.0f);
  for (int s = 0; s < S; ++s) onehot[s * E] = 1.0f;
  auto probs1 = upload(ref_, onehot);
  auto counts1 = upload(ref_, std::vector<float>{4, 0, 0, 0});
  ref_.router_balance_loss(lb.data(), probs1.data(), counts1.data(), G, S, E);
  EXPECT_NEAR(download(ref_, lb.data(), 1)[0], float(E), 1e-6);
}

TEST_F(ReferenceOps, CrossEntropyWithIgnoredLabel) {
  // Row 0: logits (0, ln 3), label 1: lse = ln 4, loss = ln 4 - ln 3. Row 1: ignored (-100).
  const std::vector<float> logits = {0.0f, std::log(3.0f), 1.0f, 1.0f};
  const std::vector<int32_t> labels = {1, -100};
  auto Lg = upload(ref_, logits);
  auto Lb = upload(ref_, labels);
  DeviceArray<float> loss(ref_, 2), lse(ref_, 2), dlogits(ref_, 4);
  ref_.cross_entropy_forward(loss.data(), lse.data(), Lg.data(), Lb.data(), 2, 2);
  EXPECT_TRUE(
      all_close(download(ref_, loss.data(), 2), {float(std::log(4.0 / 3.0)), 0.0f}, 1e-6, 1e-7));
  EXPECT_TRUE(all_close(download(ref_, lse.data(), 2),
                        {float(std::log(4.0)), float(1 + std::log(2.0))}, 1e-6, 1e-7));
  // scale 2, no z-loss: 2 * (softmax - onehot) = 2 * (0.25, 0.75 - 1); ignored row is 0.
  ref_.cross_entropy_backward(dlogits.data(), Lg.data(), lse.data(), Lb.data(), 2, 2, 2.0f, nullptr, 0.0f);
  EXPECT_TRUE(all_close(download(ref_, dlogits.data(), 4), {0.5f, -0.5f, 0.0f, 0.0f}, 1e-6, 1e-7));
  // z-loss: softmax is scaled by 1 + 2 z lse.
  const float z = 0.1f, l = float(std::log(4.0));
  ref_.cross_entropy_backward(dlogits.data(), Lg.data(), lse.data(), Lb.data(), 2, 2, 1.0f, nullptr, z);
  EXPECT_TRUE(all_close(download(ref_, dlogits.data(), 4),
                        {0.25f * (1 + 2 * z * l), 0.75f * (1 + 2 * z * l) - 1, 0.0f, 0.0f}, 1e-6,
                        1e-7));
}

TEST_F(ReferenceOps, RmsnormByHand) {
  // x = (3, 4): mean x^2 = 12.5; w = (1, 2); eps = 0.
  auto X = upload(ref_, std::vector<float>{3, 4});
  auto W = upload(ref_, std::vector<float>{1, 2});
  DeviceArray<float> out(ref_, 2), rstd(ref_, 1);
  ref_.rmsnorm_forward(out.data(), rstd.data(), X.data(), W.data(), 1, 2, 0.0f);
  const double r = 1 / std::sqrt(12.5);
  EXPECT_TRUE(all_close(download(ref_, rstd.data(), 1), {float(r)}, 1e-7, 0));
  EXPECT_TRUE(all_close(download(ref_, out.data(), 2), {float(3 * r), float(8 * r)}, 1e-7, 0));
}

TEST_F(ReferenceOps, EmbeddingBackwardAccumulatesRepeats) {
  // V=3, D=2; ids (2, 0, 2): row 2 receives tokens 0 and 2, row 1 nothing; dtable starts at 1.
  auto ids = upload(ref_, std::vector<int32_t>{2, 0, 2});
  auto dout = upload(ref_, std::vector<float>{1, 2, 3, 4, 5, 6});
  auto dtable = upload(ref_, std::vector<float>(6, 1.0f));
  ref_.embedding_backward(dtable.data(), ids.data(), dout.data(), 3, 2, 3);
  EXPECT_EQ(download(ref_, dtable.data(), 6), (std::vector<float>{4, 5, 1, 1, 7, 9}));
}

TEST_F(ReferenceOps, PermuteByIndexFormula) {
  // out[a,c,b,d] = in[a,b,c,d] for in of shape [A,B,C,D] = [2,3,5,7], every element.
  const int A = 2, B = 3, C = 5, D = 7, n = A * B * C * D;
  const auto x = random_vector(n, 41);
  auto X = upload(ref_, x);
  auto out = poisoned<float>(ref_, n), back = poisoned<float>(ref_, n);
  ref_.permute_0213(out.data(), X.data(), A, B, C, D);
  const auto o = download(ref_, out.data(), n);
  for (int a = 0; a < A; ++a)
    for (int b = 0; b < B; ++b)
      for (int c = 0; c < C; ++c)
        for (int d = 0; d < D; ++d)
          ASSERT_EQ(o[((a * C + c) * B + b) * D + d], x[((a * B + b) * C + c) * D + d])
              << a << "," << b << "," << c << "," << d;
  // Its own inverse with B and C swapped.
  ref_.permute_0213(back.data(), out.data(), A, C, B, D);
  EXPECT_EQ(download(ref_, back.data(), n), x);
}

TEST_F(ReferenceOps, MoeDispatchCombineByHand) {
  // T=3, D=2, E=2, GC=2: token 0 -> (1, 0), token 1 dropped, token 2 -> (0, 1).
  auto x = upload(ref_, std::vector<float>{1, 2, 3, 4, 5, 6});
  auto expert = upload(ref_, std::vector<int32_t>{1, 0, 0});
  auto slot = upload(ref_, std::vector<int32_t>{0, -1, 1});
  auto gate = upload(ref_, std::vector<float>{0.5f, 0.25f, 2.0f});
  auto buf = upload(ref_, std::vector<float>(8, 7.0f));  // stale contents must be cleared
  ref_.moe_dispatch(buf.data(), x.data(), expert.data(), slot.data(), 3, 2, 2, 2);
  EXPECT_EQ(download(ref_, buf.data(), 8), (std::vector<float>{0, 0, 5, 6, 1, 2, 0, 0}));
  DeviceArray<float> out(ref_, 6);
  ref_.moe_combine(out.data(), buf.data(), gate.data(), expert.data(), slot.data(), 3, 2, 2);
  EXPECT_EQ(download(ref_, out.data(), 6), (std::vector<float>{0.5f, 1, 0, 0, 10, 12}));
  DeviceArray<float> dx(ref_, 6), dbuf(ref_, 8), dgate(ref_, 3);
  ref_.moe_dispatch_backward(dx.data(), buf.data(), expert.data(), slot.data(), 3, 2, 2);
  EXPECT_EQ(download(ref_, dx.data(), 6), (std::vector<float>{1, 2, 0, 0, 5, 6}));
  auto dout = upload(ref_, std::vector<float>{1, 1, 1, 1, 1, -1});
  ref_.moe_combine_backward(dbuf.data(), dgate.data(), dout.data(), buf.data(), gate.data(),
                            expert.data(), slot.data(), 3, 2, 2, 2);
  EXPECT_EQ(download(ref_, dbuf.data(), 8), (std::vector<float>{0, 0, 2, -2, 0.5f, 0.5f, 0, 0}));
  EXPECT_EQ(download(ref_, dgate.data(), 3), (std::vector<float>{3, 0, -1}));
}


// ================================================================================================
// 1b. Reference backwards against central finite differences of the reference forwards
// ================================================================================================

// Checks grad[i] == d objective / d x[i] for every i, where objective(x) is a double.
void expect_gradient_matches_fd(const std::function<double(const std::vector<float>&)>& objective,
                                const std::vector<float>& x, const std::vector<float>& grad,
                                const std::string& what) {
  ASSERT_EQ(x.size(), grad.size());
  std::vector<float> fd(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    std::vector<float> xp = x, xm = x;
    xp[i] += kFdStep;
    xm[i] -= kFdStep;
    fd[i] = static_cast<float>((objective(xp) - objective(xm)) / (2.0 * kFdStep));
  }
  EXPECT_TRUE(all_close(grad, fd, kFiniteDifference.rtol, kFiniteDifference.atol)) << what;
}

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double acc = 0.0;
  for (size_t i = 0; i < a.size(); ++i) acc += double(a[i]) * b[i];
  return acc;
}

TEST_F(ReferenceOps, RmsnormBackwardMatchesFiniteDifferences) {
  const int N = 3, D = 7;
  const float eps = 1e-6f;
  const auto x = random_vector(N * D, 1), w = random_vector(D, 2, 0.5f, 1.5f),
             r = random_vector(N * D, 3);
  auto forward = [&](const std::vector<float>& xv, const std::vector<float>& wv) {
    auto X = upload(ref_, xv), W = upload(ref_, wv);
    DeviceArray<float> out(ref_, N * D), rstd(ref_, N);
    ref_.rmsnorm_forward(out.data(), rstd.data(), X.data(), W.data(), N, D, eps);
    return dot(download(ref_, out.data(), N * D), r);
  };
  auto X = upload(ref_, x), W = upload(ref_, w), R = upload(ref_, r);
  DeviceArray<float> out(ref_, N * D), rstd(ref_, N), dx(ref_, N * D), dw(ref_, D);
  ref_.rmsnorm_forward(out.data(), rstd.data(), X.data(), W.data(), N, D, eps);
  ref_.rmsnorm_backward(dx.data(), dw.data(), R.data(), X.data(), W.data(), rstd.data(), N, D);
  expect_gradient_matches_fd([&](const std::vector<float>& v) { return forward(v, w); }, x,
                             download(ref_, dx.data(), N * D), "rmsnorm dx");
  expect_gradient_matches_fd([&](const std::vector<float>& v) { return forward(x, v); }, w,
                             download(ref_, dw.data(), D), "rmsnorm dw");
}

TEST_F(ReferenceOps, SoftmaxBackwardMatchesFiniteDifferences) {
  const int B = 2, H = 2, Tq = 3, Tk = 4;
  const int64_t n = int64_t(B) * H * Tq * Tk;
  const auto scores = random_vector(n, 4, -2, 2), bias = random_vector(H * Tq * Tk, 5);
  const std::vector<float> key_mask = {1, 1, 0, 1, 1, 1, 1, 0};
  const auto r = random_vector(n, 6);
  auto Bi = upload(ref_, bias), Km = upload(ref_, key_mask);
  for (bool causal : {false, true}) {
    auto probs_of = [&](const std::vector<float>& s) {
      auto S = upload(ref_, s);
      DeviceArray<float> P(ref_, n);
      ref_.attention_softmax_forward(P.data(), S.data(), Bi.data(), Km.data(), B, H, Tq, Tk,
                                     causal);
      return download(ref_, P.data(), n);
    };
    auto P = upload(ref_, probs_of(scores));
    auto R = upload(ref_, r);
    DeviceArray<float> ds(ref_, n);
    ref_.softmax_backward(ds.data(), R.data(), P.data(), int64_t(B) * H * Tq, Tk);
    expect_gradient_matches_fd([&](const std::vector<float>& s) { return dot(probs_of(s), r); },
                               scores, download(ref_, ds.data(), n),
                               causal ? "softmax causal" : "softmax");
  }
}

TEST_F(ReferenceOps, GatedGeluBackwardMatchesFiniteDifferences) {
  const int n = 33;
  const auto a = random_vector(n, 7, -3, 3), b = random_vector(n, 8), r = random_vector(n, 9);
  auto forward = [&](const std::vector<float>& av, const std::vector<float>& bv) {
    auto A = upload(ref_, av), Bv = upload(ref_, bv);
    DeviceArray<float> out(ref_, n);
    ref_.gated_gelu_forward(out.data(), A.data(), Bv.data(), n);
    return dot(download(ref_, out.data(), n), r);
  };
  auto A = upload(ref_, a), Bv = upload(ref_, b), R = upload(ref_, r);
  DeviceArray<float> da(ref_, n), db(ref_, n);
  ref_.gated_gelu_backward(da.data(), db.data(), R.data(), A.data(), Bv.data(), n);
  expect_gradient_matches_fd([&](const std::vector<float>& v) { return forward(v, b); }, a,
                             download(ref_, da.data(), n), "gated gelu da");
  expect_gradient_matches_fd([&](const std::vector<float>& v) { return forward(a, v); }, b,
                             download(ref_, db.data(), n), "gated gelu db");
}

TEST_F(ReferenceOps, CrossEntropyBackwardMatchesFiniteDifferences) {
  const int N = 4, V = 5;
  const float scale = 0.5f, z_coef = 0.3f;
  const auto logits = random_vector(N * V, 10, -2, 2);
  const std::vector<int32_t> labels = {3, -100, 0, 4};
  auto Lb = upload(ref_, labels);
  // objective = scale * sum_{r not ignored} (loss[r] + z_coef lse[r]^2)
  auto objective = [&](const std::vector<float>& lg) {
    auto L = upload(ref_, lg);
    DeviceArray<float> loss(ref_, N), lse(ref_, N);
    ref_.cross_entropy_forward(loss.data(), lse.data(), L.data(), Lb.data(), N, V);
    auto lo = download(ref_, loss.data(), N), ls = download(ref_, lse.data(), N);
    double total = 0.0;
    for (int r = 0; r < N; ++r)
      if (labels[r] >= 0) total += lo[r] + double(z_coef) * ls[r] * ls[r];
    return scale * total;
  };
  auto L = upload(ref_, logits);
  DeviceArray<float> loss(ref_, N), lse(ref_, N), dl(ref_, N * V);
  ref_.cross_entropy_forward(loss.data(), lse.data(), L.data(), Lb.data(), N, V);
  ref_.cross_entropy_backward(dl.data(), L.data(), lse.data(), Lb.data(), N, V, scale, nullptr, z_coef);
  expect_gradient_matches_fd(objective, logits, download(ref_, dl.data(), N * V), "cross entropy");
}

TEST_F(ReferenceOps, RouterBackwardMatchesFiniteDifferences) {
  const int G = 2, S = 5, E = 3, C = 2, T = G * S;
  const float lb_scale = 0.7f, z_scale = 0.2f;
  // Each token's top expert leads by at least 0.5, so no finite-difference step changes the
  // assignment (the counts are not differentiable); expert (t*t) % E overflows capacity 2.
  auto logits = random_vector(T * E, 11, -1, 1);
  for (int t = 0; t < T; ++t) logits[t * E + (t * t) % E] += 2.5f;
  const auto dgate = random_vector(T, 12);
  // objective = lb_scale sum_g lb[g] + z_scale sum_t lse[t]^2 + sum_t dgate[t] gate[t]
  auto objective = [&](const std::vector<float>& lg) {
    auto L = upload(ref_, lg);
    DeviceArray<float> probs(ref_, T * E), lse(ref_, T), gate(ref_, T), counts(ref_, G * E),
        lb(ref_, G);
    DeviceArray<int32_t> expert(ref_, T), slot(ref_, T), rows(ref_, E);
    ref_.router_forward(probs.data(), lse.data(), expert.data(), slot.data(), rows.data(),
                        gate.data(), counts.data(), L.data(), G, S, E, C);
    ref_.router_balance_loss(lb.data(), probs.data(), counts.data(), G, S, E);
    auto lbh = download(ref_, lb.data(), G), ls = download(ref_, lse.data(), T),
         gt = download(ref_, gate.data(), T);
    double total = 0.0;
    for (int g = 0; g < G; ++g) total += double(lb_scale) * lbh[g];
    for (int t = 0; t < T; ++t) total += double(z_scale) * ls[t] * ls[t] + double(dgate[t]) * gt[t];
    return total;
  };
  auto L = upload(ref_, logits), Dg = upload(ref_, dgate);
  DeviceArray<float> probs(ref_, T * E), lse(ref_, T), gate(ref_, T), counts(ref_, G * E),
      dl(ref_, T * E);
  DeviceArray<int32_t> expert(ref_, T), slot(ref_, T), rows(ref_, E);
  ref_.router_forward(probs.data(), lse.data(), expert.data(), slot.data(), rows.data(),
                      gate.data(), counts.data(), L.data(), G, S, E, C);
  ref_.router_backward(dl.data(), probs.data(), lse.data(), expert.data(), Dg.data(), counts.data(),
                       G, S, E, lb_scale, z_scale);
  expect_gradient_matches_fd(objective, logits, download(ref_, dl.data(), T * E), "router");
}

// ================================================================================================
// 2. Every backend under test against the reference
// ================================================================================================

class BackendVsReference : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string why;
    be_ = testing::backend_or_skip(GetParam(), why);
    if (!be_) GTEST_SKIP() << why;
  }

  // The dtype the backend under test computes in (fp32 for every backend today).
  DType dtype() const { return DType::kF32; }
  Tolerance elementwise() const { return elementwise_tolerance(dtype()); }
  Tolerance sum_of(int64_t terms) const { return sum_tolerance(dtype(), terms); }

  // Runs op on the reference and on the backend under test and compares every output.
  void expect_matches_reference(const std::function<Outputs(Backend&)>& op, Tolerance tol,
                                const std::string& what) {
    const Outputs expected = op(*ref_);
    const Outputs actual = op(*be_);
    ASSERT_EQ(expected.size(), actual.size()) << what;
    for (size_t i = 0; i < expected.size(); ++i)
      EXPECT_TRUE(all_close(actual[i], expected[i], tol.rtol, tol.atol))
          << GetParam() << " vs reference: " << what << ", output " << i;
  }

  std::unique_ptr<Backend> ref_ = make_backend("reference");
  std::unique_ptr<Backend> be_;
};

INSTANTIATE_TEST_SUITE_P(Backends, BackendVsReference, ::testing::ValuesIn(kBackendsUnderTest),
                         param_name);

// The GEMM tests' operands: v as `t` in backend memory (fp32, or bf16 by nearest even), and C
// back as floats (a bf16 C widened).
DeviceArray<uint8_t> upload_as(Backend& be, const std::vector<float>& v, DType t) {
  DeviceArray<uint8_t> buf(be, int64_t(v.size() * dtype_size(t)));
  if (t == DType::kBF16) {
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = float_to_bf16(v[i]);
    be.copy_to_device(buf.data(), h.data(), buf.bytes());
  } else {
    be.copy_to_device(buf.data(), v.data(), buf.bytes());
  }
  return buf;
}

std::vector<float> download_as(Backend& be, const DeviceArray<uint8_t>& buf, DType t) {
  std::vector<float> out(buf.bytes() / dtype_size(t));
  if (t == DType::kBF16) {
    std::vector<uint16_t> h(out.size());
    be.copy_to_host(h.data(), buf.data(), buf.bytes());
    for (size_t i = 0; i < h.size(); ++i) out[i] = bf16_to_float(h[i]);
  } else {
    be.copy_to_host(out.data(), buf.data(), buf.bytes());
  }
  return out;
}

// acc0 plus the squares of C's M x N blocks (the padding not counted): what
// gemm_ex_sum_squares adds to its accumulator, summed on the host in double.
double blocks_sum_squares(double acc0, const std::vector<float>& c, int batch, int64_t sc, int M,
                          int N, int ldc) {
  double sum = acc0;
  for (int bi = 0; bi < batch; ++bi)
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        const double v = c[size_t(bi * sc + int64_t(i) * ldc + j)];
        sum += v * v;
      }
  return sum;
}

// Poisons the M x N blocks of a batched C (ldc, stride sc): a beta = 0 output, whose padding
// stays random and must be left untouched.
void poison_blocks(std::vector<float>& c, int batch, int64_t sc, int M, int N, int ldc) {
  for (int bi = 0; bi < batch; ++bi)
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) c[bi * sc + int64_t(i) * ldc + j] = kPoisonFloat;
}

TEST_P(BackendVsReference, Gemm) {
  struct Dims {
    int M, N, K;
  };
  const std::vector<Dims> dims = {{1, 1, 1},    {3, 7, 33}, {33, 3, 7},    {7, 33, 1},
                                  {64, 48, 80}, {5, 4, 0},  {130, 67, 257}};
  uint64_t seed = 100;
  for (const Dims& d : dims) {
    for (int batch : {1, 3, 9}) {
      for (int combo = 0; combo < 4; ++combo) {
        for (float beta : {0.0f, 0.7f}) {
          const bool ta = combo & 2, tb = combo & 1;
          // Padded leading dimensions and batch strides with gaps, to catch lda/stride mix-ups.
          const int lda = (ta ? d.M : d.K) + 3, ldb = (tb ? d.K : d.N) + 2, ldc = d.N + 1;
          const int64_t sa = int64_t(ta ? d.K : d.M) * lda + 5,
                        sb = int64_t(tb ? d.N : d.K) * ldb + 1, sc = int64_t(d.M) * ldc + 2;
          const auto a = random_vector(sa * batch, ++seed), b = random_vector(sb * batch, ++seed);
          auto c = random_vector(sc * batch, ++seed);
          // beta = 0: C is a pure output, poisoned; its padding stays random and must be left
          // untouched. beta != 0: C is an input too.
          if (beta == 0.0f) poison_blocks(c, batch, sc, d.M, d.N, ldc);
          auto op = [&](Backend& be) -> Outputs {
            auto A = upload(be, a), B = upload(be, b), Cm = upload(be, c);
            be.gemm(ta, tb, d.M, d.N, d.K, 1.5f, A.data(), lda, sa, B.data(), ldb, sb, beta,
                    Cm.data(), ldc, sc, batch);
            return {download(be, Cm.data(), sc * batch)};  // padding must be left untouched too
          };
          expect_matches_reference(op, sum_of(d.K),
                                   fmt::format("gemm M={} N={} K={} batch={} trans={}{} beta={}",
                                               d.M, d.N, d.K, batch, ta, tb, beta));
        }
      }
    }
  }
}

// gemm_ex: every combination of fp32 / bf16 for A, B and C, transposes, padded leading
// dimensions and strides, beta 0 (C poisoned) and not. bf16 inputs are drawn fresh as bf16
// values (never zeros); a bf16 C is compared after widening, with the bf16 tolerance.
TEST_P(BackendVsReference, GemmMixedPrecision) {
  struct Dims {
    int M, N, K;
  };
  const std::vector<Dims> dims = {{1, 1, 1}, {3, 7, 33}, {33, 3, 7}, {64, 48, 80}, {130, 67, 257}};
  uint64_t seed = 900;
  for (const Dims& d : dims)
    for (int types = 1; types < 8; ++types)  // bit 0: A bf16, bit 1: B bf16, bit 2: C bf16
      for (int combo = 0; combo < 4; ++combo)
        for (float beta : {0.0f, 0.7f}) {
          const DType at = types & 1 ? DType::kBF16 : DType::kF32;
          const DType bt = types & 2 ? DType::kBF16 : DType::kF32;
          const DType ct = types & 4 ? DType::kBF16 : DType::kF32;
          const bool ta = combo & 2, tb = combo & 1;
          const int batch = 2;
          const int lda = (ta ? d.M : d.K) + 3, ldb = (tb ? d.K : d.N) + 2, ldc = d.N + 1;
          const int64_t sa = int64_t(ta ? d.K : d.M) * lda + 5,
                        sb = int64_t(tb ? d.N : d.K) * ldb + 1, sc = int64_t(d.M) * ldc + 2;
          const auto a = random_vector(sa * batch, ++seed), b = random_vector(sb * batch, ++seed);
          auto c = random_vector(sc * batch, ++seed);
          if (beta == 0.0f) poison_blocks(c, batch, sc, d.M, d.N, ldc);
          auto op = [&](Backend& be) -> Outputs {
            auto A = upload_as(be, a, at), B = upload_as(be, b, bt), Cm = upload_as(be, c, ct);
            be.gemm_ex(ta, tb, d.M, d.N, d.K, 1.5f, A.data(), at, lda, sa, B.data(), bt, ldb, sb,
                       beta, Cm.data(), ct, ldc, sc, batch);
            return {download_as(be, Cm, ct)};  // padding must be left untouched too
          };
          const Tolerance tol = sum_tolerance(ct, d.K);
          expect_matches_reference(
              op, tol,
              fmt::format("gemm_ex {}x{}->{} M={} N={} K={} trans={}{} beta={}", dtype_name(at),
                          dtype_name(bt), dtype_name(ct), d.M, d.N, d.K, ta, tb, beta));
        }
}

// A bf16 C is rounded to nearest even, bitwise: with A = B = 1 (K = 1) the fp32 result is alpha
// itself, chosen on exact ties between bf16 neighbours, where truncation and round-half-up
// differ from round-to-nearest-even by one ulp (the tolerance above would not see that).
TEST_P(BackendVsReference, GemmRoundsBf16OutputToNearestEven) {
  for (Backend* be : {ref_.get(), be_.get()}) {
    for (float alpha : {1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, -(1.0f + 3 * 0x1p-8f), 0.1f, 3.3e5f}) {
      const std::vector<float> one = {1.0f};
      auto A = upload(*be, one), B = upload(*be, one);
      DeviceArray<uint16_t> C(*be, 1);
      be->gemm_ex(false, false, 1, 1, 1, alpha, A.data(), DType::kF32, 1, 1, B.data(),
                  DType::kF32, 1, 1, 0.0f, C.data(), DType::kBF16, 1, 1, 1);
      uint16_t h = 0;
      be->copy_to_host(&h, C.data(), sizeof h);
      EXPECT_EQ(h, float_to_bf16(alpha)) << be->name() << " alpha=" << alpha;
    }
  }
}

// gemm_ex_sum_squares: C as gemm_ex's (against the reference), and acc[0] grown by exactly the
// squares of the C blocks the backend itself stored (host double sum; only the order differs),
// the padding between rows and blocks not counted. Batches below and above the thread count
// (the CPU takes the squares per entry on the thread that computed it, or over all threads),
// blocks larger than a reduction block (16384 floats), fp32 and bf16 B (a bf16 activation).
TEST_P(BackendVsReference, GemmSumSquares) {
  struct Dims {
    int M, N, K;
  };
  const std::vector<Dims> dims = {{1, 1, 1}, {3, 7, 33}, {130, 201, 9}};
  uint64_t seed = 1300;
  for (const Dims& d : dims)
    for (int batch : {1, 3, 9})
      for (bool padded : {false, true})
        for (DType bt : {DType::kF32, DType::kBF16})
          for (bool ta : {true, false})
            for (float beta : {0.0f, 0.7f}) {
              const int lda = ta ? d.M : d.K, ldb = d.N, ldc = d.N + (padded ? 3 : 0);
              const int64_t sa = int64_t(ta ? d.K : d.M) * lda, sb = int64_t(d.K) * ldb,
                            sc = int64_t(d.M) * ldc + (padded ? 5 : 0);
              const auto a = random_vector(sa * batch, ++seed);
              auto b = random_vector(sb * batch, ++seed);
              for (float& v : b) v = bf16_to_float(float_to_bf16(v));  // exact in bf16 too
              auto c = random_vector(sc * batch, ++seed);
              if (beta == 0.0f) poison_blocks(c, batch, sc, d.M, d.N, ldc);
              const double acc0 = 0.375;
              const std::string what =
                  fmt::format("gemm_ex_sum_squares M={} N={} K={} batch={} ldc={} B {} ta={} "
                              "beta={}", d.M, d.N, d.K, batch, ldc, dtype_name(bt), ta, beta);
              auto op = [&](Backend& be) -> Outputs {
                auto A = upload(be, a), Cm = upload(be, c);
                auto Bm = upload_as(be, b, bt);
                DeviceArray<double> acc(be, 1);
                be.copy_to_device(acc.data(), &acc0, sizeof acc0);
                be.gemm_ex_sum_squares(ta, false, d.M, d.N, d.K, 1.5f, A.data(), DType::kF32,
                                       lda, sa, Bm.data(), bt, ldb, sb, beta, Cm.data(), ldc, sc,
                                       batch, acc.data());
                const std::vector<float> out = download(be, Cm.data(), sc * batch);
                double got = 0.0;
                be.copy_to_host(&got, acc.data(), sizeof got);
                const double want = blocks_sum_squares(acc0, out, batch, sc, d.M, d.N, ldc);
                EXPECT_NEAR(got, want, 1e-12 * want) << be.name() << ": " << what;
                return {out};  // padding must be left untouched too
              };
              expect_matches_reference(op, sum_of(d.K), what);
            }
}

// gemm_ex_rows: A_b zero past its first a_rows[b] rows as stored (rows of [M,K], or of [K,M]
// when trans_a), a_rows 0, full and in between; the result must be the full product's (the
// reference runs it whole; the CPU skips the rows), beta 0 over a poisoned C, 1 and 0.7, fp32
// and bf16 A and C, batches below and above the thread count, and with squares their sum as
// gemm_ex_sum_squares takes it. The padding around the blocks must be left untouched.
TEST_P(BackendVsReference, GemmExRows) {
  struct Dims {
    int M, N, K;
  };
  const std::vector<Dims> dims = {{3, 7, 33}, {40, 67, 24}};
  uint64_t seed = 1500;
  for (const Dims& d : dims)
    for (int batch : {1, 3, 9})
      for (int combo = 0; combo < 4; ++combo)
        for (int types = 0; types < 4; ++types)  // bit 0: A bf16, bit 1: C bf16
          for (float beta : {0.0f, 1.0f, 0.7f})
            for (bool with_squares : {false, true}) {
              const DType at = types & 1 ? DType::kBF16 : DType::kF32;
              const DType ct = types & 2 ? DType::kBF16 : DType::kF32;
              if (with_squares && ct != DType::kF32) continue;
              const bool ta = combo & 2, tb = combo & 1;
              const int full = ta ? d.K : d.M;
              const int lda = (ta ? d.M : d.K) + 3, ldb = (tb ? d.K : d.N) + 2, ldc = d.N + 1;
              const int64_t sa = int64_t(full) * lda + 5,
                            sb = int64_t(tb ? d.N : d.K) * ldb + 1, sc = int64_t(d.M) * ldc + 2;
              std::vector<int32_t> rows(batch);
              const auto picks = random_int_vector(batch, ++seed, 0, full + 1);
              for (int bi = 0; bi < batch; ++bi)
                rows[bi] = bi % 3 == 0 ? 0 : bi % 3 == 1 ? full : picks[bi];
              auto a = random_vector(sa * batch, ++seed);
              for (int bi = 0; bi < batch; ++bi)  // A's rows past the count are zero
                for (int r = rows[bi]; r < full; ++r)
                  for (int j = 0; j < lda; ++j) a[bi * sa + int64_t(r) * lda + j] = 0.0f;
              const auto b = random_vector(sb * batch, ++seed);
              auto c = random_vector(sc * batch, ++seed);
              if (beta == 0.0f) poison_blocks(c, batch, sc, d.M, d.N, ldc);
              const std::string what = fmt::format(
                  "gemm_ex_rows M={} N={} K={} batch={} trans={}{} A {} C {} beta={} squares={}",
                  d.M, d.N, d.K, batch, ta, tb, dtype_name(at), dtype_name(ct), beta,
                  with_squares);
              auto op = [&](Backend& be) -> Outputs {
                auto A = upload_as(be, a, at), Cm = upload_as(be, c, ct);
                auto B = upload(be, b);
                auto R = upload(be, rows);
                const double acc0 = 0.375;
                DeviceArray<double> acc(be, 1);
                be.copy_to_device(acc.data(), &acc0, sizeof acc0);
                be.gemm_ex_rows(ta, tb, d.M, d.N, d.K, 1.5f, A.data(), at, lda, sa, B.data(),
                                DType::kF32, ldb, sb, beta, Cm.data(), ct, ldc, sc, batch,
                                R.data(), with_squares ? acc.data() : nullptr);
                const std::vector<float> out = download_as(be, Cm, ct);
                double got = 0.0;
                be.copy_to_host(&got, acc.data(), sizeof got);
                const double want =
                    with_squares ? blocks_sum_squares(acc0, out, batch, sc, d.M, d.N, ldc) : acc0;
                EXPECT_NEAR(got, want, 1e-12 * want) << be.name() << ": " << what;
                return {out};
              };
              expect_matches_reference(op, sum_tolerance(ct, d.K), what);
            }
}

// cast: fp32 -> bf16 rounds to nearest even (bitwise what core/dtype.h computes, ties
// included), bf16 -> fp32 is exact, equal types copy; odd sizes.
TEST_P(BackendVsReference, Cast) {
  for (int64_t n : {1, 7, 33, 100003}) {
    auto x = random_vector(n, 31 + n, -50, 50);
    for (int64_t i = 0; i < n; i += 3)  // exact ties between bf16 neighbours
      x[i] = std::bit_cast<float>((std::bit_cast<uint32_t>(x[i]) & 0xFFFF0000u) | 0x8000u);
    std::vector<uint16_t> expected(n);
    for (int64_t i = 0; i < n; ++i) expected[i] = float_to_bf16(x[i]);
    for (Backend* be : {ref_.get(), be_.get()}) {
      auto X = upload(*be, x);
      DeviceArray<uint16_t> H(*be, n);
      be->fill(reinterpret_cast<float*>(H.data()), kPoisonFloat, n / 2);
      be->cast(H.data(), DType::kBF16, X.data(), DType::kF32, n);
      std::vector<uint16_t> h(n);
      be->copy_to_host(h.data(), H.data(), H.bytes());
      ASSERT_EQ(h, expected) << be->name() << " fp32->bf16 n=" << n;
      auto back = poisoned<float>(*be, n);
      be->cast(back.data(), DType::kF32, H.data(), DType::kBF16, n);
      const auto f = download(*be, back.data(), n);
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(f[i], bf16_to_float(expected[i])) << i;
      auto same = poisoned<float>(*be, n);
      be->cast(same.data(), DType::kF32, X.data(), DType::kF32, n);
      ASSERT_EQ(download(*be, same.data(), n), x) << be->name();
    }
  }
}

TEST_P(BackendVsReference, Elementwise) {
  for (int64_t n : {1, 3, 7, 33, 100003}) {
    const auto x = random_vector(n, 1, -3, 3), y = random_vector(n, 2, -3, 3);
    const std::string at = fmt::format(" n={}", n);
    expect_matches_reference(
        [&](Backend& be) -> Outputs {
          auto X = upload(be, x), Y = upload(be, y);
          auto out = poisoned<float>(be, n);
          be.add(out.data(), X.data(), Y.data(), n);
          auto sum_out = download(be, out.data(), n);
          be.add(X.data(), X.data(), Y.data(), n);  // aliasing a
          auto alias = download(be, X.data(), n);
          be.axpy(Y.data(), -0.75f, X.data(), n);
          auto ax = download(be, Y.data(), n);
          be.scale(Y.data(), 3.5f, n);
          auto sc = download(be, Y.data(), n);
          poison(be, out.data(), n);
          be.fill(out.data(), -2.5f, n);
          return {sum_out, alias, ax, sc, download(be, out.data(), n)};
        },
        elementwise(), "add/axpy/scale/fill" + at);
    expect_matches_reference(
        [&](Backend& be) -> Outputs {
          auto X = upload(be, x), Y = upload(be, y);
          auto out = poisoned<float>(be, n), dx = poisoned<float>(be, n);
          be.relu_forward(out.data(), X.data(), n);
          be.relu_backward(dx.data(), Y.data(), X.data(), n);
          auto fwd = download(be, out.data(), n), bwd = download(be, dx.data(), n);
          be.relu_backward(Y.data(), Y.data(), X.data(), n);  // dx aliasing dout
          be.relu_forward(X.data(), X.data(), n);             // in place
          return {fwd, bwd, download(be, Y.data(), n), download(be, X.data(), n)};
        },
        elementwise(), "relu" + at);
    const auto g = random_vector(n, 3);
    expect_matches_reference(
        [&](Backend& be) -> Outputs {
          auto A = upload(be, x), B = upload(be, y), G = upload(be, g);
          auto out = poisoned<float>(be, n), da = poisoned<float>(be, n),
               db = poisoned<float>(be, n);
          be.gated_gelu_forward(out.data(), A.data(), B.data(), n);
          be.gated_gelu_backward(da.data(), db.data(), G.data(), A.data(), B.data(), n);
          return {download(be, out.data(), n), download(be, da.data(), n),
                  download(be, db.data(), n)};
        },
        elementwise(), "gated gelu" + at);
    expect_matches_reference(
        [&](Backend& be) -> Outputs {
          auto X = upload(be, x);
          auto out = poisoned<float>(be, n), jit = poisoned<float>(be, n),
               jit_at = poisoned<float>(be, n);
          be.dropout(out.data(), X.data(), n, 0.3f, 777);
          be.uniform_jitter(jit.data(), X.data(), n, 0.01f, 778);
          be.uniform_jitter(jit_at.data(), X.data(), n, 0.05f, 779, /*offset=*/12345);
          auto d = download(be, out.data(), n), j = download(be, jit.data(), n),
               ja = download(be, jit_at.data(), n);
          be.dropout(X.data(), X.data(), n, 0.3f, 777);  // in place
          return {d, j, ja, download(be, X.data(), n)};
        },
        elementwise(), "dropout/jitter" + at);
  }
}

TEST_P(BackendVsReference, Copy) {
  for (int64_t n : {1, 7, 100003}) {
    const auto x = random_vector(n, 4);
    expect_matches_reference(
        [&](Backend& be) -> Outputs {
          auto X = upload(be, x);
          auto out = poisoned<float>(be, n);
          be.copy(out.data(), X.data(), sizeof(float) * n);
          return {download(be, out.data(), n)};
        },
        kExact, fmt::format("copy n={}", n));
  }
}

TEST_P(BackendVsReference, Reductions) {
  for (int64_t n : {1, 3, 7, 33, 16384, 16385, 1000003}) {
    const auto x = random_vector(n, 20 + n, -2, 2);
    // sum and sum_squares go through double on every backend: only summation order differs.
    auto X = upload(*ref_, x), Xb = upload(*be_, x);
    EXPECT_NEAR(be_->sum(Xb.data(), n), ref_->sum(X.data(), n), 1e-12 * double(n))
        << "sum n=" << n;
    EXPECT_NEAR(be_->sum_squares(Xb.data(), n), ref_->sum_squares(X.data(), n),
                1e-12 * double(n))
        << "sum_squares n=" << n;
  }
  for (int batch : {1, 3, 33}) {
    for (int64_t n : {1, 7, 33, 5000}) {
      const auto in = random_vector(batch * n, 30), out0 = random_vector(n, 31);
      expect_matches_reference(
          [&](Backend& be) -> Outputs {
            auto In = upload(be, in), Out = upload(be, out0);  // accumulates into Out
            be.sum_over_batch(Out.data(), In.data(), batch, n);
            return {download(be, Out.data(), n)};
          },
          elementwise(), fmt::format("sum_over_batch batch={} n={}", batch, n));
    }
  }
}

TEST_P(BackendVsReference, Permute) {
  struct Dims {
    int A, B, C, D;
  };
  for (const Dims& d :
       std::vector<Dims>{{1, 1, 1, 1}, {1, 3, 7, 1}, {2, 7, 3, 33}, {3, 33, 8, 64}}) {
    const int64_t n = int64_t(d.A) * d.B * d.C * d.D;
    const auto x = random_vector(n, 40);
    expect_matches_reference(
        [&](Backend& be) -> Outputs {
          auto X = upload(be, x);
          auto out = poisoned<float>(be, n), back = poisoned<float>(be, n);
          be.permute_0213(out.data(), X.data(), d.A, d.B, d.C, d.D);
          be.permute_0213(back.data(), out.data(), d.A, d.C, d.B, d.D);  // its own inverse
          return {download(be, out.data(), n), download(be, back.data(), n)};
        },
        kExact, fmt::format("permute_0213 {}x{}x{}x{}", d.A, d.B, d.C, d.D));
  }
}

TEST_P(BackendVsReference, Embedding) {
  struct Dims {
    int64_t n;
    int D, V;
  };
  for (const Dims& d :
       std::vector<Dims>{{1, 1, 1}, {3, 7, 2}, {33, 3, 7}, {1000, 33, 7}, {4096, 64, 500}}) {
    const auto ids = random_int_vector(d.n, 50, 0, d.V);
    const auto table = random_vector(int64_t(d.V) * d.D, 51), dout = random_vector(d.n * d.D, 52);
    const auto dtable0 = random_vector(int64_t(d.V) * d.D, 53);
    expect_matches_reference(
        [&](Backend& be) -> Outputs {
          auto Ids = upload(be, ids);
          auto Tab = upload(be, table), Dout = upload(be, dout), Dtab = upload(be, dtable0);
          auto out = poisoned<float>(be, d.n * d.D);
          be.embedding_forward(out.data(), Ids.data(), Tab.data(), d.n, d.D);
          be.embedding_backward(Dtab.data(), Ids.data(), Dout.data(), d.n, d.D, d.V);
          return {download(be, out.data(), d.n * d.D),
                  download(be, Dtab.data(), int64_t(d.V) * d.D)};
        },
        sum_of(d.n), fmt::format("embedding n={} D={} V={}", d.n, d.D, d.V));
  }
}

TEST_P(BackendVsReference, Rmsnorm) {
  struct Dims {
    int64_t N;
    int D;
  };
  for (const Dims& d : std::vector<Dims>{{1, 1}, {3, 7}, {7, 33}, {33, 3}, {1000, 256}}) {
    const int64_t n = d.N * d.D;
    const auto x = random_vector(n, 60, -2, 2), w = random_vector(d.D, 61, 0.5f, 1.5f);
    const auto dout = random_vector(n, 62), dw0 = random_vector(d.D, 63);
    expect_matches_reference(
        [&](Backend& be) -> Outputs {
          auto X = upload(be, x), W = upload(be, w), G = upload(be, dout), Dw = upload(be, dw0);
          auto out = poisoned<float>(be, n), rstd = poisoned<float>(be, d.N),
               dx = poisoned<float>(be, n);
          be.rmsnorm_forward(out.data(), rstd.data(), X.data(), W.data(), d.N, d.D, 1e-6f);
          be.rmsnorm_backward(dx.data(), Dw.data(), G.data(), X.data(), W.data(), rstd.data(), d.N,
                              d.D);
          return {download(be, out.data(), n), download(be, rstd.data(), d.N),
                  download(be, dx.data(), n), download(be, Dw.data(), d.D)};
        },
        sum_of(std::max<int64_t>(d.N, d.D)), fmt::format("rmsnorm N={} D={}", d.N, d.D));
  }
}

TEST_P(BackendVsReference, AttentionSoftmax) {
  struct Dims {
    int B, H, Tq, Tk;
  };
  for (const Dims& d : std::vector<Dims>{
           {1, 1, 1, 1}, {1, 3, 7, 7}, {2, 2, 3, 33}, {3, 1, 33, 7}, {2, 4, 128, 128}}) {
    const int64_t n = int64_t(d.B) * d.H * d.Tq * d.Tk, rows = int64_t(d.B) * d.H * d.Tq;
    const auto scores = random_vector(n, 70, -4, 4),
               bias = random_vector(int64_t(d.H) * d.Tq * d.Tk, 71);
    auto key_mask = random_vector(int64_t(d.B) * d.Tk, 72, 0, 1);
    for (float& m : key_mask) m = m < 0.3f ? 0.0f : 1.0f;
    key_mask[0] = 0.0f;  // batch 0 key 0 masked: with causal, row 0 of batch 0 is fully masked
    const auto dprobs = random_vector(n, 73);
    for (int variant = 0; variant < 8; ++variant) {
      const bool use_bias = variant & 1, use_mask = variant & 2, causal = variant & 4;
      expect_matches_reference(
          [&](Backend& be) -> Outputs {
            auto S = upload(be, scores), Bi = upload(be, bias), Km = upload(be, key_mask),
                 Dp = upload(be, dprobs);
            auto P = poisoned<float>(be, n), Ds = poisoned<float>(be, n);
            const float* bias_ptr = use_bias ? Bi.data() : nullptr;
            const float* mask_ptr = use_mask ? Km.data() : nullptr;
            be.attention_softmax_forward(P.data(), S.data(), bias_ptr, mask_ptr, d.B, d.H, d.Tq,
                                         d.Tk, causal);
            be.softmax_backward(Ds.data(), Dp.data(), P.data(), rows, d.Tk);
            auto p = download(be, P.data(), n), ds = download(be, Ds.data(), n);
            // In place: probs over scores, dscores over dprobs.
            be.attention_softmax_forward(S.data(), S.data(), bias_ptr, mask_ptr, d.B, d.H, d.Tq,
                                         d.Tk, causal);
            be.softmax_backward(Dp.data(), Dp.data(), S.data(), rows, d.Tk);
            return {p, ds, download(be, S.data(), n), download(be, Dp.data(), n)};
          },
          elementwise(),
          fmt::format("attention softmax {}x{}x{}x{} bias={} mask={} causal={}", d.B, d.H, d.Tq,
                      d.Tk, use_bias, use_mask, causal));
    }
  }
}

// The fused attention core: forward (probs fp32 or bf16, dropped) and backward (dscores, the
// accumulated dbias), fresh and in place (an fp32 probs over the scores, or dropped over them in
// bf16; dscores over dprobs). Tk = 7, 33, 129 and 1500 are not multiples of 32 (the CUDA row
// shapes: a warp's registers, the whole block, and past 4096 the streaming path); every row of
// the last batch is masked (no allowed key), and with causal row 0 of batch 0 is too. Odd
// variants key the dropout with a step counter in backend memory, as training does.
TEST_P(BackendVsReference, AttentionSoftmaxDropout) {
  struct Dims {
    int B, H, Tq, Tk;
  };
  for (const Dims& d : std::vector<Dims>{{1, 1, 1, 1},
                                         {1, 3, 7, 7},
                                         {2, 2, 3, 33},
                                         {3, 1, 33, 7},
                                         {2, 2, 12, 12},
                                         {2, 4, 64, 129},
                                         {2, 1, 3, 1500},
                                         {1, 1, 2, 4099}}) {
    const int64_t n = int64_t(d.B) * d.H * d.Tq * d.Tk, nb = int64_t(d.H) * d.Tq * d.Tk;
    const auto scores = random_vector(n, 80, -4, 4), bias = random_vector(nb, 81);
    auto key_mask = random_vector(int64_t(d.B) * d.Tk, 82, 0, 1);
    for (float& m : key_mask) m = m < 0.3f ? 0.0f : 1.0f;
    key_mask[0] = 0.0f;
    if (d.B > 1) std::fill(key_mask.end() - d.Tk, key_mask.end(), 0.0f);
    const auto dprobs = random_vector(n, 83), dbias0 = random_vector(nb, 84);
    const uint64_t step_value = 41;
    for (int variant = 0; variant < 32; ++variant) {
      const bool use_bias = variant & 1, use_mask = variant & 2, causal = variant & 4;
      const bool bf16 = variant & 8;
      const float p = variant & 16 ? 0.3f : 0.0f;
      const bool keyed = (variant / 3) % 2;  // step key in about half of every combination
      const DType probs_type = bf16 ? DType::kBF16 : DType::kF32;
      const int64_t probs_bytes = n * int64_t(dtype_size(probs_type));
      auto probs_as_float = [&](Backend& be, const void* P) {
        std::vector<float> out(static_cast<size_t>(n));
        if (bf16) {
          std::vector<uint16_t> h(static_cast<size_t>(n));
          if (n > 0) be.copy_to_host(h.data(), P, size_t(probs_bytes));
          for (int64_t i = 0; i < n; ++i) out[size_t(i)] = bf16_to_float(h[size_t(i)]);
        } else {
          if (n > 0) be.copy_to_host(out.data(), P, size_t(probs_bytes));
        }
        return out;
      };
      expect_matches_reference(
          [&](Backend& be) -> Outputs {
            auto S = upload(be, scores), Bi = upload(be, bias), Km = upload(be, key_mask),
                 Dp = upload(be, dprobs), Db = upload(be, dbias0);
            DeviceArray<uint64_t> step(be, 1);
            be.copy_to_device(step.data(), &step_value, sizeof step_value);
            const RandomKey key = keyed ? RandomKey(900 + variant, step.data()) : RandomKey(900);
            const float* bias_ptr = use_bias ? Bi.data() : nullptr;
            const float* mask_ptr = use_mask ? Km.data() : nullptr;
            DeviceArray<uint8_t> P(be, probs_bytes);
            const std::vector<uint8_t> nan_bytes(size_t(probs_bytes), 0xFF);  // NaN in both types
            if (n > 0) be.copy_to_device(P.data(), nan_bytes.data(), size_t(probs_bytes));
            auto Dr = poisoned<float>(be, n), Ds = poisoned<float>(be, n);
            be.attention_softmax_dropout_forward(P.data(), probs_type, Dr.data(), S.data(),
                                                 bias_ptr, mask_ptr, d.B, d.H, d.Tq, d.Tk, causal,
                                                 p, key);
            Outputs out = {probs_as_float(be, P.data()), download(be, Dr.data(), n)};
            // The backward reads the fp32 probs, as the model loads them.
            auto P32 = upload(be, out[0]);
            be.attention_softmax_dropout_backward(Ds.data(), Db.data(), Dp.data(), P32.data(),
                                                  d.B, d.H, d.Tq, d.Tk, p, key, bf16);
            out.push_back(download(be, Ds.data(), n));
            out.push_back(download(be, Db.data(), nb));
            // In place, as the model calls them: fp32 probs over the scores (dropped elsewhere,
            // none when p == 0), or in bf16 dropped over the scores; dscores over dprobs, no
            // dbias.
            if (n > 0) be.copy_to_device(P.data(), nan_bytes.data(), size_t(probs_bytes));
            poison(be, Dr.data(), n);
            float* dropped = bf16 ? S.data() : p > 0.0f ? Dr.data() : nullptr;
            void* probs = bf16 ? static_cast<void*>(P.data()) : static_cast<void*>(S.data());
            be.attention_softmax_dropout_forward(probs, probs_type, dropped, S.data(), bias_ptr,
                                                 mask_ptr, d.B, d.H, d.Tq, d.Tk, causal, p, key);
            out.push_back(probs_as_float(be, probs));
            if (dropped) out.push_back(download(be, dropped, n));
            be.attention_softmax_dropout_backward(Dp.data(), nullptr, Dp.data(), P32.data(), d.B,
                                                  d.H, d.Tq, d.Tk, p, key, bf16);
            out.push_back(download(be, Dp.data(), n));
            return out;
          },
          elementwise_tolerance(probs_type),
          fmt::format("attention softmax+dropout {}x{}x{}x{} bias={} mask={} causal={} bf16={} "
                      "p={} step_key={}",
                      d.B, d.H, d.Tq, d.Tk, use_bias, use_mask, causal, bf16, p, keyed));
    }
  }
}

// The attention core, forward and backward, with and without bias, mask, causality and dropout,
// dq written over dctx as the model does. Inputs of the size the model's q, k (O(0.3)) give
// scores of O(1); the tolerance is a sum's over the longer of K and Tk.
TEST_P(BackendVsReference, AttentionCore) {
  struct Dims {
    int B, H, Tq, Tk, K;
  };
  for (const Dims& d : std::vector<Dims>{{1, 1, 1, 1, 1}, {2, 3, 7, 13, 5}, {3, 2, 33, 9, 16}}) {
    const int BH = d.B * d.H;
    const int64_t n = int64_t(BH) * d.Tq * d.Tk, nb = int64_t(d.H) * d.Tq * d.Tk;
    const int64_t nq = int64_t(BH) * d.Tq * d.K, nk = int64_t(BH) * d.Tk * d.K;
    const auto q = random_vector(nq, 60, -0.6f, 0.6f), k = random_vector(nk, 61, -0.6f, 0.6f),
               v = random_vector(nk, 62), dctx = random_vector(nq, 63),
               bias = random_vector(nb, 64), dbias0 = random_vector(nb, 65);
    auto key_mask = random_vector(int64_t(d.B) * d.Tk, 66, 0, 1);
    for (float& m : key_mask) m = m < 0.3f ? 0.0f : 1.0f;
    key_mask[0] = 1.0f;
    for (int variant = 0; variant < 16; ++variant) {
      const bool use_bias = variant & 1, use_mask = variant & 2, causal = variant & 4;
      const float p = variant & 8 ? 0.25f : 0.0f;
      expect_matches_reference(
          [&](Backend& be) -> Outputs {
            auto Q = upload(be, q), Kt = upload(be, k), V = upload(be, v), Bi = upload(be, bias),
                 Km = upload(be, key_mask), Dctx = upload(be, dctx), Db = upload(be, dbias0);
            auto P = poisoned<float>(be, n), C = poisoned<float>(be, nq),
                 W = poisoned<float>(be, n), Dk = poisoned<float>(be, nk),
                 Dv = poisoned<float>(be, nk);
            const RandomKey key(700 + variant);
            be.attention_core_forward(P.data(), C.data(), Q.data(), Kt.data(), V.data(),
                                      use_bias ? Bi.data() : nullptr,
                                      use_mask ? Km.data() : nullptr, d.B, d.H, d.Tq, d.Tk, d.K,
                                      causal, p, key, W.data());
            Outputs out = {download(be, P.data(), n), download(be, C.data(), nq)};
            poison(be, W.data(), n);
            be.attention_core_backward(Dctx.data(), Dk.data(), Dv.data(),
                                       use_bias ? Db.data() : nullptr, Dctx.data(), P.data(),
                                       Q.data(), Kt.data(), V.data(), d.B, d.H, d.Tq, d.Tk, d.K,
                                       p, key, W.data());
            out.push_back(download(be, Dctx.data(), nq));  // dq
            out.push_back(download(be, Dk.data(), nk));
            out.push_back(download(be, Dv.data(), nk));
            out.push_back(download(be, Db.data(), nb));
            return out;
          },
          sum_of(std::max(d.K, d.Tk)),
          fmt::format("attention core {}x{}x{}x{} K={} bias={} mask={} causal={} p={}", d.B, d.H,
                      d.Tq, d.Tk, d.K, use_bias, use_mask, causal, p));
    }
  }
}

// The feed-forward hidden layer's relu + dropout, forward and backward, in place (as the model
// calls them) and not, lengths around the CPU's 2048-element blocks and its 64-element dropout
// groups. The elementwise tolerance: the reference scales kept values in double.
TEST_P(BackendVsReference, ReluDropout) {
  for (int64_t n : {int64_t(1), int64_t(63), int64_t(2048), int64_t(2049), int64_t(70001)}) {
    auto x = random_vector(n, 50);
    const auto g = random_vector(n, 51);
    for (int64_t i = 1; i < n; i += 7) x[size_t(i)] = i % 2 ? -0.0f : 0.0f;  // relu's edge
    for (float p : {0.0f, 0.1f, 0.5f}) {
      expect_matches_reference(
          [&](Backend& be) -> Outputs {
            auto X = upload(be, x), G = upload(be, g), Y = poisoned<float>(be, n),
                 D = poisoned<float>(be, n);
            const RandomKey key(77);
            be.relu_dropout_forward(Y.data(), X.data(), n, p, key);
            be.relu_dropout_backward(D.data(), G.data(), X.data(), n, p, key);
            Outputs out = {download(be, Y.data(), n), download(be, D.data(), n)};
            auto Y2 = upload(be, x), D2 = upload(be, g);
            be.relu_dropout_forward(Y2.data(), Y2.data(), n, p, key);
            be.relu_dropout_backward(D2.data(), D2.data(), X.data(), n, p, key);
            out.push_back(download(be, Y2.data(), n));
            out.push_back(download(be, D2.data(), n));
            return out;
          },
          elementwise(), fmt::format("relu+dropout n={} p={}", n, p));
    }
  }
}

TEST_P(BackendVsReference, RelposBias) {
  struct Dims {
    int H, Tq, Tk, num_buckets;
  };
  for (const Dims& d :
       std::vector<Dims>{{1, 1, 1, 1}, {3, 7, 7, 5}, {2, 3, 33, 32}, {8, 128, 128, 32}}) {
    const auto table = random_vector(int64_t(d.num_buckets) * d.H, 80);
    const auto buckets = random_int_vector(int64_t(d.Tq) * d.Tk, 81, 0, d.num_buckets);
    const int64_t n = int64_t(d.H) * d.Tq * d.Tk;
    const auto dbias = random_vector(n, 82),
               dtable0 = random_vector(int64_t(d.num_buckets) * d.H, 83);
    expect_matches_reference(
        [&](Backend& be) -> Outputs {
          auto Tab = upload(be, table), Db = upload(be, dbias), Dt = upload(be, dtable0);
          auto Bk = upload(be, buckets);
          auto bias = poisoned<float>(be, n);
          be.relpos_bias_forward(bias.data(), Tab.data(), Bk.data(), d.H, d.Tq, d.Tk);
          be.relpos_bias_backward(Dt.data(), Db.data(), Bk.data(), d.H, d.Tq, d.Tk, d.num_buckets);
          return {download(be, bias.data(), n),
                  download(be, Dt.data(), int64_t(d.num_buckets) * d.H)};
        },
        elementwise(),
        fmt::format("relpos bias H={} Tq={} Tk={} buckets={}", d.H, d.Tq, d.Tk, d.num_buckets));
  }
}

TEST_P(BackendVsReference, CrossEntropy) {
  struct Dims {
    int64_t N;
    int V;
  };
  for (const Dims& d : std::vector<Dims>{{1, 1}, {3, 7}, {7, 3}, {33, 33}, {256, 1000}}) {
    const auto logits = random_vector(d.N * d.V, 90, -5, 5);
    auto labels = random_int_vector(d.N, 91, 0, d.V);
    for (int64_t r = 1; r < d.N; r += 3) labels[r] = -100;
    expect_matches_reference(
        [&](Backend& be) -> Outputs {
          auto L = upload(be, logits);
          auto Lb = upload(be, labels);
          auto loss = poisoned<float>(be, d.N), lse = poisoned<float>(be, d.N),
               dl = poisoned<float>(be, d.N * d.V);
          be.cross_entropy_forward(loss.data(), lse.data(), L.data(), Lb.data(), d.N, d.V);
          be.cross_entropy_backward(dl.data(), L.data(), lse.data(), Lb.data(), d.N, d.V, 0.125f,
                                    nullptr, 1e-2f);
          auto dlh = download(be, dl.data(), d.N * d.V);
          // In place, with the scale read from backend memory: 0.5 * 0.375 (an exact product).
          auto by = upload(be, std::vector<float>{0.375f});
          be.cross_entropy_backward(L.data(), L.data(), lse.data(), Lb.data(), d.N, d.V, 0.5f,
                                    by.data(), 1e-2f);
          return {download(be, loss.data(), d.N), download(be, lse.data(), d.N), dlh,
                  download(be, L.data(), d.N * d.V)};
        },
        elementwise(), fmt::format("cross entropy N={} V={}", d.N, d.V));
  }
}

TEST_P(BackendVsReference, RouterAndDispatch) {
  struct Dims {
    int G, S, E, C, D;
  };
  for (const Dims& d : std::vector<Dims>{{1, 1, 1, 1, 1},
                                         {1, 7, 3, 2, 3},
                                         {3, 33, 7, 5, 7},
                                         {2, 256, 8, 40, 64},
                                         {4, 512, 16, 40, 33},
                                         // G*E > 2^20: the CUDA router packs in two passes
                                         {2049, 1, 512, 1, 1}}) {
    const int64_t T = int64_t(d.G) * d.S;
    const int GC = d.G * d.C;
    for (bool ties : {false, true}) {
      // With ties, logits are whole numbers in [-3, 3]: many tokens tie for the top expert.
      auto logits = random_vector(T * d.E, 100, -3, 3);
      if (ties)
        for (float& l : logits) l = std::round(l);
      const auto dgate = random_vector(T, 101);
      const auto x = random_vector(T * d.D, 102), dout = random_vector(T * d.D, 103);
      const auto expert_out = random_vector(int64_t(d.E) * GC * d.D, 104);
      const std::string at =
          fmt::format(" G={} S={} E={} C={} D={} ties={}", d.G, d.S, d.E, d.C, d.D, ties);
      expect_matches_reference(
          [&](Backend& be) -> Outputs {
            auto L = upload(be, logits), Dg = upload(be, dgate);
            auto probs = poisoned<float>(be, T * d.E), lse = poisoned<float>(be, T),
                 gate = poisoned<float>(be, T), counts = poisoned<float>(be, int64_t(d.G) * d.E),
                 lb = poisoned<float>(be, d.G), dl = poisoned<float>(be, T * d.E);
            auto expert = poisoned<int32_t>(be, T), slot = poisoned<int32_t>(be, T),
                 rows = poisoned<int32_t>(be, d.E);
            be.router_forward(probs.data(), lse.data(), expert.data(), slot.data(), rows.data(),
                              gate.data(), counts.data(), L.data(), d.G, d.S, d.E, d.C);
            be.router_balance_loss(lb.data(), probs.data(), counts.data(), d.G, d.S, d.E);
            be.router_backward(dl.data(), probs.data(), lse.data(), expert.data(), Dg.data(),
                               counts.data(), d.G, d.S, d.E, 0.01f, 1e-3f);
            return {download(be, probs.data(), T * d.E),
                    download(be, lse.data(), T),
                    download(be, gate.data(), T),
                    download(be, counts.data(), int64_t(d.G) * d.E),
                    download(be, lb.data(), d.G),
                    download(be, dl.data(), T * d.E),
                    to_float(download(be, expert.data(), T)),
                    to_float(download(be, slot.data(), T)),
                    to_float(download(be, rows.data(), d.E))};
          },
          elementwise(), "router" + at);

      // Dispatch and combine, with the reference router's assignment (identical on every
      // backend, as checked above).
      std::vector<int32_t> expert_h, slot_h;
      std::vector<float> gate_h;
      {
        Backend& ref = *ref_;
        auto L = upload(ref, logits);
        DeviceArray<float> probs(ref, T * d.E), lse(ref, T), gate(ref, T),
            counts(ref, int64_t(d.G) * d.E);
        DeviceArray<int32_t> expert(ref, T), slot(ref, T), rows(ref, d.E);
        ref.router_forward(probs.data(), lse.data(), expert.data(), slot.data(), rows.data(),
                           gate.data(), counts.data(), L.data(), d.G, d.S, d.E, d.C);
        expert_h = download(ref, expert.data(), T);
        slot_h = download(ref, slot.data(), T);
        gate_h = download(ref, gate.data(), T);
      }
      const int64_t buf_n = int64_t(d.E) * GC * d.D;
      expect_matches_reference(
          [&](Backend& be) -> Outputs {
            auto X = upload(be, x), G = upload(be, dout), Gt = upload(be, gate_h),
                 Eo = upload(be, expert_out);
            auto Ex = upload(be, expert_h), Sl = upload(be, slot_h);
            // dispatch and combine_backward must write every row of their buffers, empty ones
            // as zeros; dispatch_backward and combine every token, dropped ones as zeros.
            auto Buf = poisoned<float>(be, buf_n), Dbuf = poisoned<float>(be, buf_n),
                 dx = poisoned<float>(be, T * d.D), out = poisoned<float>(be, T * d.D),
                 dgate = poisoned<float>(be, T);
            be.moe_dispatch(Buf.data(), X.data(), Ex.data(), Sl.data(), T, d.D, d.E, GC);
            be.moe_dispatch_backward(dx.data(), Eo.data(), Ex.data(), Sl.data(), T, d.D, GC);
            be.moe_combine(out.data(), Eo.data(), Gt.data(), Ex.data(), Sl.data(), T, d.D, GC);
            be.moe_combine_backward(Dbuf.data(), dgate.data(), G.data(), Eo.data(), Gt.data(),
                                    Ex.data(), Sl.data(), T, d.D, d.E, GC);
            return {download(be, Buf.data(), buf_n), download(be, dx.data(), T * d.D),
                    download(be, out.data(), T * d.D), download(be, Dbuf.data(), buf_n),
                    download(be, dgate.data(), T)};
          },
          elementwise(), "dispatch/combine" + at);
    }
  }
}

// The optimizer updates: p, m and v are updated in place, so all are random inputs.
TEST_P(BackendVsReference, AdamW) {
  for (int64_t n : {1, 33, 100003}) {
    for (float wd : {0.0f, 0.01f}) {
      const auto p = random_vector(n, 110), g = random_vector(n, 111), m = random_vector(n, 112);
      const auto v = random_positive(n, 113, 1e-4f, 1.0f);
      const int t = 3;  // a step after the first, so bias corrections differ from 1 - beta
      const float b1 = 0.9f, b2 = 0.999f;
      const float bc1 = 1.0f - std::pow(b1, float(t)), bc2 = 1.0f - std::pow(b2, float(t));
      expect_matches_reference(
          [&](Backend& be) -> Outputs {
            auto P = upload(be, p), G = upload(be, g), M = upload(be, m), V = upload(be, v);
            be.adamw_update(P.data(), nullptr, G.data(), M.data(), V.data(), n, 1e-3f, b1, b2,
                            1e-8f, wd, bc1, bc2);
            return {download(be, P.data(), n), download(be, M.data(), n),
                    download(be, V.data(), n)};
          },
          elementwise(), fmt::format("adamw n={} weight_decay={}", n, wd));
    }
  }
}

TEST_P(BackendVsReference, Adafactor) {
  struct Dims {
    int count, R, C;
  };
  for (const Dims& d : std::vector<Dims>{{1, 1, 1}, {3, 5, 7}, {2, 64, 33}, {1, 257, 130}}) {
    const int64_t n = int64_t(d.count) * d.R * d.C;
    const auto p = random_vector(n, 120);
    // A gradient with large entries as well, so the update clipping (rms(u) > clip) triggers.
    const auto g = random_vector(n, 121, -3, 3);
    const auto vr = random_positive(int64_t(d.count) * d.R, 122),
               vc = random_positive(int64_t(d.count) * d.C, 123), v = random_positive(n, 124);
    for (bool factored : {true, false}) {
      // eps2: no parameter scale, T5X's 1e-3 (below every matrix's rms), 0.7 (above it: the floor)
      for (auto [clip, eps2] : {std::pair{1.0f, 0.0f}, {100.0f, 0.0f}, {1.0f, 1e-3f},
                                {100.0f, 0.7f}}) {
        expect_matches_reference(
            [&](Backend& be) -> Outputs {
              auto P = upload(be, p), G = upload(be, g), Vr = upload(be, vr), Vc = upload(be, vc),
                   V = upload(be, v);
              be.adafactor_update(P.data(), nullptr, G.data(), factored ? Vr.data() : nullptr,
                                  factored ? Vc.data() : nullptr, factored ? nullptr : V.data(),
                                  factored, d.count, d.R, d.C, 1e-2f, 0.3f, 1e-30f, clip, 0.01f,
                                  eps2);
              if (factored)
                return {download(be, P.data(), n), download(be, Vr.data(), Vr.size()),
                        download(be, Vc.data(), Vc.size())};
              return {download(be, P.data(), n), download(be, V.data(), n)};
            },
            sum_of(int64_t(d.R) * d.C),
            fmt::format("adafactor {}x{}x{} factored={} clip={} eps2={}", d.count, d.R, d.C,
                        factored, clip, eps2));
      }
    }
  }
}

// ================================================================================================
// 3. What every backend, the reference included, must do on its own
// ================================================================================================

class EveryBackend : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string why;
    be_ = testing::backend_or_skip(GetParam(), why);
    if (!be_) GTEST_SKIP() << why;
  }
  std::unique_ptr<Backend> be_;
};

INSTANTIATE_TEST_SUITE_P(Backends, EveryBackend, ::testing::ValuesIn(all_backends()), param_name);

TEST_P(EveryBackend, MakeBackendByName) {
  EXPECT_EQ(be_->name(), GetParam());
  try {
    make_backend("cuda9");
    FAIL() << "expected UserError";
  } catch (const UserError& e) {
    // The message names the bad name and every backend there is.
    const std::string msg = e.what();
    EXPECT_NE(msg.find("cuda9"), std::string::npos) << msg;
    EXPECT_NE(msg.find("'" + GetParam() + "'"), std::string::npos) << msg;
  }
}

TEST_P(EveryBackend, AllocIsZeroedAndAligned) {
  Backend& be = *be_;
  for (size_t bytes : {size_t{1}, size_t{4}, size_t{100}, size_t{4096 + 4}}) {
    void* p = be.alloc_bytes(bytes);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
    std::vector<unsigned char> c(bytes, 0xAB);
    be.copy_to_host(c.data(), p, bytes);
    for (size_t i = 0; i < bytes; ++i) ASSERT_EQ(c[i], 0) << "byte " << i;
    be.free_bytes(p);
  }
}

// copy_to_device, copy and copy_to_host move exactly the bytes asked for: a copy into the middle
// of a poisoned buffer leaves the poison on both sides.
TEST_P(EveryBackend, CopiesRoundTrip) {
  Backend& be = *be_;
  const int64_t n = 1001, at = 17, len = 500;
  const auto x = random_vector(n, 6);
  auto X = upload(be, x);
  EXPECT_EQ(download(be, X.data(), n), x);
  auto out = poisoned<float>(be, n);
  be.copy(out.data() + at, X.data() + at, sizeof(float) * len);
  const auto h = download(be, out.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    if (i >= at && i < at + len)
      ASSERT_EQ(h[i], x[i]) << "index " << i;
    else
      ASSERT_EQ(std::bit_cast<uint32_t>(h[i]), kPoisonBits) << "index " << i << " written";
  }
}

// zero_bytes clears exactly the byte range it is given, whatever the dtype (doubles here).
TEST_P(EveryBackend, ZeroBytes) {
  Backend& be = *be_;
  const int64_t n = 37, at = 5, len = 20;
  std::vector<double> x(n);
  for (int64_t i = 0; i < n; ++i) x[i] = 1.5 + double(i);
  DeviceArray<double> X(be, n);
  be.copy_to_device(X.data(), x.data(), X.bytes());
  be.zero_bytes(X.data() + at, sizeof(double) * len);
  std::vector<double> h(n);
  be.copy_to_host(h.data(), X.data(), X.bytes());
  for (int64_t i = 0; i < n; ++i)
    ASSERT_EQ(h[i], i >= at && i < at + len ? 0.0 : x[i]) << "index " << i;
}

// The optimizers' bf16 output: the compute copy written in the update's pass is bitwise the
// new master rounded to nearest even, and asking for it changes neither master nor state.
TEST_P(EveryBackend, OptimizerWritesTheBf16ComputeCopy) {
  Backend& be = *be_;
  struct Case {
    const char* name;
    int count, R, C;
    bool factored;
    float eps2;  // Adafactor's parameter scale (0: off)
  };
  const std::vector<Case> cases = {{"adamw", 1, 7, 13, false, 0.0f},
                                   {"adafactor factored", 3, 5, 9, true, 0.0f},
                                   {"adafactor factored, scaled", 3, 5, 9, true, 1e-3f},
                                   {"adafactor unfactored", 2, 1, 33, false, 0.0f},
                                   {"adafactor unfactored, scaled", 2, 1, 33, false, 1e-3f}};
  for (const Case& c : cases) {
    const int64_t n = int64_t(c.count) * c.R * c.C;
    const auto p = random_vector(n, 130), g = random_vector(n, 131, -3, 3);
    const auto s1 = random_positive(n, 132), sr = random_positive(int64_t(c.count) * c.R, 133),
               sc = random_positive(int64_t(c.count) * c.C, 134);
    // The new master, the optimizer state, and the bf16 copy (empty when not asked for).
    auto run = [&](bool with_copy) {
      auto P = upload(be, p), G = upload(be, g), S1 = upload(be, s1), S2 = upload(be, s1),
           Vr = upload(be, sr), Vc = upload(be, sc);
      DeviceArray<uint16_t> B(be, n);
      uint16_t* out = with_copy ? B.data() : nullptr;
      if (std::string(c.name) == "adamw")
        be.adamw_update(P.data(), out, G.data(), S1.data(), S2.data(), n, 1e-2f, 0.9f, 0.999f,
                        1e-8f, 0.01f, 0.3f, 0.1f);
      else
        be.adafactor_update(P.data(), out, G.data(), Vr.data(), Vc.data(), S1.data(), c.factored,
                            c.count, c.R, c.C, 1e-2f, 0.3f, 1e-30f, 1.0f, 0.01f, c.eps2);
      std::vector<uint16_t> b(with_copy ? n : 0);
      if (with_copy) be.copy_to_host(b.data(), B.data(), B.bytes());
      return std::make_tuple(download(be, P.data(), n), download(be, S1.data(), n),
                             download(be, Vr.data(), Vr.size()), b);
    };
    const auto [p0, s0, r0, none] = run(false);
    const auto [p1, s1b, r1, copy] = run(true);
    ASSERT_EQ(0, std::memcmp(p0.data(), p1.data(), sizeof(float) * n)) << c.name;
    ASSERT_EQ(0, std::memcmp(s0.data(), s1b.data(), sizeof(float) * n)) << c.name;
    ASSERT_EQ(0, std::memcmp(r0.data(), r1.data(), sizeof(float) * r0.size())) << c.name;
    for (int64_t i = 0; i < n; ++i)
      ASSERT_EQ(copy[i], float_to_bf16(p1[i])) << c.name << " index " << i;
    // Not vacuous: the update moved the master away from its input.
    ASSERT_NE(0, std::memcmp(p.data(), p1.data(), sizeof(float) * n)) << c.name;
  }
}

TEST_P(EveryBackend, GemmBetaZeroIgnoresNaNInC) {
  Backend& be = *be_;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int batch : {1, 4}) {
    auto A = upload(be, random_vector(3 * 5 * batch, 1));
    auto B = upload(be, random_vector(5 * 7 * batch, 2));
    auto C = upload(be, std::vector<float>(3 * 7 * batch, nan));
    be.gemm(false, false, 3, 7, 5, 1.0f, A.data(), 5, 15, B.data(), 7, 35, 0.0f, C.data(), 7, 21,
            batch);
    EXPECT_EQ(be.count_nonfinite(C.data(), 3 * 7 * batch), 0) << "batch " << batch;
  }
}

TEST_P(EveryBackend, CountNonfinite) {
  Backend& be = *be_;
  for (int64_t n : {1, 3, 7, 33, 16384, 16385, 1000003}) {
    auto x = random_vector(n, 20 + n, -2, 2);
    // A NaN, +Inf and -Inf sprinkled in.
    int64_t expected = 0;
    for (int64_t i = 0; i < n; i += 997) {
      x[i] = (i / 997) % 3 == 0   ? std::numeric_limits<float>::quiet_NaN()
             : (i / 997) % 3 == 1 ? std::numeric_limits<float>::infinity()
                                  : -std::numeric_limits<float>::infinity();
      ++expected;
    }
    auto X = upload(be, x);
    EXPECT_EQ(be.count_nonfinite(X.data(), n), expected) << "n=" << n;
  }
}

TEST_P(EveryBackend, DropoutZeroProbabilityIsIdentity) {
  Backend& be = *be_;
  const auto x = random_vector(1001, 5);
  auto X = upload(be, x);
  auto out = poisoned<float>(be, 1001);
  be.dropout(out.data(), X.data(), 1001, 0.0f, 42);
  EXPECT_EQ(download(be, out.data(), 1001), x);
  be.dropout(X.data(), X.data(), 1001, 0.0f, 42);  // in place
  EXPECT_EQ(download(be, X.data(), 1001), x);
}

TEST_P(EveryBackend, DropoutPreservesMeanAndDropsFractionP) {
  Backend& be = *be_;
  const int64_t n = 1 << 20;
  const float p = 0.1f;
  DeviceArray<float> x(be, n);
  be.fill(x.data(), 1.0f, n);
  be.dropout(x.data(), x.data(), n, p, 1234);
  auto h = download(be, x.data(), n);
  int64_t zeros = 0;
  for (float v : h) {
    zeros += v == 0.0f;
    if (v != 0.0f) {
      EXPECT_NEAR(v, 1.0f / (1.0f - p), 1e-6);
    }
  }
  // Standard errors: the mean sqrt(p/(1-p)/n) ~ 3e-4, the drop fraction sqrt(p(1-p)/n) ~ 3e-4.
  EXPECT_NEAR(be.sum(x.data(), n) / double(n), 1.0, 2e-3);
  EXPECT_NEAR(double(zeros) / double(n), p, 2e-3);
}

// The mask is exactly the counter RNG's (core/rng.h), element by element, whatever the length
// (the CPU backend does full groups of four in SIMD and the rest in scalar code); kept values
// are x / (1 - p), dropped ones +0 even for NaN, infinite or -0 inputs.
TEST_P(EveryBackend, DropoutMaskIsTheCounterRngsAtEveryLength) {
  Backend& be = *be_;
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), -0.0f,
                            std::numeric_limits<float>::infinity(), -1e-38f};
  for (int64_t n : {1, 2, 3, 4, 5, 7, 8, 9, 1001, 4099}) {
    for (float p : {0.1f, 0.5f, 0.999f}) {
      auto x = random_vector(n, 140 + n);
      for (int64_t i = 0; i < n; i += 3) x[size_t(i)] = specials[(i / 3) % 4];
      auto X = upload(be, x);
      auto out = poisoned<float>(be, n);
      const uint64_t seed = 9000 + uint64_t(n);
      be.dropout(out.data(), X.data(), n, p, seed);
      const auto h = download(be, out.data(), n);
      for (int64_t i = 0; i < n; ++i) {
        const bool keep = random16(seed, uint64_t(i)) >= dropout_threshold(p);
        const std::string at = fmt::format("n={} p={} i={} x={}", n, p, i, x[size_t(i)]);
        if (!keep) {
          ASSERT_EQ(std::bit_cast<uint32_t>(h[size_t(i)]), 0u) << at;
        } else if (std::isnan(x[size_t(i)])) {
          ASSERT_TRUE(std::isnan(h[size_t(i)])) << at;
        } else {
          const float want = x[size_t(i)] / (1.0f - p);
          ASSERT_EQ(std::signbit(h[size_t(i)]), std::signbit(want)) << at;
          if (std::isinf(want))
            ASSERT_EQ(h[size_t(i)], want) << at;
          else
            ASSERT_NEAR(h[size_t(i)], want, 1e-6 * std::fabs(want)) << at;
        }
      }
    }
  }
}

TEST_P(EveryBackend, UniformJitterStaysInRange) {
  Backend& be = *be_;
  const int64_t n = 100000;
  const float eps = 0.01f;
  DeviceArray<float> x(be, n);
  be.fill(x.data(), 1.0f, n);
  be.uniform_jitter(x.data(), x.data(), n, eps, 99);
  auto h = download(be, x.data(), n);
  float lo = 2, hi = 0;
  for (float v : h) lo = std::min(lo, v), hi = std::max(hi, v);
  EXPECT_GE(lo, 1.0f - eps);
  EXPECT_LE(hi, 1.0f + eps);
  EXPECT_LT(lo, 1.0f - 0.99f * eps);  // the range is actually covered
  EXPECT_GT(hi, 1.0f + 0.99f * eps);
  EXPECT_NEAR(be.sum(x.data(), n) / double(n), 1.0, 1e-4);
}

// `offset` places a tensor in a larger logical one: jittering rows [k, n) of x at offset k gives
// bitwise the entries [k, n) of jittering all of x at offset 0 (how a rank's share of the batch
// gets the noise it would get on one process).
TEST_P(EveryBackend, UniformJitterOffsetIndexesTheWholeTensor) {
  Backend& be = *be_;
  const int64_t n = 10007, k = 3001;
  const auto x = random_vector(n, 7);
  auto X = upload(be, x);
  auto whole = poisoned<float>(be, n), part = poisoned<float>(be, n - k);
  be.uniform_jitter(whole.data(), X.data(), n, 0.1f, 55);
  be.uniform_jitter(part.data(), X.data() + k, n - k, 0.1f, 55, /*offset=*/k);
  const auto w = download(be, whole.data(), n);
  EXPECT_EQ(download(be, part.data(), n - k), std::vector<float>(w.begin() + k, w.end()));
  EXPECT_NE(std::vector<float>(w.begin(), w.begin() + (n - k)), download(be, part.data(), n - k))
      << "the offset is ignored";
}

// ================================================================================================
// 4. The CPU backend's results do not depend on the OpenMP thread count
// ================================================================================================

// Runs every non-GEMM op on the CPU backend (shapes large enough to go parallel) and returns
// all outputs; the double-valued reductions go to `sums`. GEMM is left out: oneDNN promises
// run-to-run reproducibility only for a fixed thread count. Outputs are poisoned and
// accumulators random, as in section 2.
Outputs run_cpu_ops(CpuBackend& be, std::vector<double>& sums) {
  Outputs outs;
  const int64_t n = 200003;
  const auto x = random_vector(n, 1, -3, 3), y = random_vector(n, 2);
  auto X = upload(be, x), Y = upload(be, y);
  auto o1 = poisoned<float>(be, n), o2 = poisoned<float>(be, n);
  be.gated_gelu_backward(o1.data(), o2.data(), Y.data(), X.data(), Y.data(), n);
  outs.push_back(download(be, o1.data(), n));
  outs.push_back(download(be, o2.data(), n));
  poison(be, o1.data(), n);
  be.dropout(o1.data(), X.data(), n, 0.2f, 5);
  outs.push_back(download(be, o1.data(), n));
  sums = {be.sum(X.data(), n), be.sum_squares(X.data(), n)};
  // gemm_ex_sum_squares: 3 entries of 130 x 200 (more than a reduction block each): the
  // batch split over the threads (up to 3), or each product over all of them (7). K = 1 makes
  // each C entry one rounded product, the same however oneDNN splits the work: only the order
  // of the squares' sum could differ.
  {
    const int M = 130, Nc = 200, K = 1, batch = 3;
    auto G = poisoned<float>(be, int64_t(batch) * M * Nc);
    DeviceArray<double> acc(be, 1);
    be.gemm_ex_sum_squares(true, false, M, Nc, K, 1.0f, X.data(), DType::kF32, M,
                           int64_t(K) * M, Y.data(), DType::kF32, Nc, int64_t(K) * Nc, 0.0f,
                           G.data(), Nc, int64_t(M) * Nc, batch, acc.data());
    double got = 0.0;
    be.copy_to_host(&got, acc.data(), sizeof got);
    sums.push_back(got);
    outs.push_back(download(be, G.data(), int64_t(batch) * M * Nc));
    // gemm_ex_rows, entries of different sizes handed out one at a time: K-side counts
    // (trans_a, K = 1) with squares, and M-side counts (K = 1 again).
    const std::vector<int32_t> k_rows = {0, 1, 1}, m_rows = {0, 64, 130};
    be.gemm_ex_rows(true, false, M, Nc, K, 1.0f, X.data(), DType::kF32, M, int64_t(K) * M,
                    Y.data(), DType::kF32, Nc, int64_t(K) * Nc, 0.0f, G.data(), DType::kF32, Nc,
                    int64_t(M) * Nc, batch, k_rows.data(), acc.data());
    be.copy_to_host(&got, acc.data(), sizeof got);
    sums.push_back(got);
    outs.push_back(download(be, G.data(), int64_t(batch) * M * Nc));
    be.gemm_ex_rows(false, false, M, Nc, K, 1.0f, X.data(), DType::kF32, K, int64_t(K) * M,
                    Y.data(), DType::kF32, Nc, int64_t(K) * Nc, 0.0f, G.data(), DType::kF32, Nc,
                    int64_t(M) * Nc, batch, m_rows.data(), nullptr);
    outs.push_back(download(be, G.data(), int64_t(batch) * M * Nc));
  }
  be.sum_over_batch(o1.data(), X.data(), 7, n / 7);  // accumulates into the dropout output
  outs.push_back(download(be, o1.data(), n / 7));

  const int N = 512, D = 96, V = 300;  // embedding / rmsnorm / cross entropy
  const auto ids = random_int_vector(N, 3, 0, V);
  auto Ids = upload(be, ids);
  auto table = upload(be, random_vector(int64_t(V) * D, 4));
  auto dw = upload(be, random_vector(D, 5));
  auto emb = poisoned<float>(be, int64_t(N) * D), rstd = poisoned<float>(be, N),
       norm = poisoned<float>(be, int64_t(N) * D), dx = poisoned<float>(be, int64_t(N) * D);
  be.embedding_backward(table.data(), Ids.data(), X.data(), N, D, V);
  outs.push_back(download(be, table.data(), int64_t(V) * D));
  be.embedding_forward(emb.data(), Ids.data(), table.data(), N, D);
  outs.push_back(download(be, emb.data(), int64_t(N) * D));
  be.rmsnorm_forward(norm.data(), rstd.data(), X.data(), Y.data(), N, D, 1e-6f);
  be.rmsnorm_backward(dx.data(), dw.data(), Y.data(), X.data(), Y.data(), rstd.data(), N, D);
  outs.push_back(download(be, norm.data(), int64_t(N) * D));
  outs.push_back(download(be, dx.data(), int64_t(N) * D));
  outs.push_back(download(be, dw.data(), D));
  auto loss = poisoned<float>(be, N), lse = poisoned<float>(be, N),
       dl = poisoned<float>(be, int64_t(N) * V);
  be.cross_entropy_forward(loss.data(), lse.data(), X.data(), Ids.data(), N, V);
  be.cross_entropy_backward(dl.data(), X.data(), lse.data(), Ids.data(), N, V, 0.5f, nullptr, 1e-3f);
  outs.push_back(download(be, loss.data(), N));
  outs.push_back(download(be, dl.data(), int64_t(N) * V));

  const int B = 2, H = 4, T = 64, buckets = 32;  // attention
  const int64_t na = int64_t(B) * H * T * T;
  auto probs = poisoned<float>(be, na), ds = poisoned<float>(be, na),
       bias = poisoned<float>(be, int64_t(H) * T * T);
  auto dtab = upload(be, random_vector(buckets * H, 6));
  auto Bk = upload(be, random_int_vector(int64_t(T) * T, 4, 0, buckets));
  be.relpos_bias_forward(bias.data(), X.data(), Bk.data(), H, T, T);
  be.attention_softmax_forward(probs.data(), Y.data(), bias.data(), X.data(), B, H, T, T, true);
  be.softmax_backward(ds.data(), X.data(), probs.data(), int64_t(B) * H * T, T);
  be.relpos_bias_backward(dtab.data(), ds.data(), Bk.data(), H, T, T, buckets);
  outs.push_back(download(be, probs.data(), na));
  outs.push_back(download(be, ds.data(), na));
  outs.push_back(download(be, dtab.data(), buckets * H));
  // The fused attention core, bf16 and dropout: probs over the softmax above, dropped over ds,
  // then the backward into ds with the bias gradient accumulated into the bias.
  auto pb = poisoned<float>(be, na / 2);  // na bf16 values
  be.attention_softmax_dropout_forward(pb.data(), DType::kBF16, ds.data(), Y.data(), bias.data(),
                                       X.data(), B, H, T, T, true, 0.1f, 8);
  outs.push_back(download(be, pb.data(), na / 2));
  outs.push_back(download(be, ds.data(), na));
  be.attention_softmax_dropout_backward(ds.data(), bias.data(), X.data(), probs.data(), B, H, T,
                                        T, 0.1f, 8, true);
  outs.push_back(download(be, ds.data(), na));
  outs.push_back(download(be, bias.data(), int64_t(H) * T * T));

  const int G = 4, S = 256, E = 8, C = 40, Dm = 64;  // router
  const int64_t Tt = int64_t(G) * S;
  auto rp = poisoned<float>(be, Tt * E), rl = poisoned<float>(be, Tt),
       gate = poisoned<float>(be, Tt), counts = poisoned<float>(be, G * E),
       lb = poisoned<float>(be, G), rdl = poisoned<float>(be, Tt * E),
       buf = poisoned<float>(be, int64_t(E) * G * C * Dm), dgate = poisoned<float>(be, Tt);
  auto ex = poisoned<int32_t>(be, Tt), sl = poisoned<int32_t>(be, Tt),
       rows = poisoned<int32_t>(be, E);
  be.router_forward(rp.data(), rl.data(), ex.data(), sl.data(), rows.data(), gate.data(),
                    counts.data(), X.data(), G, S, E, C);
  be.router_balance_loss(lb.data(), rp.data(), counts.data(), G, S, E);
  be.router_backward(rdl.data(), rp.data(), rl.data(), ex.data(), Y.data(), counts.data(), G, S, E,
                     0.01f, 1e-3f);
  be.moe_combine_backward(buf.data(), dgate.data(), X.data(), Y.data(), gate.data(), ex.data(),
                          sl.data(), Tt, Dm, E, G * C);
  outs.push_back(download(be, lb.data(), G));
  outs.push_back(download(be, rdl.data(), Tt * E));
  outs.push_back(download(be, buf.data(), int64_t(E) * G * C * Dm));
  outs.push_back(download(be, dgate.data(), Tt));
  return outs;
}

// The CPU backend's dropout is bitwise its scalar formula, x / (1 - p) in float (SIMD for full
// groups of four, scalar for the tail): fp32 training stays bitwise what it was.
TEST(CpuDropout, BitwiseTheScalarFormula) {
  CpuBackend be;
  for (int64_t n : {1, 3, 4, 6, 4097}) {
    const float p = 0.3f;
    const auto x = random_vector(n, 150 + n);
    auto X = upload(be, x);
    be.dropout(X.data(), X.data(), n, p, 77);  // in place, as the attention backward does
    const auto h = download(be, X.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const float want =
          random16(77, uint64_t(i)) >= dropout_threshold(p) ? x[size_t(i)] / (1.0f - p) : 0.0f;
      ASSERT_EQ(std::bit_cast<uint32_t>(h[size_t(i)]), std::bit_cast<uint32_t>(want))
          << "n=" << n << " i=" << i;
    }
  }
}

// The fused attention ops on the CPU backend are bitwise the sequence of ops the model ran
// before them (model/attention.cpp at d8bd590), so training numbers do not move:
//   forward, fp32:  attention_softmax_forward in place; dropout into a second buffer (p > 0)
//   forward, bf16:  the same in an fp32 buffer, round_to_bf16, cast to bf16 (probs), dropout in
//                   place (p > 0), round_to_bf16
//   backward:       dropout in place (p > 0), softmax_backward in place, sum_over_batch into
//                   dbias, round_to_bf16 (bf16)
// Shapes large enough to run in parallel, rows not starting at a multiple of four (Tk = 12, the
// tiny config's, and 65), a step-keyed mask.
TEST(CpuAttention, FusedIsBitwiseTheComposition) {
  CpuBackend be;
  auto bits = [](const std::vector<float>& v) {
    std::vector<uint32_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = std::bit_cast<uint32_t>(v[i]);
    return b;
  };
  struct Dims {
    int B, H, Tq, Tk;
  };
  for (const Dims& d : std::vector<Dims>{{3, 2, 5, 12}, {16, 4, 12, 12}, {2, 4, 64, 65}}) {
    const int64_t n = int64_t(d.B) * d.H * d.Tq * d.Tk, nb = int64_t(d.H) * d.Tq * d.Tk;
    const int64_t rows = int64_t(d.B) * d.H * d.Tq;
    const auto scores = random_vector(n, 90, -4, 4), bias = random_vector(nb, 91);
    auto key_mask = random_vector(int64_t(d.B) * d.Tk, 92, 0, 1);
    for (float& m : key_mask) m = m < 0.3f ? 0.0f : 1.0f;
    const auto dprobs = random_vector(n, 93), dbias0 = random_vector(nb, 94);
    auto Bi = upload(be, bias), Km = upload(be, key_mask);
    DeviceArray<uint64_t> step(be, 1);
    const uint64_t step_value = 7;
    be.copy_to_device(step.data(), &step_value, sizeof step_value);
    const RandomKey key(1234, step.data());
    for (int variant = 0; variant < 8; ++variant) {
      const bool causal = variant & 1, bf16 = variant & 2;
      const float p = variant & 4 ? 0.1f : 0.0f;
      const std::string what = fmt::format("{}x{}x{}x{} causal={} bf16={} p={}", d.B, d.H, d.Tq,
                                           d.Tk, causal, bf16, p);
      // The composition.
      auto S = upload(be, scores), D = upload(be, scores), Dp = upload(be, dprobs),
           Db = upload(be, dbias0);
      DeviceArray<uint16_t> Pb(be, n);
      be.attention_softmax_forward(S.data(), S.data(), Bi.data(), Km.data(), d.B, d.H, d.Tq,
                                   d.Tk, causal);
      const float* p_used = S.data();  // what the context GEMM reads
      if (bf16) {
        be.round_to_bf16(S.data(), n);
        be.cast(Pb.data(), DType::kBF16, S.data(), DType::kF32, n);
        if (p > 0.0f) be.dropout(S.data(), S.data(), n, p, key);
        be.round_to_bf16(S.data(), n);
      } else if (p > 0.0f) {
        be.dropout(D.data(), S.data(), n, p, key);
        p_used = D.data();
      }
      const auto want_p = download(be, p_used, n);
      const auto want_pb = download(be, Pb.data(), n);
      // The backward's fp32 probs: the forward's fp32 softmax, or the bf16 one widened.
      std::vector<float> probs32 = download(be, S.data(), n);
      if (bf16)
        for (int64_t i = 0; i < n; ++i) probs32[size_t(i)] = bf16_to_float(want_pb[size_t(i)]);
      auto P32 = upload(be, probs32);
      if (p > 0.0f) be.dropout(Dp.data(), Dp.data(), n, p, key);
      be.softmax_backward(Dp.data(), Dp.data(), P32.data(), rows, d.Tk);
      be.sum_over_batch(Db.data(), Dp.data(), d.B, nb);
      if (bf16) be.round_to_bf16(Dp.data(), n);
      const auto want_ds = download(be, Dp.data(), n), want_db = download(be, Db.data(), nb);

      // The fused ops, called as the model calls them.
      auto S2 = upload(be, scores), D2 = poisoned<float>(be, n), Dp2 = upload(be, dprobs),
           Db2 = upload(be, dbias0);
      DeviceArray<uint16_t> Pb2(be, n);
      float* dropped = bf16 ? S2.data() : p > 0.0f ? D2.data() : nullptr;
      void* probs = bf16 ? static_cast<void*>(Pb2.data()) : static_cast<void*>(S2.data());
      be.attention_softmax_dropout_forward(probs, bf16 ? DType::kBF16 : DType::kF32, dropped,
                                           S2.data(), Bi.data(), Km.data(), d.B, d.H, d.Tq, d.Tk,
                                           causal, p, key);
      EXPECT_EQ(bits(download(be, dropped ? dropped : S2.data(), n)), bits(want_p)) << what;
      if (bf16)
        EXPECT_EQ(download(be, Pb2.data(), n), want_pb) << what;
      else
        EXPECT_EQ(bits(download(be, S2.data(), n)), bits(probs32)) << what;
      be.attention_softmax_dropout_backward(Dp2.data(), Db2.data(), Dp2.data(), P32.data(), d.B,
                                            d.H, d.Tq, d.Tk, p, key, bf16);
      EXPECT_EQ(bits(download(be, Dp2.data(), n)), bits(want_ds)) << what;
      EXPECT_EQ(bits(download(be, Db2.data(), nb)), bits(want_db)) << what;
    }
  }
}

// CpuBackend::attention_core_forward/_backward run problem by problem (each (b,h) in cache from
// its scores to its context) when there are at least as many problems as threads; they must give
// bitwise what Backend's composition gives on the same backend: the batched GEMMs, the fused
// softmax+dropout ops, dropout, and the bias gradient summed over b in order. Two threads, so
// that the problem-by-problem path runs for every shape but the one-problem fallback; odd sizes;
// dq over dctx as the model writes it; every output poisoned first.
TEST(CpuAttention, CoreByProblemIsBitwiseTheComposition) {
  CpuBackend be;
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(2);
  auto bits = [](const std::vector<float>& v) {
    std::vector<uint32_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = std::bit_cast<uint32_t>(v[i]);
    return b;
  };
  struct Dims {
    int B, H, Tq, Tk, K;
  };
  for (const Dims& d : std::vector<Dims>{
           {1, 1, 5, 7, 3}, {2, 3, 7, 13, 5}, {3, 2, 64, 65, 16}, {2, 4, 114, 512, 64}}) {
    const int BH = d.B * d.H;
    const int64_t n = int64_t(BH) * d.Tq * d.Tk, nb = int64_t(d.H) * d.Tq * d.Tk;
    const int64_t nq = int64_t(BH) * d.Tq * d.K, nk = int64_t(BH) * d.Tk * d.K;
    const auto q = random_vector(nq, 70, -0.6f, 0.6f), k = random_vector(nk, 71, -0.6f, 0.6f),
               v = random_vector(nk, 72), dctx = random_vector(nq, 73),
               bias = random_vector(nb, 74), dbias0 = random_vector(nb, 75);
    auto key_mask = random_vector(int64_t(d.B) * d.Tk, 76, 0, 1);
    for (float& m : key_mask) m = m < 0.3f ? 0.0f : 1.0f;
    auto Q = upload(be, q), Kt = upload(be, k), V = upload(be, v), Bi = upload(be, bias),
         Km = upload(be, key_mask);
    DeviceArray<uint64_t> step(be, 1);
    const uint64_t step_value = 9;
    be.copy_to_device(step.data(), &step_value, sizeof step_value);
    const RandomKey key(4321, step.data());
    for (int variant = 0; variant < 16; ++variant) {
      const bool use_bias = variant & 1, use_mask = variant & 2, causal = variant & 4;
      const float p = variant & 8 ? 0.1f : 0.0f;
      const float* bias_ptr = use_bias ? Bi.data() : nullptr;
      const float* mask_ptr = use_mask ? Km.data() : nullptr;
      const std::string what =
          fmt::format("{}x{}x{}x{} K={} bias={} mask={} causal={} p={}", d.B, d.H, d.Tq, d.Tk,
                      d.K, use_bias, use_mask, causal, p);
      std::vector<std::vector<float>> got[2];  // [0] the composition, [1] the CPU's override
      for (int fused = 0; fused < 2; ++fused) {
        auto P = poisoned<float>(be, n), C = poisoned<float>(be, nq), W = poisoned<float>(be, n),
             Dk = poisoned<float>(be, nk), Dv = poisoned<float>(be, nk);
        auto Dctx = upload(be, dctx), Db = upload(be, dbias0);
        if (fused)
          be.attention_core_forward(P.data(), C.data(), Q.data(), Kt.data(), V.data(), bias_ptr,
                                    mask_ptr, d.B, d.H, d.Tq, d.Tk, d.K, causal, p, key, W.data());
        else
          be.Backend::attention_core_forward(P.data(), C.data(), Q.data(), Kt.data(), V.data(),
                                             bias_ptr, mask_ptr, d.B, d.H, d.Tq, d.Tk, d.K,
                                             causal, p, key, W.data());
        got[fused].push_back(download(be, P.data(), n));
        got[fused].push_back(download(be, C.data(), nq));
        poison(be, W.data(), n);
        float* db = use_bias ? Db.data() : nullptr;
        if (fused)
          be.attention_core_backward(Dctx.data(), Dk.data(), Dv.data(), db, Dctx.data(),
                                     P.data(), Q.data(), Kt.data(), V.data(), d.B, d.H, d.Tq,
                                     d.Tk, d.K, p, key, W.data());
        else
          be.Backend::attention_core_backward(Dctx.data(), Dk.data(), Dv.data(), db, Dctx.data(),
                                              P.data(), Q.data(), Kt.data(), V.data(), d.B, d.H,
                                              d.Tq, d.Tk, d.K, p, key, W.data());
        got[fused].push_back(download(be, Dctx.data(), nq));
        got[fused].push_back(download(be, Dk.data(), nk));
        got[fused].push_back(download(be, Dv.data(), nk));
        got[fused].push_back(download(be, Db.data(), nb));
      }
      const char* names[] = {"probs", "ctx", "dq", "dk", "dv", "dbias"};
      for (size_t o = 0; o < got[0].size(); ++o) {
        for (float x : got[1][o]) ASSERT_TRUE(std::isfinite(x)) << what << " " << names[o];
        EXPECT_EQ(bits(got[1][o]), bits(got[0][o])) << what << " " << names[o];
      }
    }
  }
  omp_set_num_threads(saved_threads);
}

// CpuBackend::relu_dropout_forward/_backward (one pass per block) against Backend's composition
// (relu, then CpuBackend::dropout over the whole tensor, and the reverse) on the same backend:
// bitwise, at 1, 2 and 3 threads, in place and not, odd lengths.
TEST(CpuActivation, ReluDropoutIsBitwiseTheComposition) {
  CpuBackend be;
  const int saved_threads = omp_get_max_threads();
  auto bits = [](const std::vector<float>& v) {
    std::vector<uint32_t> b(v.size());
    for (size_t i = 0; i < v.size(); ++i) b[i] = std::bit_cast<uint32_t>(v[i]);
    return b;
  };
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    for (int64_t n : {int64_t(5), int64_t(2047), int64_t(4096), int64_t(100003)}) {
      auto x = random_vector(n, 52);
      const auto g = random_vector(n, 53);
      for (int64_t i = 0; i < n; i += 7) x[size_t(i)] = i % 2 ? -0.0f : 0.0f;  // relu's edge
      for (float p : {0.0f, 0.1f, 0.5f}) {
        const std::string what = fmt::format("threads={} n={} p={}", threads, n, p);
        const RandomKey key(31337);
        std::vector<std::vector<float>> got[2];
        for (int fused = 0; fused < 2; ++fused)
          for (int in_place = 0; in_place < 2; ++in_place) {
            auto X = upload(be, x), G = upload(be, g);
            auto Y = in_place ? upload(be, x) : poisoned<float>(be, n);
            auto D = in_place ? upload(be, g) : poisoned<float>(be, n);
            const float* xin = in_place ? Y.data() : X.data();
            const float* gin = in_place ? D.data() : G.data();
            if (fused) {
              be.relu_dropout_forward(Y.data(), xin, n, p, key);
              be.relu_dropout_backward(D.data(), gin, X.data(), n, p, key);
            } else {
              be.Backend::relu_dropout_forward(Y.data(), xin, n, p, key);
              be.Backend::relu_dropout_backward(D.data(), gin, X.data(), n, p, key);
            }
            got[fused].push_back(download(be, Y.data(), n));
            got[fused].push_back(download(be, D.data(), n));
          }
        for (size_t o = 0; o < got[0].size(); ++o)
          EXPECT_EQ(bits(got[1][o]), bits(got[0][o])) << what << " output " << o;
      }
    }
  }
  omp_set_num_threads(saved_threads);
}

// The CPU's gemm_ex_rows does skip: A's rows past the counts hold NaN here, which a product
// over them would spread into C, yet C is the product with those rows zero (the reference's
// result over zeros), beta * C past the counts (not trans_a), and the backend counts the FLOPs
// of the rows it ran only.
TEST(CpuGemmRows, SkipsTheRowsPastTheCounts) {
  CpuBackend cpu;
  ReferenceBackend ref;
  const int M = 24, N = 40, K = 16, batch = 5;
  const std::vector<int32_t> rows_nt = {0, 24, 7, 1, 13}, rows_tn = {0, 16, 5, 1, 9};
  for (bool ta : {false, true}) {
    const std::vector<int32_t>& rows = ta ? rows_tn : rows_nt;
    const int full = ta ? K : M, lda = ta ? M : K;
    const int64_t sa = int64_t(full) * lda, sb = int64_t(K) * N, sc = int64_t(M) * N;
    auto zeros = random_vector(sa * batch, 71);
    auto nans = zeros;
    for (int bi = 0; bi < batch; ++bi)
      for (int r = rows[bi]; r < full; ++r)
        for (int j = 0; j < lda; ++j) {
          zeros[bi * sa + int64_t(r) * lda + j] = 0.0f;
          nans[bi * sa + int64_t(r) * lda + j] = std::numeric_limits<float>::quiet_NaN();
        }
    const auto b = random_vector(sb * batch, 72), c = random_vector(sc * batch, 73);
    for (float beta : {0.0f, 0.5f}) {
      auto want = c;
      ref.gemm(ta, false, M, N, K, 1.0f, zeros.data(), lda, sa, b.data(), N, sb, beta,
               want.data(), N, sc, batch);
      auto got = c;
      const double flops0 = cpu.executed_gemm_flops();
      cpu.gemm_ex_rows(ta, false, M, N, K, 1.0f, nans.data(), DType::kF32, lda, sa, b.data(),
                       DType::kF32, N, sb, beta, got.data(), DType::kF32, N, sc, batch,
                       rows.data(), nullptr);
      double products = 0.0;
      for (int r : rows) products += ta ? double(M) * r : double(r) * K;
      EXPECT_EQ(cpu.executed_gemm_flops() - flops0, 2.0 * products * N) << "trans_a " << ta;
      EXPECT_TRUE(all_close(got, want, 1e-5, 1e-6)) << "trans_a " << ta << " beta " << beta;
    }
  }
}

TEST(CpuThreads, OpsBitwiseIndependentOfThreadCount) {
  CpuBackend cpu;
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  std::vector<double> sums_one, sums_many;
  const Outputs one = run_cpu_ops(cpu, sums_one);
  for (int threads : {2, 3, 7}) {
    omp_set_num_threads(threads);
    const Outputs many = run_cpu_ops(cpu, sums_many);
    EXPECT_EQ(sums_one, sums_many) << threads << " threads";
    ASSERT_EQ(one.size(), many.size());
    for (size_t i = 0; i < one.size(); ++i)
      EXPECT_TRUE(all_close(many[i], one[i], 0, 0))
          << "output " << i << " with " << threads << " threads";
  }
  omp_set_num_threads(saved);
}

}  // namespace
}  // namespace switcht5
